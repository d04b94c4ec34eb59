//! Local syncs: a whole mixed tree (checked by the rsync oracle), idempotence, and rsync's
//! trailing-slash rules for directories and single files.

use crate::util::*;

#[test]
fn local_sync_of_mixed_tree_matches_rsync_and_second_run_sends_nothing() {
    let t = tmp();
    let src = t.path().join("src");
    let dst = t.path().join("dst");
    mkdata(&["mixed", s(&src), "--scale", "0.002"]);
    let first = sync_json(&[&slash(&src), &slash(&dst)]);
    first.ok();
    assert!(first.stat("files_sent") > 100, "{first}");
    assert_eq!(first.stat("exit_code"), 0);
    assert_same(&src, &dst);

    let second = sync_json(&[&slash(&src), &slash(&dst)]);
    second.ok();
    let sum = second.summary();
    assert_eq!(sum["files_sent"], 0, "{second}");
    assert_eq!(sum["bytes_literal"], 0, "{second}");
    assert_eq!(
        sum["entries_scanned"],
        first.summary()["entries_scanned"],
        "{second}"
    );
    assert_same(&src, &dst);
}

fn small_tree(root: &std::path::Path) {
    write(&root.join("a.txt"), "alpha\n");
    write(&root.join("sub/b.txt"), "beta\n");
    write(&root.join("sub/deeper/c.bin"), random_bytes(3, 5000));
}

#[test]
fn source_without_slash_into_existing_dir_creates_dir_named_after_source() {
    let t = tmp();
    let src = t.path().join("src");
    small_tree(&src);
    let dst = t.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    sync(&[s(&src), &slash(&dst)]).ok();
    assert!(dst.join("src/sub/b.txt").is_file());
    assert!(
        !dst.join("a.txt").exists(),
        "contents must not land in dst itself"
    );
    assert_same(&src, &dst.join("src"));
}

#[test]

fn source_without_slash_into_missing_dir_creates_it_like_rsync() {
    let t = tmp();
    let src = t.path().join("src");
    small_tree(&src);
    let dst = t.path().join("dst");
    sync(&[s(&src), &slash(&dst)]).ok();
    assert!(dst.join("src/sub/b.txt").is_file());
    assert_same(&src, &dst.join("src"));
}

#[test]
fn source_with_slash_copies_contents() {
    let t = tmp();
    let src = t.path().join("src");
    small_tree(&src);
    let dst = t.path().join("dst");
    sync(&[&slash(&src), s(&dst)]).ok();
    assert!(dst.join("a.txt").is_file());
    assert!(!dst.join("src").exists());
    assert_same(&src, &dst);
}

#[test]
fn single_file_to_new_path_is_written_under_that_name() {
    let t = tmp();
    let f = t.path().join("one.txt");
    write(&f, random_bytes(9, 70_000));
    let dst = t.path().join("copy.dat");
    sync(&[s(&f), s(&dst)]).ok();
    assert!(dst.is_file(), "{} is not a file", dst.display());
    assert_eq!(std::fs::read(&dst).unwrap(), std::fs::read(&f).unwrap());
    let (a, b) = (
        std::fs::metadata(&f).unwrap(),
        std::fs::metadata(&dst).unwrap(),
    );
    assert_eq!(a.modified().unwrap(), b.modified().unwrap());
}

#[test]
fn single_file_into_existing_directory_keeps_its_name() {
    let t = tmp();
    let src = t.path().join("s");
    let f = src.join("one.txt");
    write(&f, "hello\n");
    let dst = t.path().join("into");
    write(&dst.join("other.txt"), "stay\n");
    sync(&[s(&f), s(&dst)]).ok();
    assert_eq!(std::fs::read(dst.join("one.txt")).unwrap(), b"hello\n");
    assert_eq!(std::fs::read(dst.join("other.txt")).unwrap(), b"stay\n");
    assert!(dst.is_dir());
}
