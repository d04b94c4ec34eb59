//! libnbd's clients against the server: `nbdinfo` (`--list`; `--map` of `base:allocation`,
//! also checked against nbdkit's file plugin on the same file, and of a test
//! `cutover:dirty` context), `nbdcopy` in and out with several connections and many
//! requests in flight, and `nbdsh` scripts for negotiation edge cases, hole chunks in
//! structured reads, simple replies, NO_HOLE and fast zero, and errors that must not end
//! the connection.

use crate::common::*;
use nbd::Export;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// `nbdinfo --map[=CONTEXT] URI` as (offset, length, flags) rows.
fn map(uri: &str, context: Option<&str>) -> Vec<(u64, u64, u32)> {
    let arg = match context {
        Some(c) => format!("--map={c}"),
        None => "--map".to_string(),
    };
    parse_map(&stdout(&run(Command::new("nbdinfo").arg(arg).arg(uri))))
}

/// `nbdinfo --map` output as (offset, length, flags) rows.
fn parse_map(text: &str) -> Vec<(u64, u64, u32)> {
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect()
}

fn qemu_io(uri: &str, commands: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in commands {
        c.arg("-c").arg(cmd);
    }
    run(c.arg(uri));
}

#[test]
fn nbdinfo_lists_exports_and_their_features() {
    let dir = tempfile::tempdir().unwrap();
    let (mut a, _) = file_export(dir.path(), "alpha", 1 << 20);
    a.description = "the first volume".into();
    let (mut b, _) = file_export(dir.path(), "beta", 2 << 20);
    b.read_only = true;
    let server = TestServer::start(vec![a, b]);

    let out = stdout(&run(Command::new("nbdinfo")
        .arg("--list")
        .arg(server.uri(""))));
    assert!(out.contains("export=\"alpha\""), "{out}");
    assert!(out.contains("export=\"beta\""), "{out}");
    assert!(out.contains("description: the first volume"), "{out}");
    assert!(out.contains("export-size: 2097152"), "{out}");
    assert!(out.contains("block_size_maximum: 33554432"), "{out}");

    let out = stdout(&run(Command::new("nbdinfo").arg(server.uri("beta"))));
    assert!(out.contains("is_read_only: true"), "{out}");
    assert!(out.contains("can_trim: false"), "{out}");
    let out = stdout(&run(Command::new("nbdinfo").arg(server.uri("alpha"))));
    for want in [
        "is_read_only: false",
        "can_multi_conn: true",
        "can_fast_zero: true",
        "can_fua: true",
        "can_df: true",
        "base:allocation",
    ] {
        assert!(out.contains(want), "{want} missing from:\n{out}");
    }
}

#[test]
fn nbdinfo_map_shows_holes_and_dirty_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let (mut export, _) = file_export(dir.path(), "disk", 8 << 20);
    let dirty = DirtyMap::new(export.backend.clone());
    export.meta.push(dirty.clone());
    export.observer = Some(dirty.clone());
    let server = TestServer::start(vec![export]);
    let uri = server.uri("disk");

    // A fresh sparse file: one hole.
    assert_eq!(map(&uri, None), vec![(0, 8 << 20, 3)]);
    assert_eq!(map(&uri, Some("cutover:dirty")), vec![(0, 8 << 20, 0)]);

    qemu_io(
        &uri,
        &["write -P 1 0 2M", "discard 1M 512k", "write -P 2 5M 100"],
    );
    assert_eq!(
        map(&uri, None),
        vec![
            (0, 1 << 20, 0),
            (1 << 20, 512 << 10, 3),
            (1536 << 10, 512 << 10, 0),
            (2 << 20, 3 << 20, 3),
            (5 << 20, 4096, 0),
            ((5 << 20) + 4096, (3 << 20) - 4096, 3),
        ]
    );
    // Dirty: everything written or discarded, in 64 KiB blocks.
    assert_eq!(
        map(&uri, Some("cutover:dirty")),
        vec![
            (0, 2 << 20, 1),
            (2 << 20, 3 << 20, 0),
            (5 << 20, 64 << 10, 1),
            ((5 << 20) + (64 << 10), (3 << 20) - (64 << 10), 0),
        ]
    );
}

#[test]
fn nbdcopy_in_and_out_over_four_connections() {
    let dir = tempfile::tempdir().unwrap();
    let size = 24u64 << 20;
    let (mut export, backing) = file_export(dir.path(), "disk", size);
    let dirty = DirtyMap::new(export.backend.clone());
    export.observer = Some(dirty.clone());
    let server = TestServer::start(vec![export]);
    let uri = server.uri("disk");

    // A source with data, holes and zeroes, in pieces of varied size.
    let src = dir.path().join("src.img");
    let mut data = vec![0u8; size as usize];
    let mut x = 0x1234_5678u32;
    for (i, chunk) in data.chunks_mut(300 << 10).enumerate() {
        if i % 3 != 1 {
            for b in chunk.iter_mut() {
                x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                *b = (x >> 24) as u8;
            }
        }
    }
    std::fs::write(&src, &data).unwrap();

    run(Command::new("nbdcopy")
        .args([
            "--connections=4",
            "--threads=4",
            "--requests=16",
            "--request-size=262144",
            "--flush",
        ])
        .arg(&src)
        .arg(&uri));
    assert!(std::fs::read(&backing).unwrap() == data, "copy in differs");
    // nbdcopy opens several connections only when the server allows multi-conn.
    let n = server.connections.load(Ordering::SeqCst);
    assert!(n >= 4, "nbdcopy used {n} connection(s)");

    let out = dir.path().join("out.img");
    run(Command::new("nbdcopy")
        .args(["-C", "4", "-T", "4", "--requests=16"])
        .arg(&uri)
        .arg(&out));
    assert!(std::fs::read(&out).unwrap() == data, "copy out differs");
    assert_eq!(*dirty.out_of_order.lock().unwrap(), 0);
    assert!(*dirty.flushes.lock().unwrap() >= 1);
}

/// Run an nbdsh script with `uri` bound to the export's URI.
fn script(uri: &str, body: &str) {
    let full = format!("uri = {uri:?}\nimport errno\n{body}\nprint('script done')\n");
    let out = run(&mut nbdsh(&full));
    assert!(stdout(&out).contains("script done"), "{}", stdout(&out));
}

#[test]
fn nbdsh_negotiation_edge_cases() {
    let dir = tempfile::tempdir().unwrap();
    let (export, _) = file_export(dir.path(), "disk", 1 << 20);
    let server = TestServer::start(vec![export]);
    let uri = server.uri("disk");

    // STARTTLS is an option this server does not know: unsupported, and haggling goes on.
    script(
        &uri,
        r#"
h.set_tls(nbd.TLS_ALLOW)
h.connect_uri(uri)
assert not h.get_tls_negotiated()
assert h.get_size() == 1 << 20
h.shutdown()
"#,
    );
    // OPT_ABORT, then a new connection still works.
    script(
        &uri,
        r#"
h.set_opt_mode(True)
h.connect_uri(uri)
h.opt_abort()
assert h.aio_is_closed() or h.aio_is_dead()
h2 = nbd.NBD()
h2.connect_uri(uri)
assert h2.get_size() == 1 << 20
"#,
    );
    // OPT_INFO before OPT_GO; a wrong name is unknown and haggling goes on.
    script(
        &uri,
        r#"
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(uri)
h.set_export_name("nope")
try:
    h.opt_info()
    raise AssertionError("info of an unknown export succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOENT, e
h.set_export_name("disk")
h.opt_info()
assert h.get_size() == 1 << 20
assert h.get_canonical_export_name() == "disk"
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 << 20
try:
    h.set_export_name("nope")
    h.opt_go()
    raise AssertionError("go to an unknown export succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOENT, e
h.set_export_name("disk")
h.opt_go()
h.pwrite(b"x" * 512, 0)
assert h.pread(512, 0) == b"x" * 512
h.shutdown()
"#,
    );
    // The default export (empty name) is the first one; opt_list sees it.
    script(
        &uri,
        r#"
names = []
h.set_opt_mode(True)
h.connect_uri(uri)
h.opt_list(lambda name, desc: names.append(name))
assert names == ["disk"], names
h.set_export_name("")
h.opt_go()
assert h.get_size() == 1 << 20
"#,
    );
}

#[test]
fn nbdsh_errors_keep_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (export, _) = file_export(dir.path(), "disk", 1 << 20);
    let mem = Arc::new(MemBackend::new(256 << 10));
    let mut ro = Export::new("ro", mem.clone());
    ro.read_only = true;
    let server = TestServer::start(vec![export, ro, Export::new("mem", mem.clone())]);

    script(
        &server.uri("disk"),
        r#"
h.set_strict_mode(0)
h.connect_uri(uri)
size = h.get_size()
for (count, offset) in [(512, size - 256), (1, size), (4096, 1 << 62)]:
    try:
        h.pread(count, offset)
        raise AssertionError("read past the end succeeded")
    except nbd.Error as e:
        assert e.errnum == errno.EINVAL, e
try:
    h.pwrite(b"y" * 1024, size - 512)
    raise AssertionError("write past the end succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOSPC, e
try:
    h.pread(33 << 20, 0)
    raise AssertionError("oversize read succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
try:
    h.trim(4096, 0, nbd.CMD_FLAG_REQ_ONE)
    raise AssertionError("trim with a block status flag succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
h.pwrite(b"z" * 4096, size - 4096)
assert h.pread(4096, size - 4096) == b"z" * 4096
h.shutdown()
"#,
    );
    script(
        &server.uri("ro"),
        r#"
h.set_strict_mode(0)
h.connect_uri(uri)
assert h.is_read_only()
try:
    h.pwrite(b"w" * 512, 0)
    raise AssertionError("write to a read-only export succeeded")
except nbd.Error as e:
    assert e.errnum == errno.EPERM, e
assert h.pread(512, 0) == bytes(512)
"#,
    );
    // Zeroing a memory backend is never fast: FAST_ZERO fails with ENOTSUP and changes
    // nothing; without the flag it zeroes.
    script(
        &server.uri("mem"),
        r#"
h.connect_uri(uri)
assert h.can_fast_zero()
h.pwrite(b"\x07" * 8192, 0)
try:
    h.zero(8192, 0, nbd.CMD_FLAG_FAST_ZERO)
    raise AssertionError("fast zero on memory succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ENOTSUP, e
assert h.pread(8192, 0) == b"\x07" * 8192
h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE | nbd.CMD_FLAG_FUA)
assert h.pread(8192, 0) == bytes(4096) + b"\x07" * 4096
"#,
    );
    assert!(mem.violations.lock().unwrap().is_empty());
    assert!(mem.guard_intact());
}

#[test]
fn nbdsh_structured_reads_send_holes_and_simple_replies_work() {
    let dir = tempfile::tempdir().unwrap();
    let (export, _) = file_export(dir.path(), "disk", 4 << 20);
    let server = TestServer::start(vec![export]);
    let uri = server.uri("disk");

    script(
        &uri,
        r#"
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.get_structured_replies_negotiated()
h.pwrite(b"\x11" * 65536, 1 << 20)
h.pwrite(b"\x22" * 4096, 3 << 20)
chunks = []
def chunk(subbuf, offset, status, error):
    chunks.append((offset, len(subbuf), status))
    return 0
buf = h.pread_structured(4 << 20, 0, chunk)
assert buf[(1 << 20):(1 << 20) + 65536] == b"\x11" * 65536
assert buf[(3 << 20):(3 << 20) + 4096] == b"\x22" * 4096
chunks.sort()
assert chunks == [
    (0, 1 << 20, nbd.READ_HOLE),
    (1 << 20, 65536, nbd.READ_DATA),
    ((1 << 20) + 65536, (2 << 20) - 65536, nbd.READ_HOLE),
    (3 << 20, 4096, nbd.READ_DATA),
    ((3 << 20) + 4096, (1 << 20) - 4096, nbd.READ_HOLE),
], chunks
# Don't fragment: one data chunk with the zeroes in it.
chunks.clear()
buf = h.pread_structured(2 << 20, 0, chunk, nbd.CMD_FLAG_DF)
assert chunks == [(0, 2 << 20, nbd.READ_DATA)], chunks
assert buf[(1 << 20):(1 << 20) + 65536] == b"\x11" * 65536
# Block status with REQ_ONE: one extent, within the request.
seen = []
def extent(ctx, offset, entries, error):
    seen.append((ctx, list(entries)))
    return 0
h.block_status(4 << 20, 0, extent, nbd.CMD_FLAG_REQ_ONE)
assert seen == [("base:allocation", [1 << 20, 3])], seen
seen.clear()
h.block_status(1 << 20, 1 << 20, extent)
assert seen == [("base:allocation", [65536, 0, (1 << 20) - 65536, 3])], seen
h.shutdown()
"#,
    );
    script(
        &uri,
        r#"
h.set_request_structured_replies(False)
h.connect_uri(uri)
assert not h.get_structured_replies_negotiated()
assert not h.can_df()
assert h.pread(4096, 3 << 20) == b"\x22" * 4096
h.pwrite(b"\x33" * 512, 100)
h.zero(100, 200)
assert h.pread(612, 0) == bytes(100) + b"\x33" * 100 + bytes(100) + b"\x33" * 312
h.flush()
h.shutdown()
"#,
    );
}

#[test]
fn write_zeroes_honours_no_hole_and_trim_deallocates() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let (export, backing) = file_export(dir.path(), "disk", 4 << 20);
    let server = TestServer::start(vec![export]);
    let allocated = || std::fs::metadata(&backing).unwrap().blocks() * 512;

    // NO_HOLE: the range is allocated (and reads as zeroes).
    script(
        &server.uri("disk"),
        r#"
h.connect_uri(uri)
h.zero(1 << 20, 0, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(1 << 20, 0) == bytes(1 << 20)
h.flush()
"#,
    );
    assert!(
        allocated() >= 1 << 20,
        "NO_HOLE left {} bytes allocated",
        allocated()
    );

    // Without NO_HOLE, and TRIM: the range is deallocated again.
    script(
        &server.uri("disk"),
        r#"
h.connect_uri(uri)
h.pwrite(b"\x01" * (1 << 20), 2 << 20)
h.zero(512 << 10, 0)
h.trim(512 << 10, 512 << 10)
h.trim(1 << 20, 2 << 20)
assert h.pread(1 << 20, 0) == bytes(1 << 20)
h.flush()
"#,
    );
    assert!(
        allocated() < 64 << 10,
        "{} bytes still allocated",
        allocated()
    );
}

#[test]
fn allocation_map_agrees_with_nbdkit_file_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.img");
    sparse_file(&path, 8 << 20);
    qemu_io(
        path.to_str().unwrap(),
        &["write -P 1 1M 100k", "write -P 2 3M 4k", "write -P 3 7M 1M"],
    );
    let backend = nbd::FileBackend::open(&path, true).unwrap();
    let mut export = Export::new("disk", Arc::new(backend));
    export.read_only = true;
    let server = TestServer::start(vec![export]);
    let ours = map(&server.uri("disk"), None);

    let out = run(Command::new("nbdkit")
        .args(["-U", "-", "--readonly", "file"])
        .arg(&path)
        .args(["--run", "nbdinfo --map \"$uri\""]));
    let theirs = parse_map(&stdout(&out));
    assert_eq!(ours, theirs);
    assert_eq!(ours.len(), 6, "{ours:?}");
}

/// A graceful stop: after `drain`, a write is answered NBD_ESHUTDOWN (its payload read and
/// dropped, the connection kept), a flush still runs, and once the client disconnects the
/// server is idle. What was written before stays.
#[test]
fn a_draining_server_answers_eshutdown_serves_flush_and_goes_idle() {
    let dir = tempfile::tempdir().unwrap();
    let (export, path) = file_export(dir.path(), "disk", 1 << 20);
    let server = nbd::Server::new(vec![export]);
    let test = TestServer::start_with(server.clone());
    let ready = dir.path().join("connected");
    let go = dir.path().join("go");
    let body = format!(
        r#"
import os, time
h.connect_uri(uri)
h.pwrite(b"a" * 65536, 0)
open({ready:?}, "w").close()
while not os.path.exists({go:?}):
    time.sleep(0.01)
try:
    h.pwrite(b"b" * 65536, 65536)
    raise AssertionError("a write while draining succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ESHUTDOWN, e
try:
    h.pread(4096, 0)
    raise AssertionError("a read while draining succeeded")
except nbd.Error as e:
    assert e.errnum == errno.ESHUTDOWN, e
h.flush()
h.shutdown()
"#
    );
    let uri = test.uri("disk");
    let client = std::thread::spawn(move || script(&uri, &body));
    let started = std::time::Instant::now();
    while !ready.exists() {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "nbdsh never connected"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    // A connection is live: not idle yet.
    assert!(!rt.block_on(server.wait_idle(Duration::from_millis(100))));
    server.drain();
    std::fs::write(&go, b"").unwrap();
    client.join().expect("the nbdsh script failed");
    assert!(rt.block_on(server.wait_idle(Duration::from_secs(10))));
    let image = std::fs::read(&path).unwrap();
    assert!(image[..65536].iter().all(|&b| b == b'a'));
    assert!(image[65536..131072].iter().all(|&b| b == 0));
}
