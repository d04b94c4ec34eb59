//! Nothing lost: paths a new user tried that destroyed or damaged data. Each test fails
//! without its fix: a file named as the destination of a tree, hard-link groups re-created
//! on every run, sparse files densified by a delta, partial files left forever.

use crate::util::*;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// A small tree to copy.
fn small_tree(src: &Path) {
    write(&src.join("a.txt"), "a\n");
    write(&src.join("d/b.txt"), "b\n");
}

/// `sync dir/ afile` refuses before writing anything: one line, exit 1, `afile` untouched,
/// nothing left beside it; the same for a FIFO or a symlink named as the destination, in a
/// dry run, a second run, and through a daemon in both directions.
#[test]
fn a_file_named_as_the_destination_of_a_tree_is_refused_and_kept() {
    let t = tmp();
    let src = t.path().join("src");
    small_tree(&src);
    let place = t.path().join("place");
    std::fs::create_dir(&place).unwrap();
    let afile = place.join("afile");
    write(&afile, "precious\n");
    let outside = t.path().join("outside.txt");
    write(&outside, "outside\n");
    let link = place.join("link");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let fifo = place.join("fifo");
    rustix::fs::mkfifoat(
        rustix::fs::CWD,
        &fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
    )
    .unwrap();
    let before = snapshot(&place);
    for dst in [&afile, &link, &fifo] {
        for args in [
            vec![slash(&src), s(dst).to_string()],
            vec![s(&src).to_string(), s(dst).to_string()],
            vec!["-n".to_string(), slash(&src), s(dst).to_string()],
        ] {
            // Twice: a second run once "succeeded" over what the first had left.
            for _ in 0..2 {
                let a: Vec<&str> = args.iter().map(String::as_str).collect();
                let out = sync(&a);
                out.expect_code(1);
                assert_one_line_error(&out, &[s(dst), "the source is a directory"]);
                assert_eq!(before, snapshot(&place), "{out}");
            }
        }
    }
    assert_eq!(std::fs::read(&outside).unwrap(), b"outside\n");

    // Push to a daemon whose module holds a file at the destination path.
    let module = t.path().join("module");
    write(&module.join("afile"), "precious\n");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let before_module = snapshot(&module);
    let out = sync(&[&slash(&src), &d.url("m/afile")]);
    out.expect_code(1);
    assert_one_line_error(&out, &["afile", "the source is a directory"]);
    assert_eq!(before_module, snapshot(&module));

    // Pull a module directory into a local file.
    let out = sync(&[&d.url("m/"), s(&afile)]);
    out.expect_code(1);
    assert_one_line_error(&out, &["afile", "the source is a directory"]);
    assert_eq!(before, snapshot(&place));
}

/// Whether any `.cutover.*` name is left anywhere beneath `root`.
pub fn leftovers(root: &Path) -> Vec<String> {
    snapshot(root)
        .keys()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".cutover."))
        })
        .map(|p| p.display().to_string())
        .collect()
}

/// Inode and link count of every regular file beneath `root`.
pub fn inodes(root: &Path) -> Vec<(String, u64, u64)> {
    snapshot(root)
        .keys()
        .filter_map(|p| {
            let md = std::fs::symlink_metadata(root.join(p)).ok()?;
            md.is_file()
                .then(|| (p.display().to_string(), md.ino(), md.nlink()))
        })
        .collect()
}

/// `-H`: a second run with nothing changed changes nothing (no item, same inodes and link
/// counts), and no `.cutover.*.tmp` link is left; a changed first name relinks the group.
/// Locally and through a daemon.
#[test]
fn hard_link_groups_are_left_alone_when_nothing_changed() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("a"), "hello\n");
    std::fs::hard_link(src.join("a"), src.join("b")).unwrap();
    std::fs::create_dir(src.join("sub")).unwrap();
    std::fs::hard_link(src.join("a"), src.join("sub/c")).unwrap();
    write(&src.join("x"), "x\n");
    let module = t.path().join("module");
    std::fs::create_dir(&module).unwrap();
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let local = t.path().join("dst");
    for (dst, url) in [
        (local.clone(), slash(&local)),
        (module.join("h"), d.url("m/h/")),
    ] {
        sync(&["-H", &slash(&src), &url]).ok();
        assert_same_with(&src, &dst, &["-H"]);
        let before = inodes(&dst);
        for _ in 0..2 {
            let again = sync_json(&["-H", "--delete", &slash(&src), &url]);
            again.ok();
            assert!(
                again.events("item").is_empty(),
                "a no-change run itemised\n{again}"
            );
            assert_eq!(
                before,
                inodes(&dst),
                "a no-change run touched the link group"
            );
            assert_eq!(leftovers(&dst), Vec::<String>::new());
        }
        assert_eq!(std::fs::metadata(dst.join("a")).unwrap().nlink(), 3);
        // A new version of the first name: the whole group follows it.
        write(&src.join("a"), "changed\n");
        std::fs::hard_link(src.join("a"), src.join("b2")).unwrap();
        std::fs::remove_file(src.join("b")).unwrap();
        std::fs::rename(src.join("b2"), src.join("b")).unwrap();
        std::fs::remove_file(src.join("sub/c")).unwrap();
        std::fs::hard_link(src.join("a"), src.join("sub/c")).unwrap();
        sync(&["-H", "--delete", &slash(&src), &url]).ok();
        assert_same_with(&src, &dst, &["-H"]);
        assert_eq!(std::fs::read(dst.join("sub/c")).unwrap(), b"changed\n");
        assert_eq!(std::fs::metadata(dst.join("a")).unwrap().nlink(), 3);
        assert_eq!(leftovers(&dst), Vec::<String>::new());
        write(&src.join("a"), "hello\n");
    }
}

/// A partial file whose source is gone (Ctrl-C, then the source file deleted) is removed by
/// `--delete`; one whose source is still listed, or whose name is excluded, stays.
#[test]
fn delete_removes_partial_files_no_source_file_claims() {
    use rustix::process::Signal;
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["big", s(&src), "--count", "1", "--mb", "8"]);
    write(&src.join("keep.txt"), "keep\n");
    let dst = t.path().join("dst");
    let client = spawn_sync(&["--bwlimit", "2M", &slash(&src), &slash(&dst)]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while partials_in(&dst).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    client.signal(Signal::INT);
    client.wait().expect_code(130);
    let left = partials_in(&dst);
    assert_eq!(
        left.len(),
        1,
        "the interrupted run should leave one partial"
    );
    // A stale partial of a name the source excludes is protected, as the file would be.
    let excluded = dst.join("excluded.bin");
    write(&excluded, "old\n");
    let protected = dst.join(cofs::partial::partial_name(std::ffi::OsStr::new(
        "excluded.bin",
    )));
    write(&protected, "partial of an excluded file\n");
    // The big file goes away at the source.
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() && p.file_name().unwrap() != "keep.txt" {
            std::fs::remove_file(p).unwrap();
        }
    }
    let out = sync(&[
        "--delete",
        "--exclude",
        "excluded.bin",
        &slash(&src),
        &slash(&dst),
    ]);
    out.ok();
    assert_same_with(&src, &dst, &["--exclude", "excluded.bin"]);
    assert!(!left[0].exists(), "the orphaned partial stayed\n{out}");
    assert!(
        protected.exists(),
        "the excluded file's partial was removed"
    );
    assert!(excluded.exists());
}
