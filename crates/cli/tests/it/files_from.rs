//! `cutover sync --files-from LIST`: only the listed paths (a listed directory whole, and the
//! directories on the way) are walked and compared. rsync is the oracle: `rsync -a -r
//! --files-from=LIST SRC/ DST/` into a twin destination, then the two destinations compared,
//! locally, over ssh and through a daemon, push and pull. Also: NUL-separated lists and
//! standard input, missing paths (reported, or fatal with --files-from-strict), --delete only
//! beneath listed directories, reads proportional to the list, and hostile lists.

use crate::difftree::{mtime_of, set_mtime};
use crate::util::*;
use proto::{
    FrameReader, FrameWriter, Hello, Msg, NewSession, Role, SyncOptions, Welcome, WireCounter,
    PROTOCOL_VERSION,
};
use serde_bytes::ByteBuf;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// A source with directories of several modes and old mtimes, a symlink to a directory, names
/// that sort differently as whole paths and as components (`h-dir` / `h`), a space in a name,
/// and a directory that no list names.
fn fixture(src: &Path) {
    write(&src.join("a/b/c/f.txt"), "f");
    write(&src.join("a/b/c/g.txt"), "g");
    write(&src.join("a/b/other.txt"), "other");
    write(&src.join("a/sibling.txt"), "sibling");
    write(&src.join("d/x.txt"), "x");
    write(&src.join("d/sub/y.txt"), "y");
    write(&src.join("d/sub/deeper/z.txt"), "z");
    symlink("x.txt", src.join("d/lnk")).unwrap();
    write(&src.join("e/unlisted.txt"), "unlisted");
    write(&src.join("top.txt"), "top");
    write(&src.join("sp ace.txt"), "space");
    write(&src.join("h-dir/q"), "q");
    write(&src.join("h/r"), "r");
    symlink("a/b", src.join("link_top")).unwrap();
    chmod(&src.join("a"), 0o700);
    chmod(&src.join("a/b"), 0o750);
    chmod(&src.join("d/sub"), 0o711);
    for (dir, sec) in [
        ("a/b/c", 1_000_000_000),
        ("a/b", 1_000_000_100),
        ("a", 1_000_000_200),
        ("d/sub/deeper", 1_000_000_300),
        ("d/sub", 1_000_000_400),
        ("d", 1_000_000_500),
        ("h-dir", 1_000_000_600),
        ("h", 1_000_000_700),
    ] {
        set_mtime(&src.join(dir), sec, 123);
    }
}

/// A list in no particular order, with duplicates, comments, a blank line, a CR line end, a
/// leading `/`, `./`, a trailing `/`, and a path beneath a listed directory.
const LIST: &str = "# what changed\ntop.txt\nd/\n/a/b/c/f.txt\n./a/b/c/f.txt\n; also a comment\n\nlink_top\nd/sub/y.txt\nsp ace.txt\r\nh/r\nh-dir/q\n";

/// `rsync -a -r --files-from=LIST SRC/ DST/` (and `extra`); its exit code.
fn rsync_files_from(src: &Path, list: &Path, dst: &Path, extra: &[&str]) -> i32 {
    let out = Command::new("rsync")
        .args(["-a", "-r"])
        .arg(format!("--files-from={}", s(list)))
        .args(extra)
        .arg(slash(src))
        .arg(slash(dst))
        .output()
        .expect("cannot run rsync (the oracle)");
    out.status.code().expect("rsync killed by a signal")
}

/// The two destinations hold the same (rsync -anHAX --checksum --delete -i prints nothing).
/// The roots' own mtimes are the moment each was last written into (neither tool sends the
/// root when "." is not listed), so the cutover twin's is set to the rsync twin's first.
fn assert_twins(rsync_dst: &Path, cutover_dst: &Path) {
    let (sec, nsec) = mtime_of(rsync_dst);
    set_mtime(cutover_dst, sec, nsec);
    assert_same_with(rsync_dst, cutover_dst, &["--delete"]);
}

fn write_list(dir: &Path, name: &str, text: &str) -> PathBuf {
    let list = dir.join(name);
    write(&list, text);
    list
}

/// `n` files in `n / 50` directories, and a list of `listed` of them in a scrambled order:
/// more than one chunk of a streamed list (1000 paths).
fn bulk(src: &Path, n: usize, listed: usize) -> String {
    for i in 0..n {
        write(
            &src.join(format!("bulk/{:02}/f{i:04}", i % 50)),
            format!("{i}"),
        );
    }
    let mut list = String::new();
    for k in 0..listed {
        let i = (k * 7919) % n;
        list.push_str(&format!("bulk/{:02}/f{i:04}\n", i % 50));
    }
    list
}

#[test]
fn a_listed_subset_matches_rsync_locally_and_a_second_run_sends_nothing() {
    let t = tmp();
    let src = t.path().join("src");
    fixture(&src);
    let list = write_list(t.path(), "list", LIST);
    let theirs = t.path().join("rsync");
    assert_eq!(rsync_files_from(&src, &list, &theirs, &[]), 0);
    let ours = t.path().join("ours");
    let out = sync_json(&["--files-from", s(&list), &slash(&src), &slash(&ours)]);
    out.ok();
    assert_twins(&theirs, &ours);
    // Only what the list names: nothing of e/, nor a's other files.
    assert!(!ours.join("e").exists() && !ours.join("a/sibling.txt").exists());
    assert!(ours.join("d/sub/deeper/z.txt").is_file());
    assert!(std::fs::symlink_metadata(ours.join("link_top"))
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(out.stat("files_from_missing"), 0, "{out}");
    // Each entry once: the root, 5 directories on the way (a, a/b, a/b/c, h, h-dir), d and
    // its 6 entries, 6 listed files and the listed link; `d/sub/y.txt` came with `d/`.
    assert_eq!(out.stat("entries_scanned"), 19, "{out}");
    assert_eq!(out.stat("files_sent"), 8, "{out}");

    let again = sync_json(&["--files-from", s(&list), &slash(&src), &slash(&ours)]);
    again.ok();
    assert_eq!(again.stat("files_sent"), 0, "{again}");
    assert_eq!(again.stat("files_meta_only"), 0, "{again}");
    // SRC without a trailing slash: with a list, paths are relative to SRC all the same.
    let same = sync_json(&["--files-from", s(&list), s(&src), &slash(&ours)]);
    same.ok();
    assert_eq!(same.stat("files_sent"), 0, "{same}");
    assert!(!ours.join("src").exists());
}

#[test]
fn the_root_keeps_its_own_metadata_unless_dot_is_listed() {
    let t = tmp();
    let src = t.path().join("src");
    fixture(&src);
    chmod(&src, 0o755);
    set_mtime(&src, 1_100_000_000, 0);
    let ours = t.path().join("ours");
    std::fs::create_dir(&ours).unwrap();
    chmod(&ours, 0o711);
    let list = write_list(t.path(), "list", "top.txt\n");
    sync(&["--files-from", s(&list), &slash(&src), &slash(&ours)]).ok();
    let mode = std::fs::metadata(&ours).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, 0o711, "an implied root took the source's mode");
    assert_ne!(mtime_of(&ours).0, 1_100_000_000);

    // "." lists the source itself: everything, the root's metadata included (as rsync).
    let theirs = t.path().join("rsync");
    let all = write_list(t.path(), "all", ".\n");
    assert_eq!(rsync_files_from(&src, &all, &theirs, &[]), 0);
    sync(&["--files-from", s(&all), &slash(&src), &slash(&ours)]).ok();
    assert_same_with(&theirs, &ours, &["--delete"]);
    assert_same(&src, &ours);
}

#[test]
fn nul_separated_lists_and_standard_input() {
    let t = tmp();
    let src = t.path().join("src");
    fixture(&src);
    write(&src.join("new\nline.txt"), "nl");
    write(&src.join("#hash.txt"), "hash");
    let nul = t.path().join("list0");
    std::fs::write(&nul, b"new\nline.txt\0d/sub\0#hash.txt\0a/b/c/g.txt").unwrap();
    let ours = t.path().join("ours");
    sync(&[
        "--files-from",
        s(&nul),
        "--from0",
        &slash(&src),
        &slash(&ours),
    ])
    .ok();
    // rsync 3.2 also takes a NUL-separated '#…' entry for a comment; a list from
    // `find -print0` means every entry, so cutover copies it (docs/sync.md).
    assert_eq!(std::fs::read(ours.join("#hash.txt")).unwrap(), b"hash");
    std::fs::remove_file(ours.join("#hash.txt")).unwrap();
    let theirs = t.path().join("rsync");
    assert_eq!(
        rsync_files_from(&src, &nul, &theirs, &["--from0"]),
        0,
        "rsync"
    );
    assert_twins(&theirs, &ours);
    assert!(ours.join("new\nline.txt").is_file());

    // `-`: the list on standard input (through a pipe), read before anything is copied.
    let list = write_list(t.path(), "list", LIST);
    let piped = t.path().join("piped");
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(format!(
            "cat \"$1\" | {} sync --json --files-from - \"$2\" \"$3\"",
            bin()
        ))
        .args(["sh", s(&list), &slash(&src), &slash(&piped)]);
    let out = Running::start(cmd).wait();
    out.ok();
    let theirs = t.path().join("rsync2");
    assert_eq!(rsync_files_from(&src, &list, &theirs, &[]), 0);
    assert_twins(&theirs, &piped);
}

/// As in rsync, the filters apply to the listed paths and to what is beneath a listed
/// directory, not to the directories on the way to a listed path.
#[test]
fn filters_apply_to_listed_paths_and_beneath_them_as_in_rsync() {
    let t = tmp();
    let src = t.path().join("src");
    fixture(&src);
    write(&src.join("d/skip.log"), "log");
    write(&src.join("top.log"), "log");
    write(&src.join("a/b/c/keep.log"), "log");
    let list = write_list(
        t.path(),
        "list",
        &format!("{LIST}top.log\na/b/c/keep.log\n"),
    );
    let filters = [
        "--include",
        "keep.log",
        "--exclude",
        "*.log",
        "--exclude",
        "a/",
        "--exclude",
        "deeper/",
    ];
    let theirs = t.path().join("rsync");
    assert_eq!(rsync_files_from(&src, &list, &theirs, &filters), 0);
    let ours = t.path().join("ours");
    let mut args = filters.to_vec();
    args.extend(["--files-from", s(&list)]);
    let (from, to) = (slash(&src), slash(&ours));
    args.extend([from.as_str(), to.as_str()]);
    sync(&args).ok();
    assert_twins(&theirs, &ours);
    assert!(ours.join("a/b/c/keep.log").is_file() && ours.join("a/b/c/f.txt").is_file());
    assert!(!ours.join("top.log").exists() && !ours.join("d/skip.log").exists());
    assert!(!ours.join("d/sub/deeper").exists());
}

/// rsync makes the destination directory whatever the list holds; so does cutover, even for
/// a list with nothing (left) to copy.
#[test]
fn an_empty_list_still_makes_the_destination_as_rsync_does() {
    let t = tmp();
    let src = t.path().join("src");
    fixture(&src);
    for (name, text, code) in [("empty", "", 0), ("gone", "# x\nno/such\n", 4)] {
        let list = write_list(t.path(), name, text);
        let theirs = t.path().join(format!("rsync-{name}"));
        rsync_files_from(&src, &list, &theirs, &[]);
        assert!(theirs.is_dir());
        let ours = t.path().join(format!("ours-{name}"));
        let out = sync_json(&["--files-from", s(&list), &slash(&src), &slash(&ours)]);
        out.expect_code(code);
        assert!(ours.is_dir(), "{name}: no destination\n{out}");
        assert_twins(&theirs, &ours);
    }
}

#[test]
fn a_missing_path_is_reported_and_skipped_and_fatal_when_strict() {
    let t = tmp();
    let src = t.path().join("src");
    fixture(&src);
    let list = write_list(
        t.path(),
        "list",
        &format!("{LIST}no/such/file\na/b/c/f.txt/under-a-file\n"),
    );
    let theirs = t.path().join("rsync");
    // rsync calls it a partial transfer (23); cutover, a file that vanished (4).
    assert_eq!(rsync_files_from(&src, &list, &theirs, &[]), 23);
    let ours = t.path().join("ours");
    let out = sync_json(&["--files-from", s(&list), &slash(&src), &slash(&ours)]);
    out.expect_code(4);
    assert_twins(&theirs, &ours);
    assert_eq!(out.stat("files_from_missing"), 2, "{out}");
    let missing: Vec<String> = out
        .events("missing")
        .iter()
        .map(|e| e["path"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        missing,
        ["a/b/c/f.txt/under-a-file", "no/such/file"],
        "{out}"
    );
    assert!(out.summary()["errors"].as_array().unwrap().is_empty());

    // Without --json: one warning line naming each, and the count.
    let text = sync(&["--files-from", s(&list), &slash(&src), &slash(&ours)]);
    text.expect_code(4);
    assert!(
        text.stderr
            .contains("cutover: no/such/file: listed in --files-from but not in the source"),
        "{text}"
    );
    assert!(text.stdout.contains("listed, missing     2"), "{text}");

    let strict = sync(&[
        "--files-from",
        s(&list),
        "--files-from-strict",
        &slash(&src),
        &slash(&t.path().join("strict")),
    ]);
    assert_eq!(strict.code(), 1, "{strict}");
    assert_one_line_error(
        &strict,
        &[
            "a/b/c/f.txt/under-a-file",
            "not in the source",
            "--files-from-strict",
        ],
    );
}

#[test]
fn delete_removes_extraneous_entries_only_beneath_listed_directories() {
    let t = tmp();
    let src = t.path().join("src");
    fixture(&src);
    let list = write_list(t.path(), "list", LIST);
    let theirs = t.path().join("rsync");
    let ours = t.path().join("ours");
    for dst in [&theirs, &ours] {
        write(&dst.join("d/extra.txt"), "in a listed directory: goes");
        write(&dst.join("d/sub/deeper/extra"), "beneath one: goes");
        write(&dst.join("d/gone/tree/x"), "a whole tree beneath one: goes");
        write(&dst.join("a/extra.txt"), "in an implied directory: stays");
        write(&dst.join("a/b/c/extra.txt"), "beside a listed file: stays");
        write(
            &dst.join("e/unlisted.txt"),
            "in an unlisted directory: stays",
        );
        write(&dst.join("elsewhere/x"), "an unlisted tree: stays");
        write(&dst.join("root-extra.txt"), "in the root: stays");
    }
    assert_eq!(rsync_files_from(&src, &list, &theirs, &["--delete"]), 0);
    let out = sync_json(&[
        "--delete",
        "--files-from",
        s(&list),
        &slash(&src),
        &slash(&ours),
    ]);
    out.ok();
    assert_twins(&theirs, &ours);
    for gone in ["d/extra.txt", "d/sub/deeper/extra", "d/gone"] {
        assert!(!ours.join(gone).exists(), "{gone} survived\n{out}");
    }
    for kept in [
        "a/extra.txt",
        "a/b/c/extra.txt",
        "e/unlisted.txt",
        "elsewhere/x",
        "root-extra.txt",
    ] {
        assert!(ours.join(kept).exists(), "{kept} was deleted\n{out}");
    }
    assert_eq!(out.stat("deleted"), 5, "{out}");
    let again = sync_json(&[
        "--delete",
        "--files-from",
        s(&list),
        &slash(&src),
        &slash(&ours),
    ]);
    again.ok();
    assert_eq!(again.stat("deleted"), 0, "{again}");
}

/// 2,000 directories, a list of 5 paths: the walk reads what the list names, not the tree.
#[test]
fn a_listed_pass_reads_entries_in_proportion_to_the_list_not_the_tree() {
    let t = tmp();
    let src = t.path().join("src");
    for i in 0..2000 {
        write(&src.join(format!("d{i:04}/f")), format!("{i}"));
    }
    write(&src.join("d0100/g"), "g");
    let list = write_list(
        t.path(),
        "list",
        "d0007/f\nd0100\nd1999/f\nd0500/f\nd1234\n",
    );
    let module = t.path().join("module");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let push = sync_json(&["--files-from", s(&list), &slash(&src), &d.url("m/tree/")]);
    push.ok();
    // The root, 5 directories (3 on the way, 2 listed), 6 files.
    assert_eq!(push.stat("entries_scanned"), 12, "{push}");

    // The daemon's sender walks only the list too: the pulling side counts what came.
    sync(&[&slash(&src), &slash(&module.join("full"))]).ok();
    let pulled = t.path().join("pulled");
    let pull = sync_json(&["--files-from", s(&list), &d.url("m/full/"), &slash(&pulled)]);
    pull.ok();
    assert_eq!(pull.stat("entries_scanned"), 12, "{pull}");
    let theirs = t.path().join("rsync");
    assert_eq!(rsync_files_from(&src, &list, &theirs, &[]), 0);
    assert_twins(&theirs, &pulled);

    let whole = sync_json(&[&slash(&src), &slash(&t.path().join("whole"))]);
    whole.ok();
    assert!(whole.stat("entries_scanned") > 4000, "{whole}");
}

#[test]
fn push_and_pull_over_ssh_match_rsync() {
    let t = tmp();
    let sshd = Sshd::start(&t.path().join("sshd"));
    let src = t.path().join("src");
    fixture(&src);
    let list = write_list(
        t.path(),
        "list",
        &format!("{LIST}{}missing/one\n", bulk(&src, 3000, 2500)),
    );
    let theirs = t.path().join("rsync");
    assert_eq!(rsync_files_from(&src, &list, &theirs, &[]), 23);
    let rsh = sshd.rsh();
    let ssh = |from: &str, to: &str| -> Out {
        sync_json(&[
            "-e",
            &rsh,
            "--remote-cutover",
            bin(),
            "-j",
            "2",
            "--files-from",
            s(&list),
            from,
            to,
        ])
    };
    let remote = t.path().join("remote");
    let push = ssh(&slash(&src), &format!("127.0.0.1:{}/", s(&remote)));
    push.expect_code(4);
    assert_eq!(push.stat("files_from_missing"), 1, "{push}");
    assert_twins(&theirs, &remote);

    // The list travels to the remote sender in chunks of 1000 paths.
    let pulled = t.path().join("pulled");
    let pull = ssh(&format!("127.0.0.1:{}/", s(&src)), &slash(&pulled));
    pull.expect_code(4);
    assert_eq!(pull.stat("files_from_missing"), 1, "{pull}");
    assert_eq!(pull.events("missing")[0]["path"], "missing/one", "{pull}");
    assert_eq!(pull.stat("entries_scanned"), push.stat("entries_scanned"));
    assert_twins(&theirs, &pulled);
}

#[test]
fn push_and_pull_through_the_daemon_match_rsync_with_delete() {
    let t = tmp();
    let src = t.path().join("src");
    fixture(&src);
    let list = write_list(
        t.path(),
        "list",
        &format!("{LIST}{}", bulk(&src, 3000, 2500)),
    );
    let module = t.path().join("module");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let theirs = t.path().join("rsync");
    let pushed = module.join("pushed");
    let pulled = t.path().join("pulled");
    for dst in [&theirs, &pushed, &pulled] {
        write(&dst.join("d/extra.txt"), "goes");
        write(
            &dst.join("bulk/07/extra"),
            "stays: bulk/07 is only on the way",
        );
        write(&dst.join("e/kept.txt"), "stays");
    }
    assert_eq!(rsync_files_from(&src, &list, &theirs, &["--delete"]), 0);
    let push = sync_json(&[
        "--delete",
        "--files-from",
        s(&list),
        &slash(&src),
        &d.url("m/pushed/"),
    ]);
    push.ok();
    assert_eq!(push.stat("deleted"), 1, "{push}");
    assert_twins(&theirs, &pushed);

    // Pull the source from the module (a copy of it there).
    sync(&[&slash(&src), &slash(&module.join("src"))]).ok();
    let pull = sync_json(&[
        "--delete",
        "--files-from",
        s(&list),
        &d.url("m/src/"),
        &slash(&pulled),
    ]);
    pull.ok();
    assert_eq!(pull.stat("deleted"), 1, "{pull}");
    assert_twins(&theirs, &pulled);
    let again = sync_json(&["--files-from", s(&list), &d.url("m/src/"), &slash(&pulled)]);
    again.ok();
    assert_eq!(again.stat("files_sent"), 0, "{again}");
}

#[test]
fn a_bad_list_is_one_line_naming_the_line_and_nothing_is_written() {
    let t = tmp();
    let src = t.path().join("src");
    fixture(&src);
    let dst = t.path().join("dst");
    for (text, needles) in [
        (
            "top.txt\n../outside\n",
            &["line 2", "\"../outside\"", "'..'"][..],
        ),
        ("top.txt\n\na/../../x\n", &["line 3", "'..'"][..]),
    ] {
        let list = write_list(t.path(), "list", text);
        let out = sync(&["--files-from", s(&list), &slash(&src), &slash(&dst)]);
        assert_eq!(out.code(), 1, "{out}");
        assert_one_line_error(&out, needles);
        assert!(!dst.exists(), "a bad list wrote something\n{out}");
    }
    let out = sync(&[
        "--files-from",
        "/nonexistent/list",
        &slash(&src),
        &slash(&dst),
    ]);
    assert_one_line_error(&out, &["--files-from /nonexistent/list", "No such file"]);
    let out = sync(&[
        "--files-from",
        s(&t.path().join("list")),
        s(&src.join("top.txt")),
        &slash(&dst),
    ]);
    assert_one_line_error(&out, &["top.txt", "needs a directory as the source"]);
    let out = sync(&["--from0", &slash(&src), &slash(&dst)]);
    assert_eq!(out.code(), 2, "{out}");
    assert!(out.stderr.contains("--files-from"), "{out}");
    assert!(!dst.exists());
}

/// A list names `out/secret` where `out` is a symlink in the source to a directory outside
/// it, and `/etc/passwd`: neither is read. rsync follows the link out (and copies the
/// secret); cutover never follows a symlink on a listed path's way, and a leading `/` is the
/// source's root, not the machine's.
#[test]
fn a_hostile_list_reads_nothing_outside_the_source() {
    let t = tmp();
    let src = t.path().join("src");
    fixture(&src);
    write(&t.path().join("outside/secret"), "do not read");
    symlink("../outside", src.join("out")).unwrap();
    symlink("a", src.join("inside")).unwrap();
    let list = write_list(
        t.path(),
        "list",
        "top.txt\nout/secret\n/etc/passwd\ninside/sibling.txt\nout\n",
    );
    let dst = t.path().join("dst");
    let out = sync_json(&["--files-from", s(&list), &slash(&src), &slash(&dst)]);
    // Refusals are errors of the pass (3), missing paths only warnings.
    out.expect_code(3);
    let errors = out.summary()["errors"].to_string();
    assert!(
        errors.contains("out/secret") && errors.contains("symlink"),
        "{out}"
    );
    assert!(errors.contains("inside/sibling.txt"), "{out}");
    assert_eq!(out.stat("files_from_missing"), 1, "{out}");
    assert_eq!(out.events("missing")[0]["path"], "etc/passwd", "{out}");
    // (`out` itself is copied as the link it is, so look without following links.)
    let copied = snapshot(&dst);
    assert!(
        copied
            .keys()
            .all(|p| !p.ends_with("secret") && !p.starts_with("etc") && !p.starts_with("inside")),
        "{copied:?}"
    );
    // A listed symlink is the link itself.
    assert_eq!(
        std::fs::read_link(dst.join("out")).unwrap(),
        Path::new("../outside")
    );
    assert_eq!(std::fs::read(dst.join("top.txt")).unwrap(), b"top");

    // The same through a daemon: the module's sender refuses, the client says so.
    let module = t.path().join("module");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    std::fs::create_dir_all(module.join("tree")).unwrap();
    symlink(t.path().join("outside"), module.join("tree/out")).unwrap();
    let pulled = t.path().join("pulled");
    let pull = sync_json(&["--files-from", s(&list), &d.url("m/tree/"), &slash(&pulled)]);
    pull.expect_code(3);
    let errors = pull.summary()["errors"].to_string();
    assert!(
        errors.contains("out/secret") && errors.contains("symlink"),
        "{pull}"
    );
    assert!(
        !errors.contains(s(&module)),
        "the daemon's path leaked\n{pull}"
    );
    assert!(snapshot(&pulled).keys().all(|p| !p.ends_with("secret")));
}

/// What a daemon's sender says to a pulling client that streams it a hostile list, up to
/// its `Fatal` or its first `ListedProblem` (or the end).
async fn pull_with_list(port: u16, paths: &[&[u8]]) -> Vec<Msg> {
    let (tls, welcome) = crate::hostile::dial(port, |binding| {
        Hello::New(NewSession {
            version: PROTOCOL_VERSION,
            module: "m".into(),
            path: "tree/".into(),
            server_role: Role::Sender,
            options: SyncOptions {
                files_from: true,
                ..SyncOptions::default()
            },
            token_proof: Some(net::tls::token_proof(TOKEN.as_bytes(), &binding)),
        })
    })
    .await;
    assert!(matches!(welcome, Welcome::Accepted { .. }), "{welcome:?}");
    let (r, w) = tokio::io::split(tls);
    let wire = Arc::new(WireCounter::default());
    let mut reader = FrameReader::new(r, wire.clone());
    let mut writer = FrameWriter::new(w, wire);
    let mut said = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let next = tokio::time::timeout_at(deadline, reader.recv::<Msg>()).await;
        let msg = match next {
            Ok(Ok(Some(m))) => m,
            Ok(_) => return said,
            Err(_) => panic!("the daemon's sender went quiet; it said {said:?}"),
        };
        match &msg {
            Msg::KeepAlive => continue,
            Msg::MorePaths => {
                let paths = paths.iter().map(|p| ByteBuf::from(p.to_vec())).collect();
                writer
                    .send(&Msg::Paths { paths, last: true }, false)
                    .await
                    .expect("send the list");
            }
            Msg::Fatal { .. } | Msg::ListedProblem { .. } => {
                said.push(msg);
                return said;
            }
            _ => {}
        }
        said.push(msg);
    }
}

/// A client that lies in the list it streams to a daemon's sender: paths out of the module,
/// out of order, or through a symlink out of it. The sender refuses each and reads nothing
/// outside.
#[test]
fn a_daemon_sender_refuses_a_hostile_streamed_list() {
    let t = tmp();
    let module = t.path().join("module");
    write(&module.join("tree/a"), "a");
    write(&module.join("tree/b"), "b");
    write(&t.path().join("outside/secret"), "do not read");
    symlink(t.path().join("outside"), module.join("tree/out")).unwrap();
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let long = vec![b'x'; 5000];
    for (paths, expect) in [
        (&[&b"../outside/secret"[..]][..], "refused"),
        (&[b"a/../../outside/secret"], "refused"),
        (&[b"/etc/passwd"], "refused"),
        (&[b"b", b"a"], "not in walk order"),
        (&[b"a", b"a"], "not in walk order"),
        (&[&long[..]], "refused"),
        (&[b"out/secret"], "symlink"),
    ] {
        let said = rt.block_on(pull_with_list(d.port, paths));
        let last = format!("{:?}", said.last());
        assert!(last.contains(expect), "{paths:?}: {said:?}");
        let leaked = said.iter().any(|m| match m {
            Msg::FileList { entries, .. } => entries
                .iter()
                .any(|e| String::from_utf8_lossy(&e.path).contains("secret")),
            _ => false,
        });
        assert!(!leaked, "{paths:?}: {said:?}");
    }
    assert_eq!(
        std::fs::read(t.path().join("outside/secret")).unwrap(),
        b"do not read"
    );
    // And it still serves.
    let list = write_list(t.path(), "list", "a\n");
    let pulled = t.path().join("pulled");
    sync(&["--files-from", s(&list), &d.url("m/tree/"), &slash(&pulled)]).ok();
    assert_eq!(std::fs::read(pulled.join("a")).unwrap(), b"a");
}

/// The list comes on standard input, which can be read only once, and the daemon's
/// connections are reset every few MB: each reopened session streams the same list to the
/// daemon's sender again, and the pull finishes in one run.
#[test]
fn a_pull_reconnects_with_the_same_list_from_standard_input() {
    let t = tmp();
    let module = t.path().join("module");
    let src = module.join("src");
    write(&src.join("big.bin"), random_bytes(31, 24 << 20));
    write(&src.join("dir/small"), "small");
    write(&src.join("unlisted.bin"), random_bytes(32, 1 << 20));
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let relay = crate::resume::Resetter::start(t.path(), d.port, "4");
    let list = write_list(t.path(), "list", "big.bin\ndir\n");
    let pulled = t.path().join("pulled");
    let mut cmd = Command::new("sh");
    cmd.env("XDG_CONFIG_HOME", client_config_home())
        .env("CUTOVER_TOKEN", TOKEN)
        .arg("-c")
        .arg(format!(
            "cat \"$1\" | {} sync --json -j 2 --files-from - \"$2\" \"$3\"",
            bin()
        ))
        .args([
            "sh",
            s(&list),
            &format!("cutover://127.0.0.1:{}/m/src/", relay.port),
            &slash(&pulled),
        ]);
    let out = Running::start(cmd).wait();
    out.ok();
    let (_, resets) = relay.finish();
    assert!(resets > 0, "the relay never reset a connection");
    assert!(out.stat("reconnects") >= 1, "{out}");
    let theirs = t.path().join("rsync");
    assert_eq!(rsync_files_from(&src, &list, &theirs, &[]), 0);
    assert_twins(&theirs, &pulled);
}
