//! Write-behind: a WRITE without FUA is answered as soon as it is recorded (the observer's
//! `before_write` ran), and the backend writes it afterwards, as a disk with a volatile
//! cache does. The protocol allows it: only FUA and FLUSH promise durability, and a flush
//! covers every write answered before it.
//!
//! Why: clients that keep one write in flight (`qemu-img convert` writes in order, waiting
//! for each reply) otherwise pay the whole disk write per request on top of the socket
//! transfer, with the disk idle while the next payload crosses the socket. Answering first
//! overlaps the two (V1 in BENCH.md).
//!
//! What this module keeps per export: every write being done behind its reply, numbered in
//! the order the requests arrived. A request waits for the earlier ones whose range it
//! overlaps before it touches the backend (so a read or write sent after a reply sees that
//! write); a FLUSH waits for all earlier ones; the first failure of a write done behind is
//! kept and reported by the next FLUSH (the write's own reply has gone), as the kernel
//! reports a failed writeback at the next `fsync`.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard};

/// The writes of one export being done behind their replies. Shared by its connections.
#[derive(Debug, Default)]
pub(crate) struct Behind {
    state: Mutex<State>,
    done: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// Number of the next request that arrives.
    next: u64,
    /// Writes being done behind their replies: number -> (offset, length).
    running: BTreeMap<u64, (u64, u64)>,
    /// The first failure of such a write not reported yet.
    failed: Option<String>,
}

/// Where a request stands among the writes done behind: it waits for those numbered below
/// `before`; `own` is its number when it is such a write itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Ticket {
    pub(crate) before: u64,
    pub(crate) own: Option<u64>,
}

impl Behind {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves the map consistent (every change is one
        // call), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A request arrives (called by the connection's reader, in arrival order).
    /// `write_behind`: it is a write that may be answered early, whose range is
    /// `offset..offset + length`.
    pub(crate) fn arrive(&self, write_behind: Option<(u64, u64)>) -> Ticket {
        let mut st = self.state();
        let before = st.next;
        let own = write_behind.map(|range| {
            st.running.insert(before, range);
            st.next += 1;
            before
        });
        Ticket { before, own }
    }

    /// Wait until no write numbered below `before` and overlapping `offset..offset +
    /// length` is running.
    pub(crate) fn wait_overlapping(&self, before: u64, offset: u64, length: u64) {
        let end = offset.saturating_add(length.max(1));
        let mut st = self.state();
        while st
            .running
            .range(..before)
            .any(|(_, &(o, l))| o < end && o.saturating_add(l.max(1)) > offset)
        {
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Wait until every write numbered below `before` is done; then the first failure
    /// among the writes done behind that was not reported yet (it is reported once).
    pub(crate) fn wait_all(&self, before: u64) -> Option<String> {
        let mut st = self.state();
        while st.running.range(..before).next().is_some() {
            st = self.done.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.failed.take()
    }

    /// Write number `own` is done (or was never made: `failure` says why, if it failed).
    pub(crate) fn finish(&self, own: u64, failure: Option<String>) {
        let mut st = self.state();
        st.running.remove(&own);
        if st.failed.is_none() {
            st.failed = failure;
        }
        drop(st);
        self.done.notify_all();
    }

    /// Writes being done behind their replies now.
    #[cfg(test)]
    pub(crate) fn running(&self) -> usize {
        self.state().running.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_request_waits_only_for_earlier_overlapping_writes() {
        let b = Arc::new(Behind::default());
        let w0 = b.arrive(Some((0, 4096)));
        let w1 = b.arrive(Some((8192, 4096)));
        assert_eq!((w0.own, w1.own), (Some(0), Some(1)));
        let read = b.arrive(None);
        assert_eq!(
            read,
            Ticket {
                before: 2,
                own: None
            }
        );
        // Past both ranges: nothing to wait for.
        b.wait_overlapping(read.before, 4096, 4096);
        b.wait_overlapping(read.before, 1 << 20, 1);
        // A later write does not make an earlier request wait.
        b.wait_overlapping(w0.before, 0, 1 << 20);
        // Overlapping w1: waits until it is finished.
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.wait_overlapping(read.before, 10_000, 10))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "the read must wait for the write it overlaps"
        );
        b.finish(1, None);
        waiter.join().expect("waiter");
        assert_eq!(b.running(), 1);
    }

    #[test]
    fn a_flush_waits_for_all_earlier_writes_and_reports_a_failure_once() {
        let b = Arc::new(Behind::default());
        let w0 = b.arrive(Some((0, 4096)));
        let flush = b.arrive(None);
        let w2 = b.arrive(Some((1 << 20, 4096)));
        let waiter = {
            let b = b.clone();
            std::thread::spawn(move || b.wait_all(flush.before))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !waiter.is_finished(),
            "the flush must wait for the earlier write"
        );
        b.finish(w0.own.expect("own"), Some("write: disk full".into()));
        assert_eq!(
            waiter.join().expect("waiter").as_deref(),
            Some("write: disk full")
        );
        // w2 arrived after the flush: it is not waited for, and the failure was reported.
        assert_eq!(w2.own, Some(1));
        assert_eq!(b.wait_all(flush.before), None);
    }
}
