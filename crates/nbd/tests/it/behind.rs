//! Write-behind with a real client (nbdsh): a WRITE without FUA is answered before the
//! backend has made it, and what the protocol promises still holds: a read sent after the
//! reply sees the write, a FLUSH (on any connection) returns only once it is made, a
//! failure is reported by the next FLUSH, and an observer that must see the write made
//! before the reply (replication protocol C) gets that.
//!
//! The backend holds every write until the test opens its gate, so "answered before it was
//! made" is seen, not timed: the client leaves a marker file after each step.

use crate::common::*;
use nbd::{Allocation, Backend, Export, WriteEvent, WriteObserver};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A memory backend whose writes wait for the gate, and fail at `fail_at`.
struct Gated {
    mem: MemBackend,
    open: Mutex<bool>,
    opened: Condvar,
    made: AtomicUsize,
    fail_at: Option<u64>,
}

impl Gated {
    fn new(size: u64, open: bool, fail_at: Option<u64>) -> Arc<Gated> {
        Arc::new(Gated {
            mem: MemBackend::new(size),
            open: Mutex::new(open),
            opened: Condvar::new(),
            made: AtomicUsize::new(0),
            fail_at,
        })
    }

    fn open_gate(&self) {
        *self.open.lock().unwrap() = true;
        self.opened.notify_all();
    }
}

impl Backend for Gated {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.mem.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
        drop(open);
        if self.fail_at == Some(offset) {
            return Err(io::Error::from_raw_os_error(5));
        }
        self.mem.write_at(buf, offset)?;
        self.made.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn flush_covers_all_connections(&self) -> bool {
        true
    }
    fn allocation(&self, offset: u64, length: u64, max: usize) -> io::Result<Vec<Allocation>> {
        self.mem.allocation(offset, length, max)
    }
}

/// An observer that holds replies until `after_write` (as protocol C replication does).
struct WaitsForPeer;

impl WriteObserver for WaitsForPeer {
    fn before_write(&self, _: &WriteEvent<'_>) -> io::Result<()> {
        Ok(())
    }
    fn after_write(&self, _: &WriteEvent<'_>, _: &io::Result<()>) {}
    fn may_answer_early(&self) -> bool {
        false
    }
}

/// Runs `body` in nbdsh (with `uri`, `mark(name)` and `nbd`) on its own thread.
fn client(uri: String, marks: &Path, body: &str) -> std::thread::JoinHandle<()> {
    let body = format!(
        "import os\ndef mark(name):\n    open(os.path.join({marks:?}, name), 'w').close()\n{body}"
    );
    std::thread::spawn(move || {
        let full = format!("uri = {uri:?}\nimport errno\n{body}\nprint('script done')\n");
        let out = run(&mut nbdsh(&full));
        assert!(stdout(&out).contains("script done"), "{}", stdout(&out));
    })
}

/// Wait until the marker `name` exists; false after `limit`.
fn marked(marks: &Path, name: &str, limit: Duration) -> bool {
    let started = Instant::now();
    while !marks.join(name).exists() {
        if started.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

fn start(backend: &Arc<Gated>, observer: Option<Arc<dyn WriteObserver>>) -> (TestServer, PathBuf) {
    let mut export = Export::new("disk", backend.clone());
    export.observer = observer;
    let server = TestServer::start(vec![export]);
    let marks = server.socket.with_file_name("marks");
    std::fs::create_dir_all(&marks).unwrap();
    (server, marks)
}

/// Runs `body` in a client against a backend that holds every write: the client must
/// mark `answered` (and each of `before`) while the write is held, and must not mark `after`
/// until the gate opens (`why` says what that would mean). Returns the backend.
fn held(body: &str, before: &[&str], after: &str, why: &str) -> Arc<Gated> {
    let backend = Gated::new(1 << 20, false, None);
    let (server, marks) = start(&backend, None);
    let c = client(server.uri("disk"), &marks, body);
    for m in ["answered"].iter().chain(before) {
        assert!(
            marked(&marks, m, Duration::from_secs(30)),
            "no {m:?} while the backend held the write"
        );
    }
    assert_eq!(
        backend.made.load(Ordering::SeqCst),
        0,
        "made before the gate opened"
    );
    assert!(!marked(&marks, after, Duration::from_millis(300)), "{why}");
    backend.open_gate();
    c.join().expect("client");
    assert!(marks.join(after).exists());
    backend
}

#[test]
fn a_write_is_answered_before_it_is_made_and_a_flush_on_another_connection_waits_for_it() {
    let backend = held(
        r#"
h.connect_uri(uri)
h.pwrite(b"\xab" * 65536, 0)
mark("answered")
other = nbd.NBD()
other.connect_uri(uri)
assert other.can_multi_conn()
other.flush()
mark("flushed")
"#,
        &[],
        "flushed",
        "the flush returned before the write it covers was made",
    );
    assert_eq!(backend.made.load(Ordering::SeqCst), 1);
    let mut back = vec![0u8; 65536];
    backend.mem.read_at(&mut back, 0).unwrap();
    assert!(back.iter().all(|&b| b == 0xab));
}

#[test]
fn a_read_sent_after_the_reply_sees_the_write_and_reads_elsewhere_do_not_wait() {
    held(
        r#"
h.connect_uri(uri)
h.pwrite(b"\xcd" * 8192, 4096)
mark("answered")
assert h.pread(4096, 65536) == b"\x00" * 4096
mark("elsewhere")
assert h.pread(4096, 8192) == b"\xcd" * 4096
mark("read")
"#,
        &["elsewhere"],
        "read",
        "the read returned before the write it overlaps was made",
    );
}

#[test]
fn a_failed_write_done_behind_fails_the_next_flush_once() {
    let backend = Gated::new(1 << 20, true, Some(65536));
    let (server, marks) = start(&backend, None);
    client(
        server.uri("disk"),
        &marks,
        r#"
h.connect_uri(uri)
h.pwrite(b"\x01" * 4096, 65536)
try:
    h.flush()
    raise AssertionError("the flush after a failed write succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EIO, e
h.flush()
h.pwrite(b"\x02" * 4096, 0)
h.flush()
"#,
    )
    .join()
    .expect("client");
}

#[test]
fn an_observer_that_waits_for_its_peer_gets_the_reply_after_the_write() {
    let backend = Gated::new(1 << 20, false, None);
    let (server, marks) = start(&backend, Some(Arc::new(WaitsForPeer)));
    let c = client(
        server.uri("disk"),
        &marks,
        r#"
h.connect_uri(uri)
h.pwrite(b"\xef" * 4096, 0)
mark("answered")
"#,
    );
    assert!(
        !marked(&marks, "answered", Duration::from_millis(500)),
        "answered before the write was made, though the observer forbids it"
    );
    backend.open_gate();
    c.join().expect("client");
    assert_eq!(backend.made.load(Ordering::SeqCst), 1);
}
