//! Selection and deletion: --exclude, --include/--exclude ordering, --exclude-from, --delete
//! (which spares excluded files), --max-delete, and --dry-run.

use crate::util::*;
use std::path::Path;

fn tree_with_logs(src: &Path) {
    write(&src.join("a.log"), "log a\n");
    write(&src.join("keep.log"), "keep me\n");
    write(&src.join("notes.txt"), "notes\n");
    write(&src.join("sub/b.log"), "log b\n");
    write(&src.join("sub/c.txt"), "c\n");
    write(&src.join("sub/deep/keep.log"), "deep keep\n");
    write(&src.join("dir.log/inside.txt"), "in an excluded dir\n");
}

#[test]
fn exclude_pattern_skips_matches_at_any_depth() {
    let t = tmp();
    let src = t.path().join("src");
    tree_with_logs(&src);
    let dst = t.path().join("dst");
    sync(&["--exclude", "*.log", &slash(&src), &slash(&dst)]).ok();
    let names: Vec<_> = snapshot(&dst).into_keys().collect();
    assert!(
        names.iter().all(|p| !p.to_string_lossy().contains(".log")),
        "{names:?}"
    );
    assert!(dst.join("sub/c.txt").is_file());
    assert!(dst.join("notes.txt").is_file());
    assert_same_with(&src, &dst, &["--exclude=*.log"]);
}

#[test]
fn first_matching_rule_wins_include_before_exclude() {
    let t = tmp();
    let src = t.path().join("src");
    tree_with_logs(&src);

    let dst = t.path().join("inc_first");
    sync(&[
        "--include",
        "keep.log",
        "--exclude",
        "*.log",
        &slash(&src),
        &slash(&dst),
    ])
    .ok();
    assert!(dst.join("keep.log").is_file());
    assert!(dst.join("sub/deep/keep.log").is_file());
    assert!(!dst.join("a.log").exists());
    assert!(!dst.join("sub/b.log").exists());
    assert_same_with(&src, &dst, &["--include=keep.log", "--exclude=*.log"]);

    let dst = t.path().join("exc_first");
    sync(&[
        "--exclude",
        "*.log",
        "--include",
        "keep.log",
        &slash(&src),
        &slash(&dst),
    ])
    .ok();
    assert!(!dst.join("keep.log").exists(), "the exclude came first");
    assert!(!dst.join("sub/deep/keep.log").exists());
    assert!(dst.join("notes.txt").is_file());
    assert_same_with(&src, &dst, &["--exclude=*.log"]);
}

#[test]
fn exclude_from_file_reads_rules_and_comments() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("x.tmp"), "x\n");
    write(&src.join("important.tmp"), "important\n");
    write(&src.join("sub/y.tmp"), "y\n");
    write(&src.join("cache/data"), "cached\n");
    write(&src.join("sub/cache/data"), "cached too\n");
    write(
        &src.join("sub/cachefile/cache"),
        "a file named cache is not a dir\n",
    );
    write(&src.join("top.txt"), "top\n");
    write(&src.join("sub/top.txt"), "not at the top\n");
    let rules = t.path().join("rules.txt");
    write(
        &rules,
        "# comment line\n; another comment\n\n+ important.tmp\n- *.tmp\ncache/\n/top.txt\n",
    );
    let dst = t.path().join("dst");
    sync(&["--exclude-from", s(&rules), &slash(&src), &slash(&dst)]).ok();
    assert!(dst.join("important.tmp").is_file());
    assert!(!dst.join("x.tmp").exists());
    assert!(!dst.join("sub/y.tmp").exists());
    assert!(!dst.join("cache").exists());
    assert!(!dst.join("sub/cache").exists());
    assert!(dst.join("sub/cachefile/cache").is_file());
    assert!(!dst.join("top.txt").exists());
    assert!(dst.join("sub/top.txt").is_file());
    assert_same_with(&src, &dst, &["--exclude-from", s(&rules)]);
}

#[test]
fn delete_removes_extraneous_entries_but_spares_excluded_ones() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("a.txt"), "a\n");
    write(&src.join("sub/b.txt"), "b\n");
    let dst = t.path().join("dst");
    sync(&[&slash(&src), &slash(&dst)]).ok();
    write(&dst.join("extra.txt"), "extra\n");
    write(&dst.join("extra_dir/x/y"), "deep extra\n");
    write(&dst.join("sub/extra2.txt"), "extra 2\n");
    std::os::unix::fs::symlink("a.txt", dst.join("extra_link")).unwrap();
    write(&dst.join("local.log"), "excluded: protected\n");
    write(&dst.join("sub/also.log"), "excluded: protected\n");

    let out = sync_json(&["--delete", "--exclude", "*.log", &slash(&src), &slash(&dst)]);
    out.ok();
    for gone in ["extra.txt", "extra_dir", "sub/extra2.txt", "extra_link"] {
        assert!(
            dst.join(gone).symlink_metadata().is_err(),
            "{gone} was not deleted\n{out}"
        );
    }
    assert_eq!(
        std::fs::read(dst.join("local.log")).unwrap(),
        b"excluded: protected\n"
    );
    assert!(dst.join("sub/also.log").is_file());
    // extra.txt, extra_dir, extra_dir/x, extra_dir/x/y, sub/extra2.txt, extra_link
    assert_eq!(out.stat("deleted"), 6, "{out}");
    let deleted: Vec<_> = out
        .events("item")
        .into_iter()
        .filter(|e| e["action"] == "delete")
        .map(|e| e["path"].as_str().unwrap().to_string())
        .collect();
    assert!(deleted.contains(&"extra.txt".to_string()), "{out}");
    assert_same_with(&src, &dst, &["--delete", "--exclude=*.log"]);
}

#[test]
fn max_delete_exceeded_exits_5_and_deletes_nothing() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("a.txt"), "a\n");
    let dst = t.path().join("dst");
    sync(&[&slash(&src), &slash(&dst)]).ok();
    for n in ["x1", "x2", "sub/x3"] {
        write(&dst.join(n), n);
    }
    write(&src.join("new.txt"), "new\n");
    let out = sync_json(&["--delete", "--max-delete", "1", &slash(&src), &slash(&dst)]);
    out.expect_code(5);
    assert_eq!(out.summary()["exit_code"], 5);
    assert!(
        out.summary()["delete_limit_hit"].as_u64().unwrap() >= 3,
        "{out}"
    );
    assert_eq!(out.stat("deleted"), 0, "{out}");
    for n in ["x1", "x2", "sub/x3"] {
        assert_eq!(
            std::fs::read(dst.join(n)).unwrap(),
            n.as_bytes(),
            "{n} was touched"
        );
    }
    assert!(
        out.stdout.contains("max-delete") || out.stderr.contains("max-delete"),
        "{out}"
    );

    // Within the limit, the deletions happen.
    sync(&["--delete", "--max-delete", "10", &slash(&src), &slash(&dst)]).ok();
    assert_same_with(&src, &dst, &["--delete"]);
}

#[test]
fn dry_run_itemizes_and_changes_nothing() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("same.txt"), "same\n");
    write(&src.join("changed.bin"), random_bytes(1, 400_000));
    let dst = t.path().join("dst");
    sync(&[&slash(&src), &slash(&dst)]).ok();
    write(&src.join("new.txt"), "new\n");
    write(&src.join("newdir/inner.txt"), "inner\n");
    write(&src.join("changed.bin"), random_bytes(2, 400_000));
    write(&dst.join("extraneous.txt"), "extra\n");
    let before = snapshot(&dst);

    let out = sync(&["-n", "--delete", &slash(&src), &slash(&dst)]);
    out.ok();
    let lines: Vec<&str> = out.stdout.lines().collect();
    for want in [
        "send   new.txt",
        "send   newdir/inner.txt",
        "delete extraneous.txt",
    ] {
        assert!(lines.contains(&want), "no line {want:?}\n{out}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l.ends_with("changed.bin")
                && (l.starts_with("send ") || l.starts_with("delta "))),
        "changed.bin not itemised\n{out}"
    );
    assert!(!lines.iter().any(|l| l.ends_with("same.txt")), "{out}");
    assert_eq!(before, snapshot(&dst), "--dry-run changed the destination");

    // A dry run into a missing destination does not create it.
    let missing = t.path().join("missing");
    sync(&["-n", &slash(&src), &slash(&missing)]).ok();
    assert!(!missing.exists());
}
