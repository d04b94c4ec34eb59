//! The sender's walk of a `--files-from` list: for each listed path in walk order, the
//! directories on the way to it (implied, once each), then the path itself, and for a
//! directory everything beneath it. The output is the walk a whole tree would give,
//! restricted to the list, so the receiver sees one walk order; reads are proportional to the
//! list and what its directories hold, never to the rest of the tree.
//!
//! Nothing is followed through a symlink: a listed path with a symlink on its way is refused
//! (a link leading outside the source must never be read, and one inside would copy an object
//! under a second name); a listed symlink is sent as the link.

use super::list::{is_within, walk_order};
use super::{Feed, LISTED_MISSING};
use crate::sender::ScanMsg;
use crate::LIST_BATCH;
use cofs::{Filter, FsError, Root, ScanItem, Walker};
use proto::EntryKind;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Walk the listed paths `feed` yields beneath `root`, handing batches to the sender's main
/// loop. Runs on its own thread (every call blocks).
pub(crate) fn scan(
    root: Root,
    filter: Arc<Filter>,
    xattrs: bool,
    strict: bool,
    mut feed: Feed,
    tx: mpsc::Sender<ScanMsg>,
) {
    let mut w = ListedWalk {
        root,
        filter,
        xattrs,
        strict,
        tx,
        batch: Vec::with_capacity(LIST_BATCH),
        implied: Vec::new(),
        chain: Vec::new(),
        covered: None,
        last: None,
    };
    let end = loop {
        let path = match feed.next() {
            None => break Ok(()),
            Some(Err(e)) => break Err(e),
            Some(Ok(p)) => p,
        };
        if let Err(stop) = w.listed(path) {
            break Err(stop);
        }
    };
    match end {
        Ok(()) => {
            // Nothing listed was there: the destination is made all the same (as rsync),
            // from the root on the way to nothing.
            if w.chain.is_empty() && w.covered.is_none() {
                if let Err(Way::Problem(why)) = w.implied_dir(Vec::new()) {
                    let _ = w.problem(Vec::new(), why);
                }
            }
            let _ = w.flush();
        }
        // Closed: the session is gone. Anything else ends it.
        Err(Stop::Closed) => {}
        Err(Stop::Fatal(why)) => {
            let _ = w.flush();
            let _ = w.tx.blocking_send(ScanMsg::Fatal(why));
        }
    }
}

/// Why the directories on the way to a listed path could not be sent.
enum Way {
    /// That path is not sent; the walk goes on.
    Problem(String),
    Stop(Stop),
}

/// Why the walk ends before the list does.
pub(crate) enum Stop {
    /// The sender's main loop is gone.
    Closed,
    /// The session ends with this error.
    Fatal(String),
}

struct ListedWalk {
    root: Root,
    filter: Arc<Filter>,
    xattrs: bool,
    strict: bool,
    tx: mpsc::Sender<ScanMsg>,
    batch: Vec<ScanItem>,
    /// Indexes of implied directories in `batch`.
    implied: Vec<u32>,
    /// The directories sent on the way to the last listed path, outermost ("", the root)
    /// first: a later path beneath them needs only what is missing below.
    chain: Vec<Vec<u8>>,
    /// The last listed directory, walked whole: later paths beneath it were sent with it.
    covered: Option<Vec<u8>>,
    /// The previous listed path: the list must come in walk order, each path once.
    last: Option<Vec<u8>>,
}

impl ListedWalk {
    fn listed(&mut self, path: Vec<u8>) -> Result<(), Stop> {
        let shown = crate::sender::display(&path);
        if let Err(why) = cofs::validate_rel(&path) {
            return Err(Stop::Fatal(format!(
                "--files-from: {shown:?}: refused: {why}"
            )));
        }
        if let Some(last) = &self.last {
            if walk_order(last, &path).is_ge() {
                return Err(Stop::Fatal(format!(
                    "--files-from: {shown:?} comes after {:?}: the list is not in walk order",
                    crate::sender::display(last)
                )));
            }
        }
        self.last = Some(path.clone());
        if self
            .covered
            .as_deref()
            .is_some_and(|dir| is_within(&path, dir))
        {
            return Ok(());
        }
        if path.is_empty() {
            // "." listed: the whole source, as without a list (but with its root's metadata).
            self.covered = Some(Vec::new());
            return self.subtree(&path);
        }
        let item = match ScanItem::beneath(&self.root, &path, self.xattrs) {
            Ok(Some(item)) => item,
            Ok(None) => return self.missing(path),
            Err(e) => return self.problem(path, public(e, &shown)),
        };
        let is_dir = item.entry.kind == EntryKind::Dir;
        // As rsync: the filters apply to listed paths and to what is beneath a listed
        // directory, not to the directories on the way.
        if self.filter.excluded(&path, is_dir) {
            return Ok(());
        }
        match self.on_the_way(&path) {
            Ok(()) => {}
            Err(Way::Problem(why)) => return self.problem(path, why),
            Err(Way::Stop(stop)) => return Err(stop),
        }
        if is_dir {
            self.covered = Some(path.clone());
            return self.subtree(&path);
        }
        self.send(item, false)
    }

    /// A listed path that is not in the source: reported and skipped, or the end.
    fn missing(&mut self, path: Vec<u8>) -> Result<(), Stop> {
        let shown = crate::sender::display(&path);
        if self.strict {
            return Err(Stop::Fatal(format!(
                "{shown}: {LISTED_MISSING}; fix the list, or run without --files-from-strict to skip such paths"
            )));
        }
        self.note(ScanMsg::Listed {
            path,
            missing: true,
            reason: LISTED_MISSING.into(),
        })
    }

    /// A listed path that cannot be sent: an error of this pass, the others go on.
    fn problem(&mut self, path: Vec<u8>, reason: String) -> Result<(), Stop> {
        self.note(ScanMsg::Listed {
            path,
            missing: false,
            reason,
        })
    }

    /// Send the directories on the way to `path` that the walk has not sent yet.
    fn on_the_way(&mut self, path: &[u8]) -> Result<(), Way> {
        while let Some(top) = self.chain.last() {
            if is_within(path, top) && top.as_slice() != path {
                break;
            }
            self.chain.pop();
        }
        let mut at = match self.chain.last() {
            Some(top) if top.is_empty() => 0,
            Some(top) => top.len() + 1,
            None => {
                self.implied_dir(Vec::new())?;
                0
            }
        };
        while let Some(slash) = path[at..].iter().position(|&b| b == b'/') {
            self.implied_dir(path[..at + slash].to_vec())?;
            at += slash + 1;
        }
        Ok(())
    }

    fn implied_dir(&mut self, dir: Vec<u8>) -> Result<(), Way> {
        let shown = crate::sender::display(&dir);
        let item = match ScanItem::beneath(&self.root, &dir, self.xattrs) {
            Ok(Some(item)) if item.entry.kind == EntryKind::Dir => item,
            // The path beneath it was there a moment ago: something moved.
            Ok(_) => return Err(Way::Problem(format!("{shown}: vanished during the scan"))),
            Err(e) => return Err(Way::Problem(public(e, &shown))),
        };
        self.chain.push(dir);
        self.send(item, true).map_err(Way::Stop)
    }

    /// A listed directory and everything beneath it, as the whole walk would list them.
    fn subtree(&mut self, dir: &[u8]) -> Result<(), Stop> {
        let walker = match Walker::subtree(&self.root, dir, self.filter.clone(), self.xattrs) {
            Ok(w) => w,
            Err(e) => {
                let shown = crate::sender::display(dir);
                return self.problem(dir.to_vec(), public(e, &shown));
            }
        };
        for item in walker {
            match item {
                Ok(item) => self.send(item, false)?,
                Err(e) => self.note(ScanMsg::Error(e))?,
            }
        }
        Ok(())
    }

    fn send(&mut self, item: ScanItem, implied: bool) -> Result<(), Stop> {
        if implied {
            self.implied.push(self.batch.len() as u32);
        }
        self.batch.push(item);
        if self.batch.len() >= LIST_BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// A message beside the batches, after the entries walked before it.
    fn note(&mut self, msg: ScanMsg) -> Result<(), Stop> {
        self.flush()?;
        self.tx.blocking_send(msg).map_err(|_| Stop::Closed)
    }

    fn flush(&mut self) -> Result<(), Stop> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::replace(&mut self.batch, Vec::with_capacity(LIST_BATCH));
        let implied = std::mem::take(&mut self.implied);
        self.tx
            .blocking_send(ScanMsg::Batch(batch, implied))
            .map_err(|_| Stop::Closed)
    }
}

/// An error about a listed path as the peer may read it: the path as listed (relative to the
/// source), not where the source is on this machine (a daemon's module).
fn public(e: FsError, shown: &str) -> String {
    match e {
        FsError::Unsupported { reason, .. } => format!("{shown}: {reason}"),
        FsError::Io { source, .. } => format!("{shown}: {source}"),
        other => format!("{shown}: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listed::PathList;
    use crate::sender::display;
    use std::path::Path;

    /// What the walk of `list` beneath `root` hands the main loop, in order: implied
    /// directories in parentheses, skipped paths as `missing:` or `refused:`.
    fn walk(root: &Path, list: &str, strict: bool) -> Vec<String> {
        let list = Arc::new(PathList::from_reader(list.as_bytes(), "L", false, 1 << 20).unwrap());
        let (tx, mut rx) = mpsc::channel(4);
        let root = Root::open(root).unwrap();
        let feed = Feed::Local(list.cursor());
        let walker =
            std::thread::spawn(move || scan(root, Arc::default(), false, strict, feed, tx));
        let mut out = Vec::new();
        while let Some(msg) = rx.blocking_recv() {
            match msg {
                ScanMsg::Batch(items, implied) => {
                    for (i, item) in items.iter().enumerate() {
                        let p = display(&item.entry.path);
                        let implied = implied.contains(&(i as u32));
                        out.push(if implied { format!("({p})") } else { p });
                    }
                }
                ScanMsg::Listed { path, missing, .. } => {
                    let what = if missing { "missing" } else { "refused" };
                    out.push(format!("{what}:{}", display(&path)));
                }
                ScanMsg::Fatal(why) => out.push(format!("fatal:{why}")),
                ScanMsg::Error(e) => out.push(format!("error:{e}")),
            }
        }
        walker.join().unwrap();
        out
    }

    #[test]
    fn each_entry_once_in_walk_order_with_the_directories_on_the_way_implied() {
        let t = tempfile::tempdir().unwrap();
        let r = t.path();
        for f in ["a/b/f", "a/b/g", "a/c/x", "a/c/y/z", "e"] {
            std::fs::create_dir_all(r.join(f).parent().unwrap()).unwrap();
            std::fs::write(r.join(f), f).unwrap();
        }
        std::os::unix::fs::symlink("a", r.join("lnk")).unwrap();
        let list = "e\na/c\na/b/f\na/c/y/z\nnope\nlnk\nlnk/b\n";
        let expected = [
            "(.)",
            "(a)",
            "(a/b)",
            "a/b/f",
            "a/c",
            "a/c/x",
            "a/c/y",
            "a/c/y/z",
            "e",
            "lnk",
            "refused:lnk/b",
            "missing:nope",
        ];
        assert_eq!(walk(r, list, false), expected);
        let strict = walk(r, list, true);
        assert_eq!(strict[..11], expected[..11]);
        assert!(
            strict[11].starts_with("fatal:nope: listed in --files-from"),
            "{strict:?}"
        );
        assert_eq!(strict.len(), 12);
        // "." is the whole source: nothing implied, nothing twice.
        assert_eq!(walk(r, ".\ne\na/b\n", false).len(), 11);
        assert_eq!(walk(r, "", false), ["(.)"]);
    }
}
