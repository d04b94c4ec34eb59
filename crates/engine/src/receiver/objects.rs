//! Making and replacing objects in the destination for the decisions of `decide.rs`:
//! whole under a temporary name then renamed over what stands there (a reader sees the old
//! object or the new one), hard links, fifos and device nodes, metadata-only changes (on a
//! detached copy when the file has other names), and a directory the source replaced.

use super::*;

/// Make an object whole under a temporary name beside `target` (`make`), give it the entry's
/// metadata, and rename it over whatever stands there: a reader sees the old object or the
/// new one, never none. An error says which step failed ("create", "set metadata of",
/// "rename into place").
pub(super) fn put_in_place(
    target: &Place,
    entry: &Entry,
    apply: ApplyOpts,
    make: impl FnOnce(&Place) -> std::io::Result<()>,
) -> Result<(), (std::io::Error, &'static str)> {
    let tmp = target.sibling(&temp_name(target.name()));
    let _ = tmp.remove_file();
    make(&tmp).map_err(|e| (e, "create"))?;
    let set =
        meta::apply_place(&tmp, entry, apply).map_err(|e| std::io::Error::other(e.to_string()));
    set.map_err(|e| (e, "set metadata of"))?;
    tmp.rename_to(target).map_err(|e| (e, "rename into place"))
}

/// The names of cutover's own files that may stand beside `name`.
pub(super) fn own_names(name: &OsStr) -> [OsString; 2] {
    [partial_name(name), temp_name(name)]
}

/// Make `link` a hard link of `first`'s object, atomically replacing whatever stands there,
/// unless it already is one. The check matters beyond saving work: `rename` of two names of
/// one object does nothing and succeeds, which would leave the temporary name behind.
pub(super) fn link_as(first: &Place, link: &Place) -> std::io::Result<()> {
    let target = first
        .metadata()?
        .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))?;
    if link
        .metadata()?
        .is_some_and(|md| md.identity() == target.identity())
    {
        return Ok(());
    }
    let tmp = link.sibling(&temp_name(link.name()));
    let _ = tmp.remove_file();
    first.hard_link_as(&tmp)?;
    tmp.rename_to(link).inspect_err(|_| {
        let _ = tmp.remove_file();
    })
}

/// The content is already there: set metadata where it differs (`Meta`), else `Skip`.
pub(super) fn meta_only(
    md: &cofs::root::Stat,
    target: &Place,
    entry: &Entry,
    apply: ApplyOpts,
    dry: bool,
) -> Result<Need, (Need, String)> {
    if !meta::differs(md, target, entry, apply) {
        return Ok(Need::Skip);
    }
    if !dry {
        let applied = if md.is_file() && md.nlink() > 1 {
            detach(target, entry, apply)
        } else {
            meta::apply_place(target, entry, apply).map_err(|e| e.to_string())
        };
        applied.map_err(|e| (Need::Refused, e))?;
    }
    Ok(Need::Meta)
}

/// Give `target`, a file with other names (hard links), the entry's metadata on a copy of its
/// own, renamed over it: changing the shared object would change every other name too, which
/// the source did not ask for (a link it broke). Where the source keeps the group, the pass
/// links the other names to this copy at its end.
pub(super) fn detach(target: &Place, entry: &Entry, apply: ApplyOpts) -> Result<(), String> {
    let shown = target.shown().display().to_string();
    let io = |e: std::io::Error| format!("{shown}: {e}");
    let from = target.open_read().map_err(io)?;
    let size = from.metadata().map_err(io)?.len();
    let work = target.sibling(&partial_name(target.name()));
    let out = work.open_write(true).map_err(io)?;
    out.set_len(size).map_err(io)?;
    let whole = CopyOp {
        src: 0,
        len: size,
        dst: 0,
    };
    copy_range(&from, &out, whole, Unwritten::Hole).map_err(io)?;
    meta::apply_file(&out, target.shown(), entry, apply).map_err(|e| e.to_string())?;
    work.rename_to(target).map_err(io)
}

/// Whether an existing object is the special file an entry describes (kind and device).
pub(super) fn same_node(md: &cofs::root::Stat, kind: &EntryKind) -> bool {
    use rustix::fs::FileType;
    match kind {
        EntryKind::Fifo => md.file_type() == FileType::Fifo,
        EntryKind::CharDevice { rdev } => {
            md.file_type() == FileType::CharacterDevice && md.rdev() == *rdev
        }
        EntryKind::BlockDevice { rdev } => {
            md.file_type() == FileType::BlockDevice && md.rdev() == *rdev
        }
        _ => false,
    }
}

/// A directory stands where the source has a non-directory: with `--delete` it goes (the
/// source no longer has anything below it), otherwise the entry is refused.
pub(super) fn replace_dir(
    target: &Place,
    what: &str,
    delete: bool,
    dry: bool,
) -> Result<(), (Need, String)> {
    let shown = target.shown().display();
    if !delete {
        return Err((
            Need::Refused,
            format!(
                "{shown}: is a directory, the source has {what} here (use --delete to replace it)"
            ),
        ));
    }
    if !dry {
        target.remove_tree().map_err(|e| {
            (
                Need::Refused,
                format!("{shown}: cannot remove directory to replace it: {e}"),
            )
        })?;
    }
    Ok(())
}

/// Make a fifo or, as root, a device node. A device node from a peer when not root is
/// refused: only root could make one, and it would be a hole in the destination's permissions.
pub(super) fn devices_refused(path: impl std::fmt::Display) -> String {
    format!("{path}: refused: this destination does not accept device nodes or writes to block devices (a daemon module needs allow_devices = true)")
}

pub(super) fn make_node(place: &Place, e: &Entry) -> std::io::Result<()> {
    use rustix::fs::FileType;
    let (ft, rdev) = match e.kind {
        EntryKind::Fifo => (FileType::Fifo, 0),
        EntryKind::CharDevice { rdev } => (FileType::CharacterDevice, rdev),
        EntryKind::BlockDevice { rdev } => (FileType::BlockDevice, rdev),
        _ => return Err(std::io::Error::other("not a special file")),
    };
    if ft != FileType::Fifo && !rustix::process::geteuid().is_root() {
        return Err(std::io::Error::other(
            "device nodes can only be created as root; skipped",
        ));
    }
    place.make_node(ft, e.mode & 0o7777, rdev)
}
