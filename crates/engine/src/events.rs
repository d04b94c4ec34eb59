//! What the engine tells its caller: itemised events, live counters for progress bars, and
//! the final summary. The CLI decides how to draw them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// What happens to one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Send,
    Delta,
    Meta,
    Create,
    Delete,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Send => "send",
            Action::Delta => "delta",
            Action::Meta => "meta",
            Action::Create => "create",
            Action::Delete => "delete",
        }
    }
}

/// An entry's path below the transfer root, as the exact bytes of its name (which need not
/// be UTF-8); the root itself is ".". `Display` shows it lossily.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemPath(Vec<u8>);

impl ItemPath {
    pub fn new(rel: &[u8]) -> Self {
        ItemPath(if rel.is_empty() {
            b".".to_vec()
        } else {
            rel.to_vec()
        })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The path with bytes that are not UTF-8 replaced by U+FFFD.
    pub fn lossy(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }
}

impl std::fmt::Display for ItemPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

#[derive(Debug, Clone)]
pub enum Event {
    Item {
        path: ItemPath,
        action: Action,
        size: u64,
    },
    FileDone {
        path: String,
        literal: u64,
        copied: u64,
    },
    /// The source changed while it was read (or vanished): the copy is not consistent.
    Changed {
        path: String,
        reason: String,
    },
    Error {
        message: String,
    },
    /// A line about the pass as a whole, for the user (how a volume's pass is made).
    Note {
        message: String,
    },
    /// The session broke; the sync is opened again after `wait` and resumes.
    Retry {
        attempt: u32,
        wait: std::time::Duration,
        reason: String,
    },
}

pub trait Events: Send + Sync {
    fn event(&self, ev: Event);
}

/// Discards events (the daemon's side of a session).
pub struct NoEvents;

impl Events for NoEvents {
    fn event(&self, _: Event) {}
}

/// Live counters, read by progress bars while a pass runs.
#[derive(Debug, Default)]
pub struct Stats {
    pub entries_scanned: AtomicU64,
    pub files_to_send: AtomicU64,
    pub bytes_to_send: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_done: AtomicU64,
    pub literal_bytes: AtomicU64,
    pub copied_bytes: AtomicU64,
    /// Payload bytes the receiver reported as taken in (push), for auto connections.
    pub peer_received: AtomicU64,
    pub scan_done: std::sync::atomic::AtomicBool,
}

impl Stats {
    /// Start counting afresh, for a session that replaces one that broke: it scans and
    /// plans its work again, so totals and progress begin again too.
    pub fn reset(&self) {
        for c in [
            &self.entries_scanned,
            &self.files_to_send,
            &self.bytes_to_send,
            &self.files_done,
            &self.bytes_done,
            &self.literal_bytes,
            &self.copied_bytes,
            &self.peer_received,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        self.scan_done.store(false, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The end-of-pass report.
#[derive(Debug, Clone, Default)]
pub struct Summary {
    pub entries_scanned: u64,
    pub files_sent: u64,
    pub files_meta_only: u64,
    pub bytes_logical: u64,
    pub bytes_literal: u64,
    pub bytes_copied: u64,
    pub deleted: u64,
    pub delete_limit_hit: Option<u64>,
    pub errors: Vec<String>,
    pub changed: Vec<String>,
    /// Sessions that broke (reset, stalled) and were opened again before this one finished.
    pub reconnects: u32,
    /// Paths of the `--files-from` list that the source does not have (each reported as it
    /// was found, as a `Changed` event whose reason is `LISTED_MISSING`).
    pub files_from_missing: u64,
}

/// Collects the lists that end up in the summary.
#[derive(Default)]
pub(crate) struct Problems {
    pub errors: Mutex<Vec<String>>,
    pub changed: Mutex<Vec<String>>,
}

impl Problems {
    pub fn error(&self, events: &dyn Events, message: String) {
        events.event(Event::Error {
            message: message.clone(),
        });
        if let Ok(mut v) = self.errors.lock() {
            v.push(message);
        }
    }
    pub fn changed(&self, events: &dyn Events, path: String, reason: String) {
        events.event(Event::Changed {
            path: path.clone(),
            reason,
        });
        if let Ok(mut v) = self.changed.lock() {
            v.push(path);
        }
    }
    pub fn take(&self) -> (Vec<String>, Vec<String>) {
        let e = self
            .errors
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        let c = self
            .changed
            .lock()
            .map(|mut v| std::mem::take(&mut *v))
            .unwrap_or_default();
        (e, c)
    }
}
