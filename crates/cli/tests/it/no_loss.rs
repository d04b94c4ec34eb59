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

/// Start a rate-limited copy of `src/` into `dst/` and stop it with Ctrl-C once a partial
/// file has taken some data.
fn interrupted_copy(src: &Path, dst: &Path) {
    use std::time::{Duration, Instant};
    let client = spawn_sync(&["--bwlimit", "2M", &slash(src), &slash(dst)]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while partials_in(dst).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(600));
    client.signal(rustix::process::Signal::INT);
    client.wait().expect_code(130);
}

/// A partial file whose source is gone (Ctrl-C, then the source file deleted) is removed by
/// `--delete`; one whose source is still listed, or whose name is excluded, stays.
#[test]
fn delete_removes_partial_files_no_source_file_claims() {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["big", s(&src), "--count", "1", "--mb", "8"]);
    write(&src.join("keep.txt"), "keep\n");
    let dst = t.path().join("dst");
    interrupted_copy(&src, &dst);
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

/// Bytes a file takes on disk.
fn allocated(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// A 64 MiB image holding 640 KiB of data in ten places (a thin-provisioned disk).
fn sparse_image(p: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(p).unwrap();
    f.set_len(64 << 20).unwrap();
    for i in 0..10u64 {
        f.write_all_at(&random_bytes(i, 64 << 10), i * (6 << 20) + (1 << 20))
            .unwrap();
    }
}

/// Write `data` at `offset` of an existing file (an edit in place).
fn poke(p: &Path, offset: u64, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(data, offset).unwrap();
}

/// Replace `p` with `data`, leaving 4 KiB blocks of zeros as holes.
fn write_sparsely(p: &Path, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(p).unwrap();
    f.set_len(data.len() as u64).unwrap();
    for (i, block) in data.chunks(4096).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, i as u64 * 4096).unwrap();
        }
    }
}

/// The destination's copy takes about what the source's does (10%, plus 256 KiB for
/// file-system rounding), and has the same bytes.
fn assert_as_sparse(src: &Path, dst: &Path, what: &str) {
    let (a, b) = (allocated(src), allocated(dst));
    assert!(
        b <= a + a / 10 + (256 << 10),
        "{what}: {} takes {b} bytes on disk, the source {a}",
        dst.display()
    );
    assert_eq!(hash_file(src), hash_file(dst), "{what}: content differs");
}

/// Holes stay holes on every path: first copy, positional delta (same size), content-defined
/// delta (an insert changes the size), `--inplace`, a resumed partial, and through a daemon.
#[test]
fn sparse_files_stay_sparse_on_every_path() {
    let t = tmp();
    let src = t.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let img = src.join("disk.img");
    sparse_image(&img);
    let module = t.path().join("module");
    std::fs::create_dir(&module).unwrap();
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let local = t.path().join("dst");
    for (dst, url) in [
        (local.clone(), slash(&local)),
        (module.join("v"), d.url("m/v/")),
    ] {
        sparse_image(&img);
        let out = dst.join("disk.img");
        sync(&[&slash(&src), &url]).ok();
        assert_as_sparse(&img, &out, "first copy");
        poke(&img, 5 << 20, b"positional edit");
        sync(&[&slash(&src), &url]).ok();
        assert_as_sparse(&img, &out, "positional delta");
        // Grow by an insert in the middle: content-defined chunks.
        let mut data = std::fs::read(&img).unwrap();
        data.splice(3 << 20..3 << 20, random_bytes(7, 4096));
        write_sparsely(&img, &data);
        sync(&[&slash(&src), &url]).ok();
        assert_as_sparse(&img, &out, "content-defined delta");
        poke(&img, 9 << 20, b"in place");
        sync(&["--inplace", &slash(&src), &url]).ok();
        assert_as_sparse(&img, &out, "--inplace");
    }

    // Resume: a first copy interrupted, then finished from its partial.
    let fresh = t.path().join("resumed");
    let big = t.path().join("bigsrc");
    std::fs::create_dir(&big).unwrap();
    let bimg = big.join("disk.img");
    sparse_image(&bimg);
    poke(&bimg, 40 << 20, &random_bytes(99, 6 << 20));
    interrupted_copy(&big, &fresh);
    assert_eq!(partials_in(&fresh).len(), 1, "no partial to resume from");
    sync(&[&slash(&big), &slash(&fresh)]).ok();
    assert_as_sparse(&bimg, &fresh.join("disk.img"), "resume");
}

/// `-c` with nothing changed sends, counts and itemises nothing; a touched file is a metadata
/// change, an edited one a delta. Locally, pushed and pulled (a pull itemises on this side).
#[test]
fn checksum_counts_and_itemises_only_what_changed() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("small.txt"), "small\n");
    write(&src.join("big.bin"), random_bytes(3, 600_000));
    write(&src.join("other.bin"), random_bytes(4, 300_000));
    let module = t.path().join("module");
    std::fs::create_dir(&module).unwrap();
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let local = t.path().join("dst");
    let pulled = t.path().join("pulled");
    let runs = [
        (slash(&src), slash(&local), local.clone(), src.clone()),
        (slash(&src), d.url("m/c/"), module.join("c"), src.clone()),
        (
            d.url("m/c/"),
            slash(&pulled),
            pulled.clone(),
            module.join("c"),
        ),
    ];
    for (n, (from, to, dst, origin)) in runs.into_iter().enumerate() {
        sync(&[&from, &to]).ok();
        assert_same(&origin, &dst);
        let items = |out: &Out| -> Vec<(String, String)> {
            out.events("item")
                .iter()
                .map(|e| {
                    (
                        e["action"].as_str().unwrap().to_string(),
                        e["path"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        };
        let quiet = sync_json(&["-c", &from, &to]);
        quiet.ok();
        assert_eq!(items(&quiet), vec![], "{to}: nothing changed\n{quiet}");
        assert_eq!(quiet.stat("files_sent"), 0, "{to}\n{quiet}");
        // Metadata only.
        let t0 = std::time::SystemTime::UNIX_EPOCH
            + std::time::Duration::from_secs(1_000_000_000 + n as u64);
        let f = std::fs::File::options()
            .write(true)
            .open(origin.join("big.bin"))
            .unwrap();
        f.set_modified(t0).unwrap();
        let touched = sync_json(&["-c", &from, &to]);
        touched.ok();
        assert_eq!(
            items(&touched),
            vec![("meta".into(), "big.bin".into())],
            "{to}\n{touched}"
        );
        assert_eq!(touched.stat("files_sent"), 0, "{to}\n{touched}");
        assert_eq!(touched.stat("files_meta_only"), 1, "{to}\n{touched}");
        // Content.
        poke(
            &origin.join("other.bin"),
            1000,
            &random_bytes(n as u64 + 10, 100),
        );
        let edited = sync_json(&["-c", &from, &to]);
        edited.ok();
        assert_eq!(
            items(&edited),
            vec![("delta".into(), "other.bin".into())],
            "{to}\n{edited}"
        );
        assert_eq!(edited.stat("files_sent"), 1, "{to}\n{edited}");
        assert_same(&origin, &dst);
    }
}

/// Change time of every entry beneath `root` (a no-change pass must not move any).
fn ctimes(root: &Path) -> Vec<(String, i64, i64)> {
    snapshot(root)
        .keys()
        .map(|p| {
            let md = std::fs::symlink_metadata(root.join(p)).unwrap();
            (p.display().to_string(), md.ctime(), md.ctime_nsec())
        })
        .collect()
}

/// Found by the differential harness: a FIFO's new mode and mtime were never applied, nor a
/// FIFO put where a file stood; `--inplace` failed where a symlink or FIFO became a file; `-H`
/// could not put a link where a directory was; a no-change pass re-applied every directory's
/// metadata (moving its ctime).
#[test]
fn special_files_type_changes_and_no_change_passes() {
    let t = tmp();
    let src = t.path().join("src");
    let dst = t.path().join("dst");
    let fifo = |p: &Path| {
        rustix::fs::mkfifoat(rustix::fs::CWD, p, rustix::fs::Mode::from_raw_mode(0o644)).unwrap()
    };
    write(&src.join("d/sub/f"), "f\n");
    fifo(&src.join("p"));
    write(&src.join("becomes_fifo"), "a file\n");
    std::os::unix::fs::symlink("nowhere", src.join("link_then_file")).unwrap();
    fifo(&src.join("fifo_then_file"));
    std::fs::create_dir(src.join("dir_then_link")).unwrap();
    sync(&["-H", &slash(&src), &slash(&dst)]).ok();
    assert_same_with(&src, &dst, &["-H"]);
    // A pass with nothing changed moves no ctime, of directories either.
    let before = ctimes(&dst);
    std::thread::sleep(std::time::Duration::from_millis(20));
    let quiet = sync_json(&["-H", &slash(&src), &slash(&dst)]);
    quiet.ok();
    assert!(quiet.events("item").is_empty(), "{quiet}");
    assert_eq!(
        before,
        ctimes(&dst),
        "a no-change pass touched the destination"
    );

    chmod(&src.join("p"), 0o600);
    std::fs::remove_file(src.join("becomes_fifo")).unwrap();
    fifo(&src.join("becomes_fifo"));
    std::fs::remove_file(src.join("link_then_file")).unwrap();
    write(&src.join("link_then_file"), "now a file\n");
    std::fs::remove_file(src.join("fifo_then_file")).unwrap();
    write(&src.join("fifo_then_file"), "now a file too\n");
    std::fs::remove_dir(src.join("dir_then_link")).unwrap();
    std::fs::hard_link(src.join("d/sub/f"), src.join("dir_then_link")).unwrap();
    sync(&["-H", "--delete", "--inplace", &slash(&src), &slash(&dst)]).ok();
    assert_same_with(&src, &dst, &["-H", "--delete"]);
    assert_eq!(leftovers(&dst), Vec::<String>::new());
}

/// Found by the differential harness: with `-H`, a link the source broke stayed at the
/// destination, and the metadata of one name was applied to the object both shared.
#[test]
fn a_hard_link_the_source_broke_is_broken_at_the_destination() {
    let t = tmp();
    let src = t.path().join("src");
    let dst = t.path().join("dst");
    write(&src.join("f"), "data\n");
    std::fs::hard_link(src.join("f"), src.join("h")).unwrap();
    chmod(&src.join("f"), 0o640);
    sync(&["-H", &slash(&src), &slash(&dst)]).ok();
    assert_eq!(std::fs::metadata(dst.join("f")).unwrap().nlink(), 2);
    // `f` becomes a file of its own with other metadata; `h` keeps the old object.
    std::fs::copy(src.join("f"), src.join("t")).unwrap();
    let mtime = std::fs::metadata(src.join("f"))
        .unwrap()
        .modified()
        .unwrap();
    let t_file = std::fs::File::options()
        .write(true)
        .open(src.join("t"))
        .unwrap();
    t_file.set_modified(mtime).unwrap();
    chmod(&src.join("t"), 0o600);
    std::fs::rename(src.join("t"), src.join("f")).unwrap();
    sync(&["-H", &slash(&src), &slash(&dst)]).ok();
    assert_same_with(&src, &dst, &["-H"]);
    let (f, h) = (
        std::fs::metadata(dst.join("f")).unwrap(),
        std::fs::metadata(dst.join("h")).unwrap(),
    );
    assert_ne!(f.ino(), h.ino(), "the link the source broke is still there");
    assert_eq!((f.mode() & 0o777, h.mode() & 0o777), (0o600, 0o640));
}

/// A dry run says it is one in its report, in text and in `--json`.
#[test]
fn a_dry_run_says_so_in_its_report() {
    let t = tmp();
    let src = t.path().join("src");
    small_tree(&src);
    let dst = t.path().join("dst");
    let text = sync(&["-n", &slash(&src), &slash(&dst)]);
    text.ok();
    assert!(text.stdout.contains("dry run"), "{text}");
    let json = sync_json(&["-n", &slash(&src), &slash(&dst)]);
    json.ok();
    assert_eq!(json.summary()["dry_run"], true, "{json}");
    assert!(!dst.exists());
    let real = sync_json(&[&slash(&src), &slash(&dst)]);
    assert_eq!(real.summary()["dry_run"], false, "{real}");
}
