//! Feeding the main loop from the source: a walker thread over the whole tree (or the
//! listed walk of `--files-from`), in batches of `LIST_BATCH` entries.

use super::*;

/// What the walk hands the main loop.
pub(crate) enum ScanMsg {
    /// Entries in walk order, with the indexes of implied directories (`--files-from`).
    Batch(Vec<ScanItem>, Vec<u32>),
    Error(cofs::FsError),
    /// A listed path that was not sent (`--files-from`): missing from the source, or refused.
    Listed {
        path: Vec<u8>,
        missing: bool,
        reason: String,
    },
    /// The walk cannot go on; the session ends with this error.
    Fatal(String),
}

/// Start feeding `scan_tx`: the listed walk with `--files-from` (which, in a pull, returns
/// the receiver's list to ask for), else a walker thread over the whole source.
pub(super) fn start_walk(
    source: &Source,
    opts: &SyncOptions,
    filter: Arc<Filter>,
    scan_tx: mpsc::Sender<ScanMsg>,
) -> Result<Option<RemoteList>, EngineError> {
    if opts.files_from {
        return listed::start(source, opts, filter, scan_tx);
    }
    let walker = Walker::new(&source.root, opts.copy_dir_itself, filter, opts.xattrs);
    let walker = match (walker, &source.jail) {
        (Ok(w), Some(jail)) => w.confined_to(jail),
        (w, _) => w,
    };
    let walker = walker?;
    let volume_root = source.changed.is_some();
    std::thread::spawn(move || scan(walker, scan_tx, volume_root));
    Ok(None)
}

/// `volume_root`: the root is a tracked volume's backing (`Source::changed`), listed as a
/// volume (written in place) even when it is an image file.
pub(super) fn scan(walker: Walker, tx: mpsc::Sender<ScanMsg>, volume_root: bool) {
    let mut batch = Vec::with_capacity(LIST_BATCH);
    let mut first = true;
    for item in walker {
        match item {
            Ok(mut i) => {
                if std::mem::take(&mut first) && volume_root && i.entry.kind == EntryKind::File {
                    i.entry.kind = EntryKind::Volume;
                }
                batch.push(i)
            }
            Err(e) => {
                if tx.blocking_send(ScanMsg::Error(e)).is_err() {
                    return;
                }
            }
        }
        if batch.len() >= LIST_BATCH {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(LIST_BATCH));
            if tx.blocking_send(ScanMsg::Batch(full, Vec::new())).is_err() {
                return;
            }
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(ScanMsg::Batch(batch, Vec::new()));
    }
}
