//! Deciding, entry by entry, what the destination needs (skip, metadata, a signature, the
//! whole file, or a refusal), making directories, links and nodes on the way (with the
//! helpers of `objects.rs`); and the end of a pass: hard links, deletes (guarded), directory
//! metadata, the file-system sync.

use super::*;

/// Directory bookkeeping of a pass: the stack of open directories (for deletes), the
/// directories whose metadata is set at the end, and deferred hard links. All by wire path,
/// resolved when used.
pub(super) struct WalkState {
    delete: bool,
    /// Only listed paths come (`--files-from`): a directory the sender marks implied is no
    /// scope of `--delete`, and an implied root keeps its own metadata.
    files_from: bool,
    filter: Filter,
    /// The first entry created the destination directory (so the root entry is new).
    created_root: bool,
    /// For the entries of one directory, listed together.
    parents: ParentCache,
    /// The directories the walk is in, outermost first, with the names listed in each so far
    /// and whether `--delete` acts in it (always, unless only listed paths come).
    open_dirs: Vec<(Vec<u8>, HashSet<Vec<u8>>, bool)>,
    dirs: Vec<Entry>,
    /// (first, link): wire paths of a hard link's first name and of the link.
    hard_links: Vec<(Vec<u8>, Vec<u8>)>,
    doomed: Vec<Vec<u8>>,
    /// With `delete`: cutover's own partial and temporary files that no listed name claims
    /// (their source is gone), removed at the end with the doomed entries.
    litter: Vec<Vec<u8>>,
}

/// What deciding an entry found at the destination, handed to the decision of its kind.
pub(super) struct Found {
    dry: bool,
    path: ItemPath,
    size: u64,
    /// The path as people read it (never used for access).
    shown: PathBuf,
    /// Where the entry goes (in a dry run, an error only means nothing is there yet).
    place: Result<Place, String>,
    existing: Option<cofs::root::Stat>,
}

impl Found {
    fn here(&self) -> Result<&Place, (Need, String)> {
        self.place.as_ref().map_err(|e| (Need::Refused, e.clone()))
    }
    fn item(&self, a: Action) -> Option<(ItemPath, Action, u64)> {
        Some((self.path.clone(), a, self.size))
    }
    fn err(&self, e: std::io::Error, what: &str) -> (Need, String) {
        (
            Need::Refused,
            format!("{}: {what}: {e}", self.shown.display()),
        )
    }
}

pub(super) type Decided = (Need, Option<SigJob>, Option<(ItemPath, Action, u64)>);

impl WalkState {
    pub(super) fn new(delete: bool, files_from: bool, filter: Filter) -> Self {
        WalkState {
            delete,
            files_from,
            filter,
            created_root: false,
            parents: ParentCache::default(),
            open_dirs: Vec::new(),
            dirs: Vec::new(),
            hard_links: Vec::new(),
            doomed: Vec::new(),
            litter: Vec::new(),
        }
    }

    pub(super) fn empty() -> Self {
        WalkState::new(false, false, Filter::default())
    }

    /// Track the directory walk for deletes: close directories the walk has left. With
    /// `files_from`, a directory marked `implied` only leads to listed paths: it is closed
    /// without a look at what else it holds, which stays.
    fn track(&mut self, dest: &Dest, rel: &[u8], is_dir: bool, implied: bool) {
        if !self.delete {
            return;
        }
        let scoped = !(self.files_from && implied);
        let parent = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => &rel[..i],
            None if rel.is_empty() => {
                self.open_dirs.push((Vec::new(), HashSet::new(), scoped));
                return;
            }
            None => &rel[..0],
        };
        while let Some((top, _, _)) = self.open_dirs.last() {
            if top.as_slice() == parent {
                break;
            }
            let closed = self.open_dirs.pop();
            if let Some((dir, seen, true)) = closed {
                self.close_dir(dest, &dir, &seen);
            }
        }
        let name = rel[parent.len()..]
            .strip_prefix(b"/")
            .unwrap_or(&rel[parent.len()..]);
        if let Some((_, seen, true)) = self.open_dirs.last_mut() {
            seen.insert(name.to_vec());
        }
        if is_dir {
            self.open_dirs.push((rel.to_vec(), HashSet::new(), scoped));
        }
    }

    /// Everything in `dir` on the destination that the source did not list is doomed.
    fn close_dir(&mut self, dest: &Dest, dir: &[u8], seen: &HashSet<Vec<u8>>) {
        let Ok(listed) = dest
            .place(dir)
            .and_then(|p| p.list().map_err(|e| e.to_string()))
        else {
            return;
        };
        let in_dir = |name: &[u8]| {
            let mut rel = dir.to_vec();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(name);
            rel
        };
        // Our own files beside a name the source lists, or beside a protected (excluded)
        // name, may still serve (a resume, a transfer in flight); any other is litter that
        // no later run will claim.
        let mut claimed: HashSet<OsString> = seen
            .iter()
            .flat_map(|n| own_names(OsStr::from_bytes(n)))
            .collect();
        let mut ours = Vec::new();
        for e in listed {
            if is_internal(&e.name) {
                if !e.is_dir {
                    ours.push(e.name);
                }
                continue;
            }
            if seen.contains(e.name.as_bytes()) {
                continue;
            }
            let rel = in_dir(e.name.as_bytes());
            // Excluded files are protected from deletion, as in rsync.
            if self.filter.excluded(&rel, e.is_dir) {
                claimed.extend(own_names(&e.name));
                continue;
            }
            self.doomed.push(rel);
        }
        self.litter.extend(
            ours.into_iter()
                .filter(|n| !claimed.contains(n))
                .map(|n| in_dir(n.as_bytes())),
        );
    }

    pub(super) fn decide(
        &mut self,
        shared: &Shared,
        id: u64,
        entry: Entry,
        rescan: bool,
        implied: bool,
    ) -> Result<Decided, (Need, String)> {
        let dry = shared.opts.dry_run;
        if let Err(why) = validate_rel(&entry.path) {
            return Err((
                Need::Refused,
                format!("{:?}: refused: {why}", display(&entry.path)),
            ));
        }
        let dest = &shared.dest;
        // Another sync holds the destination: touch nothing (the session ends after this
        // batch), not even the directories and links that deciding would create.
        if let Some(why) = dest.halted.get() {
            return Err((Need::Refused, why.clone()));
        }
        if dest.layout.get().is_none() {
            // A destination that cannot take this source takes nothing: a later entry must
            // never settle it differently (a file of the tree written over a file named as
            // the destination of a directory).
            self.created_root = dest.settle(&entry, dry).map_err(|e| {
                let _ = dest.halted.set(e.clone());
                (Need::Refused, e)
            })?;
        }
        if !rescan {
            self.track(dest, &entry.path, entry.kind == EntryKind::Dir, implied);
        }
        let shown = dest.shown(&entry.path);
        let err = |e: std::io::Error, what: &str| {
            (Need::Refused, format!("{}: {what}: {e}", shown.display()))
        };
        // Directories are made, removed and replaced below: never reuse a parent across one.
        if matches!(entry.kind, EntryKind::Dir) {
            self.parents.forget();
        }
        // In a dry run a missing parent only means nothing is there yet.
        let place = match dest.place_cached(&entry.path, &mut self.parents) {
            Ok(p) => Ok(p),
            Err(e) if !dry => return Err((Need::Refused, e)),
            Err(e) => Err(e),
        };
        let existing = match &place {
            Ok(_) if entry.path.is_empty() && self.created_root => None,
            Ok(p) => p.metadata().map_err(|e| err(e, "cannot inspect"))?,
            Err(_) => None,
        };
        let found = Found {
            dry,
            path: ItemPath::new(&entry.path),
            size: entry.size,
            shown,
            place,
            existing,
        };
        match &entry.kind {
            // As rsync: a listed path's directories get their metadata, but the root, when
            // it is only on the way, keeps its own.
            EntryKind::Dir => {
                let keep_meta = self.files_from && implied && entry.path.is_empty();
                self.decide_dir(entry, found, keep_meta)
            }
            EntryKind::Symlink { .. } => self.decide_symlink(shared, entry, found),
            EntryKind::HardLink { .. } => self.decide_hard_link(shared, entry, found),
            EntryKind::CharDevice { .. } | EntryKind::BlockDevice { .. } if !shared.devices => {
                Err((Need::Refused, devices_refused(&found.path)))
            }
            EntryKind::Fifo | EntryKind::CharDevice { .. } | EntryKind::BlockDevice { .. } => {
                self.decide_node(shared, entry, found)
            }
            EntryKind::File | EntryKind::Volume => self.decide_file(shared, id, entry, found),
        }
    }

    /// A directory: made (or put where a non-directory stood); its metadata waits for the end
    /// (unless it keeps its own: `keep_meta`).
    fn decide_dir(
        &mut self,
        entry: Entry,
        f: Found,
        keep_meta: bool,
    ) -> Result<Decided, (Need, String)> {
        let here = || f.here();
        let item = |a: Action| f.item(a);
        let err = |e: std::io::Error, what: &str| f.err(e, what);
        let dry = f.dry;
        let existing = &f.existing;
        let fresh = match &existing {
            Some(md) if md.is_dir() => false,
            Some(_) => {
                if !dry {
                    here()?
                        .remove_file()
                        .map_err(|e| err(e, "cannot replace with a directory"))?;
                }
                true
            }
            None => true,
        };
        // The root itself was made by `settle`.
        if fresh && !dry && !entry.path.is_empty() {
            here()?
                .create_dir()
                .map_err(|e| err(e, "cannot create directory"))?;
        }
        if !keep_meta {
            self.dirs.push(entry);
        }
        if fresh {
            return Ok((Need::Created, None, item(Action::Create)));
        }
        Ok((Need::Skip, None, None))
    }

    /// A symlink: kept when its target matches, else made under a temporary name and renamed.
    fn decide_symlink(
        &mut self,
        shared: &Shared,
        entry: Entry,
        f: Found,
    ) -> Result<Decided, (Need, String)> {
        let here = || f.here();
        let item = |a: Action| f.item(a);
        let err = |e: std::io::Error, what: &str| f.err(e, what);
        let dry = f.dry;
        let apply = shared.apply;
        let existing = &f.existing;
        let EntryKind::Symlink { target: link } = &entry.kind else {
            return Err((Need::Refused, "not a symlink".into()));
        };
        let link = &link.clone();
        if let Some(md) = &existing {
            if md.is_symlink() {
                let same = here()?.read_link().is_ok_and(|t| t == *link);
                if same {
                    let need = meta_only(md, here()?, &entry, apply, dry)?;
                    return Ok((
                        need,
                        None,
                        (need == Need::Meta).then(|| item(Action::Meta)).flatten(),
                    ));
                }
            } else if md.is_dir() {
                replace_dir(here()?, "a symlink", shared.opts.delete, dry)?;
            }
        }
        if !dry {
            put_in_place(here()?, &entry, apply, |tmp| tmp.symlink(link))
                .map_err(|(e, what)| err(e, &format!("cannot {what} symlink")))?;
        }
        Ok((Need::Created, None, item(Action::Create)))
    }

    /// A hard link: made at the end of the pass, unless the name already links the group.
    fn decide_hard_link(
        &mut self,
        shared: &Shared,
        entry: Entry,
        f: Found,
    ) -> Result<Decided, (Need, String)> {
        let here = || f.here();
        let item = |a: Action| f.item(a);
        let dry = f.dry;
        let existing = &f.existing;
        let path = &f.path;
        let EntryKind::HardLink { first } = &entry.kind else {
            return Err((Need::Refused, "not a hard link".into()));
        };
        let first = &first.clone();
        let dest = &shared.dest;
        if validate_rel(first).is_err() {
            return Err((
                Need::Refused,
                format!("{path}: refused: bad hard link target"),
            ));
        }
        if existing.as_ref().is_some_and(|md| md.is_dir()) {
            replace_dir(here()?, "a hard link", shared.opts.delete, dry)?;
        }
        self.hard_links.push((first.clone(), entry.path.clone()));
        // Already a link of the first name's object: nothing to do, unless the first
        // name is replaced by a new file later in this pass (then `finish` links again).
        let linked = existing.as_ref().is_some_and(|md| {
            dest.place(first)
                .ok()
                .and_then(|f| f.metadata().ok().flatten())
                .is_some_and(|f| f.identity() == md.identity())
        });
        if linked {
            return Ok((Need::Skip, None, None));
        }
        Ok((Need::Created, None, item(Action::Create)))
    }

    /// A FIFO or device node: its metadata when it stands already, else made and renamed.
    fn decide_node(
        &mut self,
        shared: &Shared,
        entry: Entry,
        f: Found,
    ) -> Result<Decided, (Need, String)> {
        let here = || f.here();
        let item = |a: Action| f.item(a);
        let err = |e: std::io::Error, what: &str| f.err(e, what);
        let dry = f.dry;
        let apply = shared.apply;
        let existing = &f.existing;
        if let Some(md) = &existing {
            if same_node(md, &entry.kind) {
                let need = meta_only(md, here()?, &entry, apply, dry)?;
                let item = (need == Need::Meta).then(|| item(Action::Meta)).flatten();
                return Ok((need, None, item));
            }
            if md.is_dir() {
                replace_dir(here()?, "a special file", shared.opts.delete, dry)?;
            }
        }
        if !dry {
            put_in_place(here()?, &entry, apply, |tmp| make_node(tmp, &entry))
                .map_err(|(e, what)| err(e, &format!("cannot {what} node")))?;
        }
        Ok((Need::Created, None, item(Action::Create)))
    }

    /// A regular file or volume: what to send (whole, positional, chunks, or compare first)
    /// against which basis (the target, or a partial file to resume).
    fn decide_file(
        &mut self,
        shared: &Shared,
        id: u64,
        entry: Entry,
        f: Found,
    ) -> Result<Decided, (Need, String)> {
        let here = || f.here();
        let item = |a: Action| f.item(a);
        let dry = f.dry;
        let apply = shared.apply;
        let existing = &f.existing;
        let shown = &f.shown;
        let path = &f.path;
        let size = f.size;
        let place = &f.place;
        let volume = entry.kind == EntryKind::Volume
            || existing
                .as_ref()
                .map(|m| m.is_block_device())
                .unwrap_or(false);
        let device = existing.as_ref().is_some_and(|m| m.is_block_device());
        if device && !shared.devices {
            return Err((Need::Refused, devices_refused(path)));
        }
        // In place only into a regular file (or a device, for a volume): a symlink, FIFO or
        // other node where the source now has a file is replaced through a partial file and
        // a rename, never written through.
        let in_place = (volume || shared.opts.inplace)
            && existing
                .as_ref()
                .is_none_or(|m| m.is_file() || m.is_dir() || m.is_block_device());
        if let Some(md) = &existing {
            if md.is_dir() {
                replace_dir(here()?, "a file", shared.opts.delete, dry)?;
            }
            if !volume && md.is_file() && !shared.opts.checksum && meta::quick_match(md, &entry) {
                let need = meta_only(md, here()?, &entry, apply, dry)?;
                return Ok((
                    need,
                    None,
                    (need == Need::Meta).then(|| item(Action::Meta)).flatten(),
                ));
            }
        }
        let partial = match &place {
            Ok(p) if !in_place => p
                .sibling(&partial_name(p.name()))
                .metadata()
                .ok()
                .flatten()
                .filter(|m| m.is_file()),
            _ => None,
        };
        // A partial left by a content-defined delta (the target's size differs from the new
        // one, so content may have shifted) can resume worse than the target it was rebuilt
        // from: its unwritten ranges cannot be filled from the target at the same offsets,
        // so a positional delta against it resends them all. When it holds less data than
        // the target, the file starts over from the target (only the literals the
        // interrupted run sent are lost); otherwise (most of it was new) from the partial.
        let shifted = existing
            .as_ref()
            .filter(|m| m.is_file() && m.size() > 0 && m.size() != entry.size)
            .map(|m| m.size());
        let rebuild_from_target = match (shifted, &place) {
            (Some(target_size), Ok(p)) if partial.is_some() && !shared.opts.whole_file => {
                let work = p.sibling(&partial_name(p.name()));
                work.open_read()
                    .and_then(|f| data_bytes(&f))
                    .is_ok_and(|held| held < target_size)
            }
            _ => false,
        };
        let has_partial = partial.is_some() && !rebuild_from_target;
        let target_usable = existing
            .as_ref()
            .map(|m| m.is_file() || m.is_block_device())
            .unwrap_or(false);
        // `fresh`: the work file starts empty in this run, so unwritten ranges read as zeros.
        let (basis, fresh) = if in_place {
            (target_usable.then_some(Basis::Target), !target_usable)
        } else if has_partial {
            (Some(Basis::Partial), false)
        } else {
            (target_usable.then_some(Basis::Target), true)
        };
        let basis_size = match basis {
            Some(Basis::Partial) => partial.as_ref().map(|m| m.size()),
            Some(Basis::Target) => existing.as_ref().map(|m| m.size()),
            None => None,
        }
        .unwrap_or(0);
        // A tracked volume's pass: only the blocks written since the destination's last
        // pass travel, into a target of the volume's size (a device's size by ioctl).
        let changed = shared.opts.changed_blocks
            && entry.kind == EntryKind::Volume
            && !dry
            && matches!(basis, Some(Basis::Target))
            && target_size(existing.as_ref(), place, shown) == Some(entry.size);
        let need = match &basis {
            _ if changed => Need::Changed,
            None => Need::Full,
            // --checksum: a same-size file is compared by its hashes (the sender answers
            // `Same` when they match) rather than sent again, however small; with -W too,
            // since the comparison is what -c asks for (a file that differs then travels as
            // a positional delta).
            Some(_) if shared.opts.checksum && basis_size == entry.size && !has_partial => {
                Need::Verify { meta: false }
            }
            _ if shared.opts.whole_file && !has_partial && !in_place => Need::Full,
            Some(_) if entry.size <= SMALL_FILE && !in_place && !has_partial => Need::Full,
            // The target has the new size: compare before anything is said to change.
            Some(Basis::Target) if basis_size == entry.size => Need::Verify { meta: false },
            Some(_) if in_place || has_partial || volume || basis_size == entry.size => {
                Need::Positional
            }
            Some(_) if basis_size == 0 && !volume => Need::Full,
            Some(_) => Need::Chunks,
        };
        if dry {
            return dry_answer(shared, id, &entry, &f, need, device && volume);
        }
        // Whether a file of the same content would still change (its metadata).
        let need = match (need, &existing) {
            (Need::Verify { .. }, Some(md)) if md.is_file() => Need::Verify {
                meta: meta_only(md, here()?, &entry, apply, true)? == Need::Meta,
            },
            (other, _) => other,
        };
        let sig = match (need, basis) {
            (Need::Positional | Need::Chunks | Need::Verify { .. }, Some(b)) => Some(SigJob {
                id,
                rel: entry.path.clone(),
                basis: b,
                positional: need != Need::Chunks,
                source_size: size,
            }),
            _ => None,
        };
        let verify = match need {
            Need::Verify { meta } => Some(meta),
            _ => None,
        };
        // What the sender will send, itemised here too: in a pull this side reports.
        let action = match need {
            Need::Full => Some(Action::Send),
            Need::Positional | Need::Chunks | Need::Changed => Some(Action::Delta),
            _ => None,
        };
        let rf = RFile {
            entry,
            shown: shown.clone(),
            basis: if need == Need::Full && !in_place {
                None
            } else {
                basis
            },
            in_place,
            fresh,
            out: None,
            basis_file: None,
            seen: 0,
            end: None,
            literal: 0,
            copied: 0,
            basis_size,
            covered: 0,
            verify,
            changed,
        };
        lock(&shared.files).insert(id, rf);
        Ok((need, sig, action.and_then(item)))
    }

    /// End of the pass: hard links, deletions (guarded), directory metadata, file-system sync.
    pub(super) fn finish(
        mut self,
        shared: &Shared,
        events: &dyn Events,
        had_errors: bool,
    ) -> Result<(), String> {
        let dry = shared.opts.dry_run;
        let dest = &shared.dest;
        while let Some((dir, seen, scoped)) = self.open_dirs.pop() {
            if scoped {
                self.close_dir(dest, &dir, &seen);
            }
        }
        let mut report = lock(&shared.report);
        if !dry {
            for (first, link) in &self.hard_links {
                let r = dest.place(first).and_then(|first| {
                    link_as(&first, &dest.place(link)?).map_err(|e| e.to_string())
                });
                if let Err(e) = r {
                    report.errors.push(format!(
                        "{}: cannot hard-link to {}: {e}",
                        dest.shown(link).display(),
                        dest.shown(first).display()
                    ));
                }
            }
        }
        if !dry && !had_errors {
            for rel in std::mem::take(&mut self.litter) {
                let r = dest
                    .place(&rel)
                    .and_then(|p| p.remove_file().map_err(|e| e.to_string()));
                if let Err(e) = r {
                    tracing::debug!(path = %dest.shown(&rel).display(), "stale partial stays: {e}");
                }
            }
        }
        if !self.doomed.is_empty() {
            // Each doomed tree is counted once; places are resolved again to delete rather
            // than held, so thousands of doomed entries do not hold thousands of descriptors.
            let mut parents = ParentCache::default();
            let doomed: Vec<(Vec<u8>, u64)> = std::mem::take(&mut self.doomed)
                .into_iter()
                .map(|rel| {
                    let place = dest.place_cached(&rel, &mut parents);
                    let n = place.map_or(0, |p| p.count_tree());
                    (rel, n)
                })
                .collect();
            let count: u64 = doomed.iter().map(|(_, n)| n).sum();
            if had_errors && !dry {
                report.errors.push(format!(
                    "{count} deletions skipped because of errors in this pass"
                ));
            } else if shared.opts.max_delete.is_some_and(|max| count > max) {
                report.delete_limit_hit = Some(count);
                report.errors.push(format!(
                    "--max-delete {} exceeded: {count} entries would be deleted; nothing was deleted",
                    shared.opts.max_delete.unwrap_or(0)
                ));
            } else {
                let mut notices = Vec::new();
                for (rel, n) in doomed {
                    if !dry {
                        let r = dest
                            .place_cached(&rel, &mut parents)
                            .and_then(|p| p.remove_tree().map_err(|e| e.to_string()));
                        if let Err(e) = r {
                            report.errors.push(format!(
                                "{}: cannot delete: {e}",
                                dest.shown(&rel).display()
                            ));
                            continue;
                        }
                    }
                    report.entries_deleted += n;
                    events.event(Event::Item {
                        path: ItemPath::new(&rel),
                        action: Action::Delete,
                        size: 0,
                    });
                    notices.push(serde_bytes::ByteBuf::from(rel));
                }
                if !notices.is_empty() {
                    let _ = shared
                        .control
                        .blocking_send(Msg::Deleted { paths: notices });
                }
            }
        }
        if !dry {
            // Children first, so a parent's mtime is set after everything inside it changed.
            for entry in self.dirs.iter().rev() {
                // Only where it differs: a no-change pass leaves every directory (and its
                // ctime) alone.
                let r = dest.place(&entry.path).and_then(|p| {
                    match p.metadata().map_err(|e| e.to_string())? {
                        Some(md) if !meta::differs(&md, &p, entry, shared.apply) => Ok(()),
                        _ => meta::apply_place(&p, entry, shared.apply).map_err(|e| e.to_string()),
                    }
                });
                if let Err(e) = r {
                    report.errors.push(e);
                }
            }
            if !shared.opts.fsync {
                // The destination directory: opening a single-file destination itself
                // would block forever when it is a FIFO.
                let root_is_dir = std::fs::symlink_metadata(&dest.root).is_ok_and(|m| m.is_dir());
                let dir = match dest.root.parent() {
                    _ if root_is_dir => dest.root.as_path(),
                    Some(p) if !p.as_os_str().is_empty() => p,
                    _ => Path::new("."),
                };
                if let Ok(d) = File::open(dir) {
                    let started = std::time::Instant::now();
                    if let Err(e) = rustix::fs::syncfs(&d) {
                        report
                            .errors
                            .push(format!("{}: syncfs failed: {e}", dest.root.display()));
                    }
                    tracing::debug!(
                        ms = started.elapsed().as_millis() as u64,
                        "end-of-pass syncfs"
                    );
                }
            }
        }
        Ok(())
    }
}

/// What a dry run answers for a file: with `--checksum` a same-size file is compared first
/// (`Need::Compare`), so the run is exact; otherwise the decision itself, itemised.
fn dry_answer(
    shared: &Shared,
    id: u64,
    entry: &Entry,
    f: &Found,
    need: Need,
    volume_device: bool,
) -> Result<Decided, (Need, String)> {
    let (existing, path, size) = (&f.existing, &f.path, f.size);
    // With --checksum a dry run is exact: a file of the same size is compared by its
    // hashes (the sender reads its copy and answers `Same` or `Differs`), so only
    // files whose content differs are listed. Other cases need no hashes to know.
    if shared.opts.checksum {
        let comparable = existing
            .as_ref()
            .filter(|m| (m.is_file() && m.size() == entry.size) || volume_device);
        if let Some(md) = comparable {
            let meta = meta_only(md, f.here()?, entry, shared.apply, true)? == Need::Meta;
            lock(&shared.compares).insert(id, (path.clone(), size, meta));
            let sig = SigJob {
                id,
                rel: entry.path.clone(),
                basis: Basis::Target,
                positional: true,
                source_size: size,
            };
            return Ok((Need::Compare { meta }, Some(sig), None));
        }
    }
    let (need, action) = match need {
        Need::Full => (Need::Full, Action::Send),
        Need::Verify { .. } => (Need::Positional, Action::Delta),
        // Positional means "a signature follows" in a dry run with --checksum.
        _ if shared.opts.checksum => (Need::Chunks, Action::Delta),
        other => (other, Action::Delta),
    };
    Ok((need, None, f.item(action)))
}

/// The size of a target a volume is written into: a regular file's length, a block
/// device's size (by ioctl: its `stat` size is 0).
fn target_size(
    existing: Option<&cofs::root::Stat>,
    place: &Result<Place, String>,
    shown: &Path,
) -> Option<u64> {
    let md = existing?;
    if md.is_file() {
        return Some(md.size());
    }
    if !md.is_block_device() {
        return None;
    }
    let file = place.as_ref().ok()?.open_read().ok()?;
    cofs::volume::size_of(&file, shown).ok()
}
