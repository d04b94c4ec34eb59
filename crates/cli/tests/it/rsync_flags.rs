//! rsync's flags in `cutover sync`: what rsync users type works (`-avP`, `-avh`, `-aHAX`,
//! `--progress`, `--stats`, `--info=progress2`, ...), flags cutover cannot honour are refused in
//! one line with exit 2 before anything is written, `-h` alone prints help, and no clap hint
//! (`use '-- -a'`, "a similar argument exists") reaches the user.

use crate::util::*;
use std::path::Path;
use std::process::Command;

/// A small source tree: a file, a subdirectory with a file, and a symlink.
fn tree(src: &Path) {
    write(&src.join("a.txt"), "alpha\n");
    write(&src.join("sub/b.bin"), random_bytes(3, 200_000));
    std::os::unix::fs::symlink("a.txt", src.join("link")).expect("symlink");
}

/// Run `cutover ARGS...` to the end.
fn cutover(args: &[&str]) -> Out {
    let mut c = cutover_cmd();
    c.args(args);
    Running::start(c).wait()
}

#[test]
fn avp_copies_like_rsync() {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    tree(&src);
    let out = sync(&["-avP", &slash(&src), &slash(&dst)]);
    out.ok();
    assert!(
        out.stdout.contains("sub/b.bin"),
        "-v lists the files\n{out}"
    );
    assert_same(&src, &dst);
    // Other spellings rsync users type, on a changed source.
    write(&src.join("a.txt"), "alpha, changed\n");
    for flags in [
        &["-avh"][..],
        &["-avz"],
        &["-a", "-r", "-v", "--progress", "--partial", "--stats"],
        &[
            "-rlptgoD",
            "--info=progress2",
            "-S",
            "--sparse",
            "--human-readable",
        ],
        &["-vv", "-a", "-a"],
    ] {
        let mut args = flags.to_vec();
        let (s, d) = (slash(&src), slash(&dst));
        args.extend([s.as_str(), d.as_str()]);
        sync(&args).ok();
        assert_same(&src, &dst);
    }
}

#[test]
fn itemize_and_delete_after_mean_v_and_delete() {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    tree(&src);
    write(&dst.join("stale.txt"), "only on the destination\n");
    let out = sync(&["-ai", "--delete-after", &slash(&src), &slash(&dst)]);
    out.ok();
    assert!(out.stdout.contains("a.txt"), "-i itemises\n{out}");
    assert!(
        out.stdout.contains("stale.txt"),
        "the delete is listed\n{out}"
    );
    assert!(!dst.join("stale.txt").exists(), "--delete-after deletes");
    assert_same_with(&src, &dst, &["--delete"]);
}

#[test]
fn a_hax_copies_posix_acls() {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    tree(&src);
    // A POSIX ACL (user 1234 may read) in its xattr form: version 2, then (tag, perm, id).
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in [
        (1u16, 6u16, u32::MAX),
        (2, 4, 1234),
        (4, 4, u32::MAX),
        (0x10, 4, u32::MAX),
        (0x20, 4, u32::MAX),
    ] {
        acl.extend(tag.to_le_bytes());
        acl.extend(perm.to_le_bytes());
        acl.extend(id.to_le_bytes());
    }
    let hex: String = acl.iter().map(|b| format!("{b:02x}")).collect();
    let set = Command::new("setfattr")
        .args(["-n", "system.posix_acl_access", "-v", &format!("0x{hex}")])
        .arg(src.join("a.txt"))
        .status()
        .expect("cannot run setfattr (package attr)");
    assert!(set.success(), "setfattr failed");
    sync(&["-aHAX", &slash(&src), &slash(&dst)]).ok();
    // rsync -A compares ACLs.
    assert_same(&src, &dst);
    let get = Command::new("getfattr")
        .args(["-n", "system.posix_acl_access", "--only-values"])
        .arg(dst.join("a.txt"))
        .output()
        .expect("cannot run getfattr");
    assert_eq!(get.stdout, acl, "the ACL arrived");
}

#[test]
fn unsupported_rsync_flags_are_refused_in_one_line() {
    let t = tmp();
    let (src, dst) = (t.path().join("src"), t.path().join("dst"));
    tree(&src);
    let (s, d) = (slash(&src), slash(&dst));
    for (flags, name) in [
        (&["-b"][..], "-b/--backup"),
        (&["--backup"], "--backup"),
        (&["-avb"], "-b/--backup"),
        (&["--link-dest=/tmp"], "--link-dest"),
        (&["--link-dest", "/tmp"], "--link-dest"),
        (&["--compare-dest=/tmp"], "--compare-dest"),
        (&["--copy-dest=/tmp"], "--copy-dest"),
        (&["-u"], "-u/--update"),
        (&["--update"], "-u/--update"),
        (&["--remove-source-files"], "--remove-source-files"),
        (&["-aL"], "-L/--copy-links"),
        (&["-x"], "-x/--one-file-system"),
        (&["--delete-before"], "--delete-before"),
        (&["--info=flist2"], "--info=flist2"),
    ] {
        let mut args = flags.to_vec();
        args.extend([s.as_str(), d.as_str()]);
        let out = sync(&args);
        out.expect_code(2);
        assert_one_line_error(&out, &[name, "not supported"]);
        assert!(!dst.exists(), "{flags:?} wrote nothing\n{out}");
    }
}

#[test]
fn no_clap_hints_for_unknown_flags() {
    let t = tmp();
    let (s, d) = (slash(&t.path().join("src")), slash(&t.path().join("dst")));
    for bad in ["--progres", "-E", "--compres"] {
        let out = sync(&[bad, &s, &d]);
        out.expect_code(2);
        assert_one_line_error(&out, &[bad, "unknown option"]);
        assert!(!out.stderr.contains("tip"), "{out}");
        assert!(!out.stderr.contains("similar"), "{out}");
    }
}

#[test]
fn h_alone_prints_help_and_help_shows_the_ssh_form() {
    for args in [&["sync", "-h"][..], &["sync", "--help"]] {
        let out = cutover(args);
        out.ok();
        assert!(out.stdout.contains("Usage: cutover sync"), "{out}");
        assert!(out.stdout.contains("[user@]host:PATH"), "{out}");
        assert!(out.stdout.contains("--human-readable"), "{out}");
    }
    let out = cutover(&["serve", "--help"]);
    out.ok();
    let config = out
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("--config"))
        .unwrap_or_else(|| panic!("no --config line\n{out}"));
    assert!(config.contains("Required, unless --stdio"), "{out}");
    assert!(
        out.stdout.contains("Usage: cutover serve --config FILE"),
        "{out}"
    );
}
