//! Bad input and hostile conditions: each fails (or finishes) cleanly with a one-line message
//! that names the path or the cause, never panics, and never damages complete files that the
//! destination already had.

use crate::util::*;
use std::path::Path;
use std::time::Duration;

/// A destination that already holds complete files.
fn populated(dst: &Path) {
    write(&dst.join("old.txt"), "old and complete\n");
    write(&dst.join("sub/data.bin"), random_bytes(21, 300_000));
}

#[test]
fn missing_source_fails_naming_it_and_leaves_destination_alone() {
    let t = tmp();
    let dst = t.path().join("dst");
    populated(&dst);
    let before = snapshot(&dst);
    let missing = t.path().join("no_such_dir");
    for src in [slash(&missing), s(&missing).to_string()] {
        let out = sync(&[&src, &slash(&dst)]);
        assert_one_line_error(&out, &[s(&missing), "does not exist"]);
        assert_eq!(before, snapshot(&dst));
    }
    // Through a daemon too.
    let module = t.path().join("module");
    populated(&module);
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let before_module = snapshot(&module);
    let out = sync(&[&slash(&missing), &d.url("m/")]);
    assert_one_line_error(&out, &[s(&missing), "does not exist"]);
    assert_eq!(before_module, snapshot(&module));
}

#[test]

fn pull_of_missing_daemon_path_fails_naming_it() {
    let t = tmp();
    let dst = t.path().join("dst");
    populated(&dst);
    let before = snapshot(&dst);
    let module = t.path().join("module");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let out = sync(&[&d.url("m/no_such_dir/"), &slash(&dst)]);
    assert_one_line_error(&out, &["no_such_dir"]);
    assert_eq!(before, snapshot(&dst));
}

#[test]

fn destination_under_a_regular_file_fails_naming_the_cause() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("a.txt"), "a\n");
    let file = t.path().join("plainfile");
    write(&file, "I am a file\n");
    let out = sync(&[&slash(&src), &slash(&file.join("sub"))]);
    assert_one_line_error(&out, &[s(&file)]);
    assert!(
        out.stderr.to_lowercase().contains("not a directory"),
        "cause not named\n{out}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"I am a file\n");
}

#[test]
fn no_daemon_listening_names_the_address() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("a.txt"), "a\n");
    let dst = t.path().join("dst");
    populated(&dst);
    let before = snapshot(&dst);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let out = sync(&[&slash(&src), &format!("cutover://{addr}/m/")]);
    assert_one_line_error(&out, &[&addr]);
    assert!(out.stderr.to_lowercase().contains("refused"), "{out}");
    let out = sync(&[&format!("cutover://{addr}/m/"), &slash(&dst)]);
    assert_one_line_error(&out, &[&addr]);
    assert_eq!(before, snapshot(&dst));
}

#[test]
fn unknown_module_lists_the_modules_served() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("a.txt"), "a\n");
    let (a, b) = (t.path().join("alpha"), t.path().join("beta"));
    populated(&a);
    let before = snapshot(&a);
    let d = Daemon::start(
        &t.path().join("d"),
        &[Module::rw("alpha", &a), Module::rw("beta", &b)],
    );
    let out = sync(&[&slash(&src), &d.url("gamma/x/")]);
    assert_one_line_error(&out, &["gamma", "alpha", "beta"]);
    let out = sync(&[&d.url("gamma/"), &slash(&t.path().join("dst"))]);
    assert_one_line_error(&out, &["gamma", "alpha", "beta"]);
    assert!(!t.path().join("dst").exists());
    assert_eq!(before, snapshot(&a));
}

#[test]
fn push_to_read_only_module_is_refused_and_pull_works() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("a.txt"), "new content\n");
    let ro = t.path().join("ro");
    populated(&ro);
    write(&ro.join("a.txt"), "old content\n");
    let before = snapshot(&ro);
    let d = Daemon::start(
        &t.path().join("d"),
        &[Module {
            name: "frozen",
            path: &ro,
            read_only: true,
        }],
    );
    let out = sync(&["--delete", &slash(&src), &d.url("frozen/")]);
    assert_one_line_error(&out, &["frozen", "read-only"]);
    assert_eq!(before, snapshot(&ro));
    let pulled = t.path().join("pulled");
    sync(&[&d.url("frozen/"), &slash(&pulled)]).ok();
    assert_same(&ro, &pulled);
}

/// A full destination ends the run at once with one line that names the destination (as the
/// client knows it: never the daemon's own paths nor a partial file's name), the space free
/// and the space needed, exit 1; complete files keep their content; the next run, with space freed, finishes exact. Locally and pushed.
#[test]
fn full_disk_fails_cleanly_keeps_complete_files_and_the_next_run_finishes() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("keep.bin"), random_bytes(32, 3 << 20));
    write(&src.join("sibling.bin"), random_bytes(33, 4 << 20));
    for i in 0..30 {
        write(
            &src.join(format!("small/{i}.bin")),
            random_bytes(40 + i, 200 << 10),
        );
    }
    let keep = random_bytes(31, 100 << 10);
    let local = Tmpfs::mount(&t.path().join("local_fs"), "2m");
    let remote = Tmpfs::mount(&t.path().join("remote_fs"), "2m");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("small", &remote.path)]);
    for (fs, url, shown) in [
        (&local, slash(&local.path), s(&local.path).to_string()),
        (&remote, d.url("small/"), "small".to_string()),
    ] {
        write(&fs.path.join("keep.bin"), &keep);
        let out = sync_json(&["-j", "2", &slash(&src), &url]);
        out.expect_code(1);
        let fatal = out.events("fatal");
        assert_eq!(fatal.len(), 1, "{out}");
        let line = fatal[0]["message"].as_str().unwrap().to_string();
        for needle in [
            shown.as_str(),
            "file system is full",
            "free",
            "needs at least",
        ] {
            assert!(
                line.contains(needle),
                "{needle:?} missing in {line:?}\n{out}"
            );
        }
        assert!(
            !line.contains(".cutover."),
            "a partial file's name shown\n{out}"
        );
        assert!(
            !line.contains(s(&remote.path)),
            "the daemon's own path shown\n{out}"
        );
        assert!(out.events("error").is_empty(), "an error per file\n{out}");
        // Without --json: exactly one line.
        fs.resize("2m");
        let plain = sync(&["-j", "2", &slash(&src), &url]);
        plain.expect_code(1);
        assert_one_line_error(&plain, &[&shown, "file system is full"]);
        assert_eq!(
            std::fs::read(fs.path.join("keep.bin")).unwrap(),
            keep,
            "keep.bin lost its complete old content"
        );
        assert!(
            !fs.path.join("sibling.bin").exists(),
            "an incomplete sibling.bin appeared"
        );
        // Space freed: the next run finishes, exact.
        fs.resize("32m");
        sync(&["-j", "2", &slash(&src), &url]).ok();
        assert_same(&src, &fs.path);
        std::fs::remove_dir_all(fs.path.join("small")).unwrap();
        for f in ["keep.bin", "sibling.bin"] {
            std::fs::remove_file(fs.path.join(f)).unwrap();
        }
        fs.resize("2m");
    }
}

/// A destination on a read-only file system is one line and exit 1, locally and pushed.
#[test]
fn a_read_only_destination_is_one_line_and_exit_1() {
    let t = tmp();
    let src = t.path().join("src");
    for i in 0..10 {
        write(&src.join(format!("f{i}")), format!("{i}\n"));
    }
    let ro = Tmpfs::mount(&t.path().join("ro"), "1m");
    let out = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(&ro.path)
        .output()
        .unwrap();
    assert!(out.status.success());
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("ro", &ro.path)]);
    for (url, shown) in [
        (slash(&ro.path), s(&ro.path).to_string()),
        (d.url("ro/"), "ro".to_string()),
    ] {
        let out = sync(&[&slash(&src), &url]);
        out.expect_code(1);
        assert_one_line_error(&out, &[&shown, "Read-only file system"]);
    }
}

#[test]
fn files_vanishing_during_the_transfer_are_reported_not_fatal() {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&[
        "tree",
        s(&src),
        "--files",
        "3000",
        "--min-kb",
        "1",
        "--max-kb",
        "1",
    ]);
    let mut files: Vec<_> = snapshot(&src)
        .into_iter()
        .filter(|(_, v)| matches!(v, Snap::File { .. }))
        .map(|(k, _)| k)
        .collect();
    files.sort();
    assert_eq!(files.len(), 3000);
    let doomed: Vec<_> = files[1500..].to_vec();
    let dst = t.path().join("dst");
    let run = spawn_sync(&[
        "--json",
        "-j",
        "1",
        "--bwlimit",
        "256K",
        &slash(&src),
        &slash(&dst),
    ]);
    std::thread::sleep(Duration::from_millis(300));
    for f in &doomed {
        std::fs::remove_file(src.join(f)).unwrap();
    }
    let out = run.wait();
    let code = out.code();
    assert!(code == 4 || code == 3, "exit code {code}\n{out}");
    let summary = out.summary();
    assert_eq!(summary["exit_code"], code);
    let reported: Vec<String> = out
        .events("changed")
        .iter()
        .map(|e| e["path"].as_str().unwrap_or("").to_string())
        .chain(out.events("error").iter().map(|e| e["message"].to_string()))
        .collect();
    let named = doomed
        .iter()
        .any(|f| reported.iter().any(|r| r.contains(&*f.to_string_lossy())));
    assert!(named, "no vanished path was reported\n{out}");
    println!(
        "exit code {code}; reported: {:?}",
        &reported[..reported.len().min(3)]
    );
    // Every file that stayed arrived.
    for f in &files[..1500] {
        assert!(dst.join(f).is_file(), "{} missing", f.display());
    }
    // A quiet re-run with --delete makes the copy exact.
    sync(&["--delete", &slash(&src), &slash(&dst)]).ok();
    assert_same_with(&src, &dst, &["--delete"]);
}

/// A source file the sync cannot read (run as an unprivileged user; root reads anything):
/// reported by name, the other files still copied, and exit 3 says the copy is incomplete.
#[test]
fn an_unreadable_source_file_is_reported_and_the_rest_is_copied() {
    use std::os::unix::fs::PermissionsExt;
    let t = tmp();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let src = t.path().join("src");
    write(&src.join("a.txt"), b"readable");
    write(&src.join("sub/b.txt"), b"readable too");
    write(&src.join("secret.txt"), b"nobody may read this");
    chmod(&src.join("secret.txt"), 0o000);
    let dst = t.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    rustix::fs::chown(
        &dst,
        Some(rustix::fs::Uid::from_raw(65534)),
        Some(rustix::fs::Gid::from_raw(65534)),
    )
    .unwrap();
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(bin())
        .args(["sync", &slash(&src), &slash(&dst)])
        .env_remove("CUTOVER_LOG");
    let out = Running::start(cmd).wait();
    assert_eq!(out.code(), 3, "{out}");
    assert!(
        out.err_lines()
            .iter()
            .any(|l| l.contains("secret.txt") && l.contains("Permission denied")),
        "no line names the unreadable file\n{out}"
    );
    assert_eq!(std::fs::read(dst.join("a.txt")).unwrap(), b"readable");
    assert_eq!(
        std::fs::read(dst.join("sub/b.txt")).unwrap(),
        b"readable too"
    );
    assert!(!dst.join("secret.txt").exists());
}

/// A daemon names a file in its errors as the client knows it (module/path), never by its
/// own absolute path.
#[test]
fn daemon_errors_name_files_by_module_not_by_the_daemons_path() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("sub/x"), "a file\n");
    let module = t.path().join("module");
    write(&module.join("sub/x/inside"), "a directory here\n");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let out = sync(&[&slash(&src), &d.url("m/")]);
    out.expect_code(3);
    assert!(out.stderr.contains("m/sub/x"), "{out}");
    assert!(
        !out.stderr.contains(s(&module)),
        "the daemon's path shown\n{out}"
    );
}
