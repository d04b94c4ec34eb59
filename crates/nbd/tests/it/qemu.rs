//! QEMU's clients against the server: `qemu-io` write patterns (plain, aio, zeroes with and
//! without unmap, discard, FUA, flush, unaligned) applied both over NBD and directly to a
//! reference raw file, then `qemu-img compare` of the two (and a byte comparison of the
//! export's backing file), pattern reads back over NBD, `qemu-img convert` in and out,
//! and `serve_tcp` on a loopback port.

use crate::common::*;
use std::process::Command;

const SIZE: u64 = 16 << 20;

/// The same commands for the export and the reference file.
const COMMANDS: &[&str] = &[
    "write -P 0xab 0 1M",
    "aio_write -P 0xcd 1M 512k",
    "aio_write -P 0xce 3M 256k",
    "aio_write -P 0xcf 3407872 4096",
    "aio_flush",
    "write -P 0x55 2M 1M",
    "write -z 2304k 256k",
    "write -z -u 2560k 128k",
    "discard 1M 64k",
    "write -f -P 0x77 5M 4k",
    "write -z -f 6M 64k",
    "write -P 0x99 7340035 1000",
    "writev -P 0x42 9M 4k 8k 512",
    "flush",
];

fn qemu_io(target: &str, commands: &[&str]) -> Command {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("raw");
    for cmd in commands {
        c.arg("-c").arg(cmd);
    }
    c.arg(target);
    c
}

#[test]
fn qemu_io_patterns_match_a_reference_image() {
    let dir = tempfile::tempdir().unwrap();
    let (mut export, backing) = file_export(dir.path(), "disk", SIZE);
    let dirty = DirtyMap::new(export.backend.clone());
    export.observer = Some(dirty.clone());
    let server = TestServer::start(vec![export]);
    let uri = server.uri("disk");

    let reference = dir.path().join("reference.img");
    sparse_file(&reference, SIZE);
    run(&mut qemu_io(reference.to_str().unwrap(), COMMANDS));
    run(&mut qemu_io(&uri, COMMANDS));

    run(Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&reference)
        .arg(&uri));
    assert!(
        std::fs::read(&backing).unwrap() == std::fs::read(&reference).unwrap(),
        "the export's backing file differs from the reference"
    );

    // Patterns read back over NBD (qemu-io verifies them and fails otherwise).
    run(&mut qemu_io(
        &uri,
        &[
            "read -P 0xab 0 1M",
            "read -P 0xcd 1114112 458752",
            "read -P 0 1M 64k",
            "read -P 0x55 2M 256k",
            "read -P 0 2304k 384k",
            "read -P 0x77 5M 4k",
            "read -P 0 6M 64k",
            "read -P 0x99 7340035 1000",
            "read -P 0x42 9M 12800",
            "aio_read -P 0xce 3M 256k",
        ],
    ));

    // The comparison can fail: change one byte of the export only.
    run(&mut qemu_io(&uri, &["write -P 0x01 15M 1"]));
    let out = run_any(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&reference)
            .arg(&uri),
    );
    assert_eq!(out.status.code(), Some(1), "compare should see the change");

    // Every write was announced before it landed and reported after.
    assert_eq!(*dirty.out_of_order.lock().unwrap(), 0);
    let events = dirty.events.lock().unwrap();
    let befores = events.iter().filter(|e| e.0 == "before").count();
    let afters = events.iter().filter(|e| e.0 == "after").count();
    assert_eq!(befores, afters);
    assert!(befores >= 13, "only {befores} writes observed");
    assert!(*dirty.flushes.lock().unwrap() >= 2);
}

#[test]
fn qemu_img_convert_in_and_out() {
    let dir = tempfile::tempdir().unwrap();
    let (export, _) = file_export(dir.path(), "disk", 4 << 20);
    let server = TestServer::start(vec![export]);
    let uri = server.uri("disk");

    let src = dir.path().join("src.img");
    sparse_file(&src, 4 << 20);
    run(&mut qemu_io(
        src.to_str().unwrap(),
        &["write -P 0x3c 0 300k", "write -P 0x3d 2M 1M"],
    ));
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&src)
        .arg(&uri));
    let out = dir.path().join("out.img");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&uri)
        .arg(&out));
    assert!(std::fs::read(&src).unwrap() == std::fs::read(&out).unwrap());
}

#[test]
fn serve_tcp_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let (export, backing) = file_export(dir.path(), "disk", 1 << 20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    rt.spawn(nbd::serve_tcp(listener, vec![export]));
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    run(&mut qemu_io(
        &uri,
        &["write -P 0x6b 4096 8192", "read -P 0x6b 4096 8192"],
    ));
    let data = std::fs::read(&backing).unwrap();
    assert!(data[4096..12288].iter().all(|&b| b == 0x6b));
    assert!(data[..4096].iter().chain(&data[12288..]).all(|&b| b == 0));
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
}
