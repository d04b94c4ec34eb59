//! Metadata: permission bits (setuid, 000), nanosecond mtimes, symlinks of every kind (copied
//! as links, never followed), hard links, sparse files, empty directories and their mtimes,
//! extended attributes, and ownership (as root).

use crate::util::*;
use std::fs::{File, FileTimes};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn at(secs: u64, nanos: u32) -> SystemTime {
    UNIX_EPOCH + Duration::new(secs, nanos)
}

fn set_mtime(p: &Path, t: SystemTime) {
    File::open(p)
        .unwrap()
        .set_times(FileTimes::new().set_modified(t).set_accessed(t))
        .unwrap();
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn permission_bits_including_setuid_and_000_are_preserved() {
    let t = tmp();
    let src = t.path().join("src");
    let cases = [
        ("setuid", 0o4755),
        ("setgid", 0o2750),
        ("sticky_dir", 0o1777),
        ("none", 0o000),
        ("ro", 0o444),
        ("private", 0o600),
        ("exec", 0o711),
    ];
    for (name, m) in cases {
        let p = src.join(name);
        if name.ends_with("_dir") {
            std::fs::create_dir_all(&p).unwrap();
        } else {
            write(&p, format!("{name}\n"));
        }
        chmod(&p, m);
    }
    let dst = t.path().join("dst");
    sync(&[&slash(&src), &slash(&dst)]).ok();
    for (name, m) in cases {
        assert_eq!(
            mode(&dst.join(name)),
            m,
            "{name}: mode {:o}",
            mode(&dst.join(name))
        );
    }
    assert_eq!(std::fs::read(dst.join("none")).unwrap(), b"none\n");
    assert_same(&src, &dst);
}

#[test]
fn mtimes_are_preserved_to_the_nanosecond() {
    let t = tmp();
    let src = t.path().join("src");
    let stamps = [
        ("a", at(1_600_000_000, 123_456_789)),
        ("b", at(1_000_000_000, 1)),
        ("c", at(1_700_000_000, 999_999_999)),
        ("big", at(1_650_000_000, 555_000_111)),
    ];
    for (name, _) in &stamps[..3] {
        write(&src.join(name), format!("{name}\n"));
    }
    write(&src.join("big"), random_bytes(4, 3 << 20));
    for (name, ts) in stamps {
        set_mtime(&src.join(name), ts);
    }
    let dst = t.path().join("dst");
    sync(&[&slash(&src), &slash(&dst)]).ok();
    for (name, ts) in stamps {
        let got = std::fs::metadata(dst.join(name))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(got, ts, "{name}");
    }
    assert_same(&src, &dst);
}

#[test]
fn symlinks_are_copied_as_links_and_never_followed() {
    let t = tmp();
    let src = t.path().join("src");
    let outside = t.path().join("outside");
    write(&outside.join("secret.txt"), "must not be copied\n");
    write(&src.join("real.txt"), "real\n");
    write(&src.join("dir/inner.txt"), "inner\n");
    let links: [(&str, String); 6] = [
        ("rel", "real.txt".into()),
        ("dir/up", "../real.txt".into()),
        ("abs_file", s(&outside.join("secret.txt")).into()),
        ("abs_dir", s(&outside).into()),
        ("dangling", "no/such/target".into()),
        ("to_dir", "dir".into()),
    ];
    for (name, target) in &links {
        std::os::unix::fs::symlink(target, src.join(name)).unwrap();
    }
    let dst = t.path().join("dst");
    sync(&[&slash(&src), &slash(&dst)]).ok();
    for (name, target) in &links {
        let p = dst.join(name);
        let md = std::fs::symlink_metadata(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(md.file_type().is_symlink(), "{name} is not a symlink");
        assert_eq!(std::fs::read_link(&p).unwrap(), Path::new(target), "{name}");
    }
    // Nothing was copied through a link.
    let snap = snapshot(&dst);
    assert!(
        !snap.keys().any(|k| k.to_string_lossy().contains("secret")),
        "a symlink was followed: {snap:?}"
    );
    assert_eq!(
        snap.len(),
        snapshot(&src).len(),
        "{snap:?} vs {:?}",
        snapshot(&src)
    );
    assert_same(&src, &dst);
}

#[test]
fn hard_links_are_preserved_with_h() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("a"), random_bytes(5, 300_000));
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::hard_link(src.join("a"), src.join("b")).unwrap();
    std::fs::hard_link(src.join("a"), src.join("sub/c")).unwrap();
    write(&src.join("lonely"), "single\n");
    write(&src.join("s1"), "small\n");
    std::fs::hard_link(src.join("s1"), src.join("sub/s2")).unwrap();
    let dst = t.path().join("dst");
    sync(&["-H", &slash(&src), &slash(&dst)]).ok();
    let ino = |p: &str| std::fs::metadata(dst.join(p)).unwrap().ino();
    assert_eq!(ino("a"), ino("b"));
    assert_eq!(ino("a"), ino("sub/c"));
    assert_eq!(ino("s1"), ino("sub/s2"));
    assert_ne!(ino("a"), ino("s1"));
    assert_eq!(std::fs::metadata(dst.join("a")).unwrap().nlink(), 3);
    assert_eq!(std::fs::metadata(dst.join("lonely")).unwrap().nlink(), 1);
    assert_same(&src, &dst);
}

/// A 64 MiB file with two small written regions.
fn sparse_source(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::FileExt;
    let p = dir.join("sparse.img");
    std::fs::create_dir_all(dir).unwrap();
    let f = File::create(&p).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(&random_bytes(6, 4096), 5 << 20).unwrap();
    f.write_all_at(&random_bytes(7, 100), (40 << 20) + 12345)
        .unwrap();
    drop(f);
    p
}

fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn sparse_file_keeps_its_holes() {
    let t = tmp();
    let src = t.path().join("src");
    sparse_source(&src);
    let dst = t.path().join("dst");
    sync(&[&slash(&src), &slash(&dst)]).ok();
    assert_same(&src, &dst);
    let got = allocated(&dst.join("sparse.img"));
    // Holes survive at least at the 1 MiB segment granularity (2 touched segments).
    assert!(got <= 2 << 20, "64 MiB sparse file allocates {got} bytes");
}

#[test]

fn sparse_file_allocates_less_than_a_mebibyte() {
    let t = tmp();
    let src = t.path().join("src");
    sparse_source(&src);
    let dst = t.path().join("dst");
    sync(&[&slash(&src), &slash(&dst)]).ok();
    assert_same(&src, &dst);
    let got = allocated(&dst.join("sparse.img"));
    assert!(
        got < 1 << 20,
        "64 MiB sparse file allocates {got} bytes on the destination"
    );
}

#[test]
fn empty_dirs_and_directory_mtimes_are_preserved() {
    let t = tmp();
    let src = t.path().join("src");
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::fs::create_dir_all(src.join("a/b/empty_too")).unwrap();
    write(&src.join("a/b/file"), "x\n");
    write(&src.join("a/file"), "y\n");
    let dirs = [
        ("empty", at(1_500_000_000, 11)),
        ("a/b/empty_too", at(1_500_000_100, 22)),
        ("a/b", at(1_500_000_200, 33)),
        ("a", at(1_500_000_300, 44)),
        ("", at(1_500_000_400, 55)),
    ];
    for (d, ts) in dirs {
        set_mtime(&src.join(d), ts);
    }
    let dst = t.path().join("dst");
    sync(&[&slash(&src), &slash(&dst)]).ok();
    for (d, ts) in dirs {
        let p = dst.join(d);
        assert!(p.is_dir(), "{d:?} missing");
        assert_eq!(
            std::fs::metadata(&p).unwrap().modified().unwrap(),
            ts,
            "{d:?}"
        );
    }
    assert_eq!(std::fs::read_dir(dst.join("empty")).unwrap().count(), 0);
    assert_same(&src, &dst);
}

fn set_xattr(p: &Path, name: &str, value: &[u8]) -> std::io::Result<()> {
    rustix::fs::setxattr(p, name, value, rustix::fs::XattrFlags::empty()).map_err(Into::into)
}

fn get_xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = [0u8; 256];
    rustix::fs::getxattr(p, name, &mut buf[..])
        .ok()
        .map(|n| buf[..n].to_vec())
}

#[test]
fn xattrs_are_copied_with_x() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("f"), "with xattr\n");
    write(&src.join("big"), random_bytes(8, 2 << 20));
    std::fs::create_dir_all(src.join("d")).unwrap();
    if let Err(e) = set_xattr(&src.join("f"), "user.test", b"value") {
        println!(
            "NOTE: skipping the xattr test: {} rejects user xattrs ({e})",
            t.path().display()
        );
        return;
    }
    set_xattr(&src.join("big"), "user.big", b"large file attr").unwrap();
    set_xattr(&src.join("d"), "user.dir", b"on a dir").unwrap();
    let dst = t.path().join("dst");
    sync(&["-X", &slash(&src), &slash(&dst)]).ok();
    assert_eq!(
        get_xattr(&dst.join("f"), "user.test").as_deref(),
        Some(&b"value"[..])
    );
    assert_eq!(
        get_xattr(&dst.join("big"), "user.big").as_deref(),
        Some(&b"large file attr"[..])
    );
    assert_eq!(
        get_xattr(&dst.join("d"), "user.dir").as_deref(),
        Some(&b"on a dir"[..])
    );
    assert_same(&src, &dst);

    // A changed value alone is synced too (metadata only).
    set_xattr(&src.join("f"), "user.test", b"other").unwrap();
    let out = sync_json(&["-X", &slash(&src), &slash(&dst)]);
    out.ok();
    assert_eq!(
        get_xattr(&dst.join("f"), "user.test").as_deref(),
        Some(&b"other"[..])
    );
    assert_same(&src, &dst);
}

#[test]
fn ownership_is_preserved_as_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "the integration tests must run as root"
    );
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("owned"), "mine\n");
    write(&src.join("sub/also"), random_bytes(9, 400_000));
    std::os::unix::fs::symlink("owned", src.join("link")).unwrap();
    std::os::unix::fs::chown(src.join("owned"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::chown(src.join("sub"), Some(4321), Some(8765)).unwrap();
    std::os::unix::fs::chown(src.join("sub/also"), Some(1234), Some(0)).unwrap();
    std::os::unix::fs::lchown(src.join("link"), Some(777), Some(888)).unwrap();
    let dst = t.path().join("dst");
    sync(&[&slash(&src), &slash(&dst)]).ok();
    let own = |p: &str| {
        let m = std::fs::symlink_metadata(dst.join(p)).unwrap();
        (m.uid(), m.gid())
    };
    assert_eq!(own("owned"), (1234, 5678));
    assert_eq!(own("sub"), (4321, 8765));
    assert_eq!(own("sub/also"), (1234, 0));
    assert_eq!(own("link"), (777, 888));
    assert_same(&src, &dst);
}

#[test]
fn all_metadata_survives_a_daemon_push_and_pull() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("setuid"), "s\n");
    chmod(&src.join("setuid"), 0o4755);
    write(&src.join("none"), "n\n");
    chmod(&src.join("none"), 0o000);
    write(&src.join("h1"), random_bytes(10, 50_000));
    std::fs::hard_link(src.join("h1"), src.join("h2")).unwrap();
    std::os::unix::fs::symlink("h1", src.join("rel")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/x", src.join("dangling")).unwrap();
    std::fs::create_dir_all(src.join("empty")).unwrap();
    std::os::unix::fs::chown(src.join("h1"), Some(1234), Some(5678)).unwrap();
    let _ = set_xattr(&src.join("h1"), "user.test", b"value");
    set_mtime(&src.join("none"), at(1_234_567_890, 987_654_321));
    set_mtime(&src.join("empty"), at(1_234_567_000, 5));
    let module = t.path().join("module");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    sync(&["-H", "-X", &slash(&src), &d.url("m/pushed/")]).ok();
    assert_same(&src, &module.join("pushed"));
    let back = t.path().join("back");
    sync(&["-H", "-X", &d.url("m/pushed/"), &slash(&back)]).ok();
    assert_same(&src, &back);
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    assert_eq!(ino(&back.join("h1")), ino(&back.join("h2")));
}

#[test]
fn fifos_are_created_not_read() {
    let t = tmp();
    let src = t.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        src.join("pipe"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o640),
        0,
    )
    .expect("mkfifo");
    write(&src.join("plain"), b"x");
    let dst = t.path().join("dst");
    // Reading a FIFO with no writer would block forever: the sync must finish.
    sync(&[&slash(&src), &slash(&dst)]).ok();
    let md = std::fs::symlink_metadata(dst.join("pipe")).expect("fifo copied");
    assert!(std::os::unix::fs::FileTypeExt::is_fifo(&md.file_type()));
    assert_same(&src, &dst);
}
