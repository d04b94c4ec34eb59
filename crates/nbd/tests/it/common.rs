//! Shared by the integration tests: an in-process server on a Unix socket in a temp dir
//! (its own tokio runtime, so tests can run client processes with plain blocking calls),
//! an in-memory backend with guard bytes past the export's end, a test dirty map that is
//! both a `WriteObserver` and the `cutover:dirty` `MetaContext`, and helpers to run the
//! real clients.

use nbd::{Allocation, Backend, Export, Extent, MetaContext, WriteEvent, WriteKind, WriteObserver};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A server running `exports` on `<tempdir>/nbd.sock` until dropped.
pub struct TestServer {
    _dir: tempfile::TempDir,
    pub socket: PathBuf,
    /// Connections accepted so far.
    pub connections: Arc<AtomicUsize>,
    rt: Option<tokio::runtime::Runtime>,
}

impl TestServer {
    pub fn start(exports: Vec<Export>) -> TestServer {
        Self::start_with(nbd::Server::new(exports))
    }

    pub fn start_with(server: nbd::Server) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("nbd.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let listener = {
            let _guard = rt.enter();
            tokio::net::UnixListener::bind(&socket).expect("bind")
        };
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        rt.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let server = server.clone();
                tokio::spawn(async move { server.serve_connection(stream).await });
            }
        });
        TestServer {
            _dir: dir,
            socket,
            connections,
            rt: Some(rt),
        }
    }

    /// The NBD URI of export `name` on this server.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///{name}?socket={}", self.socket.display())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}

/// Run a client; panic with its output unless it exits 0.
pub fn run(cmd: &mut Command) -> Output {
    let out = run_any(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Run a client and return its output whatever its exit status.
pub fn run_any(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e} (scripts/test installs it)"))
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `nbdsh -c SCRIPT`. nbdsh runs `python3 -m nbd`, so the system python (which has the
/// libnbd module) must come first on PATH, before any pyenv or venv python.
pub fn nbdsh(script: &str) -> Command {
    let mut c = Command::new("nbdsh");
    let path = std::env::var("PATH").unwrap_or_default();
    c.env("PATH", format!("/usr/bin:/bin:{path}"))
        .arg("-c")
        .arg(script);
    c
}

/// A sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = std::fs::File::create(path).expect("create");
    f.set_len(size).expect("set_len");
}

/// An export of a fresh sparse file `name.img` in `dir`, with the file's path.
pub fn file_export(dir: &Path, name: &str, size: u64) -> (Export, PathBuf) {
    let path = dir.join(format!("{name}.img"));
    sparse_file(&path, size);
    let backend = nbd::FileBackend::open(&path, false).expect("open");
    (Export::new(name, Arc::new(backend)), path)
}

/// An in-memory backend of `size` bytes followed by `GUARD` guard bytes: any access that
/// strays past `size` is recorded in `violations` (and would show in the guard bytes).
pub struct MemBackend {
    size: u64,
    data: Mutex<Vec<u8>>,
    pub violations: Mutex<Vec<String>>,
}

pub const GUARD: usize = 4096;
pub const GUARD_BYTE: u8 = 0x5a;

impl MemBackend {
    pub fn new(size: u64) -> MemBackend {
        let mut data = vec![0u8; size as usize + GUARD];
        data[size as usize..].fill(GUARD_BYTE);
        MemBackend {
            size,
            data: Mutex::new(data),
            violations: Mutex::new(Vec::new()),
        }
    }

    fn check(&self, what: &str, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => {
                self.violations
                    .lock()
                    .unwrap()
                    .push(format!("{what} at {offset} of {len} bytes"));
                Err(io::Error::other("out of range"))
            }
        }
    }

    pub fn guard_intact(&self) -> bool {
        self.data.lock().unwrap()[self.size as usize..]
            .iter()
            .all(|&b| b == GUARD_BYTE)
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check("read", offset, buf.len() as u64)?;
        let d = self.data.lock().unwrap();
        buf.copy_from_slice(&d[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check("write", offset, buf.len() as u64)?;
        let mut d = self.data.lock().unwrap();
        d[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, length: u64) -> io::Result<()> {
        self.check("trim", offset, length)
    }
    fn allocation(&self, offset: u64, length: u64, _max: usize) -> io::Result<Vec<Allocation>> {
        self.check("allocation", offset, length)?;
        Ok(vec![Allocation {
            length,
            hole: false,
        }])
    }
}

/// Dirty blocks of `BLOCK` bytes, marked by the observer before each write, shown as
/// `cutover:dirty` (flag 1 = dirty). Also checks that `before_write` really comes before
/// the data lands and `after_write` after (counting the writes seen early or late).
pub struct DirtyMap {
    backend: Arc<dyn Backend>,
    bits: Mutex<Vec<bool>>,
    pub events: Mutex<Vec<(&'static str, WriteKind, u64, u64)>>,
    pub out_of_order: Mutex<u32>,
    pub flushes: Mutex<u32>,
}

pub const BLOCK: u64 = 64 << 10;

impl DirtyMap {
    pub fn new(backend: Arc<dyn Backend>) -> Arc<DirtyMap> {
        let blocks = backend.size().div_ceil(BLOCK) as usize;
        Arc::new(DirtyMap {
            backend,
            bits: Mutex::new(vec![false; blocks]),
            events: Mutex::new(Vec::new()),
            out_of_order: Mutex::new(0),
            flushes: Mutex::new(0),
        })
    }

    /// Whether the backend already holds `data` at `offset`.
    fn holds(&self, data: &[u8], offset: u64) -> bool {
        let mut now = vec![0u8; data.len()];
        self.backend.read_at(&mut now, offset).is_ok() && now == data
    }
}

impl WriteObserver for DirtyMap {
    fn before_write(&self, w: &WriteEvent<'_>) -> io::Result<()> {
        if let Some(data) = w.data {
            if self.holds(data, w.offset) {
                *self.out_of_order.lock().unwrap() += 1;
            }
        }
        if w.length > 0 {
            let mut bits = self.bits.lock().unwrap();
            for b in w.offset / BLOCK..=(w.offset + w.length - 1) / BLOCK {
                bits[b as usize] = true;
            }
        }
        self.events
            .lock()
            .unwrap()
            .push(("before", w.kind, w.offset, w.length));
        Ok(())
    }

    fn after_write(&self, w: &WriteEvent<'_>, outcome: &io::Result<()>) {
        if let (Some(data), Ok(())) = (w.data, outcome) {
            if !self.holds(data, w.offset) {
                *self.out_of_order.lock().unwrap() += 1;
            }
        }
        self.events
            .lock()
            .unwrap()
            .push(("after", w.kind, w.offset, w.length));
    }

    fn flushed(&self) -> io::Result<()> {
        *self.flushes.lock().unwrap() += 1;
        Ok(())
    }
}

impl MetaContext for DirtyMap {
    fn name(&self) -> &str {
        "cutover:dirty"
    }

    fn extents(&self, offset: u64, length: u32, max: usize) -> io::Result<Vec<Extent>> {
        let bits = self.bits.lock().unwrap();
        let end = offset + u64::from(length);
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        while pos < end && out.len() < max {
            let block = pos / BLOCK;
            let stop = ((block + 1) * BLOCK).min(end);
            let flags = u32::from(bits[block as usize]);
            let n = (stop - pos) as u32;
            match out.last_mut() {
                Some(l) if l.flags == flags => l.length += n,
                _ => out.push(Extent { length: n, flags }),
            }
            pos = stop;
        }
        Ok(out)
    }
}
