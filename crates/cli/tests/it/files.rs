//! Files cutover writes for itself where the user pointed it (`--port-file`, known-hosts, a
//! plan's logs and reports): only a regular file or nothing is replaced or appended to; a
//! symlink, FIFO, directory or device is refused with one line and left as it was. And a
//! token file others can read is warned about.

use crate::plan::{setup, tree_task};
use crate::util::*;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().expect("mkfifo");
    assert!(st.success());
}

/// Wait for `r` at most `limit` (a run blocked on a FIFO would never end).
fn finish_within(mut r: Running, limit: Duration) -> Out {
    let t = Instant::now();
    while r.running() {
        assert!(
            t.elapsed() < limit,
            "still running after {limit:?}: it hung"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    r.wait()
}

/// A `/dev/null` of our own (char device 1,3) in `dir`, when running as root.
fn own_dev_null(dir: &Path) -> Option<PathBuf> {
    if !rustix::process::geteuid().is_root() {
        return None;
    }
    let p = dir.join("null");
    let st = Command::new("mknod")
        .arg(&p)
        .args(["c", "1", "3"])
        .status()
        .expect("mknod");
    assert!(st.success());
    Some(p)
}

fn is_dev_null(p: &Path) -> bool {
    let m = std::fs::symlink_metadata(p).unwrap();
    m.file_type().is_char_device() && m.rdev() == rustix::fs::makedev(1, 3)
}

/// Names in `dir` that look like a temporary file of ours.
fn temps_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect()
}

#[test]
fn port_file_is_written_only_over_a_regular_file_or_nothing() {
    let t = tmp();
    let module = t.path().join("module");
    let state = t.path().join("state");
    let top = format!("state_dir = \"{}\"\n", s(&state));
    let config = Daemon::write_config(&t.path().join("d"), &[Module::rw("m", &module)], &top, "");
    let targets = t.path().join("targets");
    std::fs::create_dir(&targets).unwrap();
    let outside = t.path().join("outside");
    write(&outside, "precious\n");
    let link = targets.join("link");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let fifo = targets.join("fifo");
    mkfifo(&fifo);
    let dir = targets.join("dir");
    std::fs::create_dir(&dir).unwrap();
    let mut cases = vec![
        (link.clone(), "is a symlink"),
        (fifo.clone(), "is a FIFO"),
        (dir.clone(), "is a directory"),
    ];
    let null = own_dev_null(&targets);
    if let Some(n) = &null {
        cases.push((n.clone(), "is a character device"));
    }
    for (target, what) in &cases {
        let mut cmd = cutover_cmd();
        cmd.args(["serve", "--config", s(&config), "--port-file", s(target)]);
        let out = finish_within(Running::start(cmd), Duration::from_secs(20));
        let needle = format!("--port-file {}: {what}, not a regular file", s(target));
        assert_one_line_error(&out, &[&needle, "name a new file or a regular file"]);
        assert_eq!(out.code(), 1, "{out}");
    }
    // Nothing changed: not the targets, not the file a symlink points to, no temporary file,
    // and no key made in the state directory.
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "precious\n");
    assert_eq!(std::fs::read_link(&link).unwrap(), outside);
    let m = std::fs::symlink_metadata(&fifo).unwrap();
    assert!(m.file_type().is_fifo());
    assert!(std::fs::symlink_metadata(&dir).unwrap().is_dir());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    if let Some(n) = &null {
        assert!(is_dev_null(n), "{} is no longer a char device 1,3", s(n));
    }
    assert!(temps_in(&targets).is_empty(), "{:?}", temps_in(&targets));
    assert!(!state.exists(), "the refused daemon made its key");

    // A regular file is replaced by the port, through a temporary file that does not stay.
    let regular = targets.join("port");
    write(&regular, "old\n");
    let mut cmd = cutover_cmd();
    cmd.args(["serve", "--config", s(&config), "--port-file", s(&regular)]);
    let mut second = Running::start(cmd);
    let t0 = Instant::now();
    let port = loop {
        let text = std::fs::read_to_string(&regular).unwrap();
        if let Ok(p) = text.trim().parse::<u16>() {
            break p;
        }
        assert!(second.running() && t0.elapsed() < Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_ne!(port, 0);
    assert!(temps_in(&targets).is_empty(), "{:?}", temps_in(&targets));
}

#[test]
fn known_hosts_that_is_not_a_regular_file_is_refused_before_connecting() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("f"), "data\n");
    let module = t.path().join("module");
    let top = format!("state_dir = \"{}\"\n", s(&t.path().join("state")));
    let d = Daemon::start_with_extra(&t.path().join("d"), &[Module::rw("m", &module)], &top, "");
    let url = d.url("m/dst/");
    let outside = t.path().join("outside-known-hosts");
    write(&outside, "# kept by hand\n");
    let link = t.path().join("kh-link");
    std::os::unix::fs::symlink(&outside, &link).unwrap();
    let fifo = t.path().join("kh-fifo");
    mkfifo(&fifo);
    for (kh, what) in [(&link, "is a symlink"), (&fifo, "is a FIFO")] {
        let run = Running::start(sync_cmd(&["--known-hosts", s(kh), &slash(&src), &url]));
        let out = finish_within(run, Duration::from_secs(20));
        assert_one_line_error(&out, &[&format!("{}: {what}", s(kh))]);
        assert_eq!(out.code(), 1, "{out}");
    }
    assert_eq!(std::fs::read_link(&link).unwrap(), outside);
    assert_eq!(
        std::fs::read_to_string(&outside).unwrap(),
        "# kept by hand\n"
    );
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    assert!(
        !module.join("dst").exists(),
        "data moved despite the refusal"
    );
    assert!(temps_in(t.path()).is_empty(), "{:?}", temps_in(t.path()));
    // A regular known-hosts file is still written.
    let kh = t.path().join("kh");
    sync(&["--known-hosts", s(&kh), &slash(&src), &url]).ok();
    assert!(std::fs::read_to_string(&kh).unwrap().contains("127.0.0.1:"));
}

/// A plan whose log directory holds `docs.log` and `errors-latest.json` as given.
fn plan_with_logs(prepare: impl Fn(&Path)) -> (tempfile::TempDir, PathBuf, Out) {
    let (dir, _src, dst, p) = setup();
    write(
        &p,
        tree_task("docs", "src/docs/", &slash(&dst.join("docs")), ""),
    );
    let logs = dir.path().join("move.state/logs");
    std::fs::create_dir_all(&logs).unwrap();
    prepare(&logs);
    let mut cmd = cutover_cmd();
    cmd.args(["plan", "presync", s(&p)]);
    let out = finish_within(Running::start(cmd), Duration::from_secs(60));
    (dir, logs, out)
}

#[test]
fn plan_logs_never_append_through_a_symlink_or_block_on_a_fifo() {
    let outside_dir = tmp();
    let outside = outside_dir.path().join("victim");
    write(&outside, "precious\n");
    let (_dir, logs, out) = plan_with_logs(|logs| {
        std::os::unix::fs::symlink(&outside, logs.join("docs.log")).unwrap();
    });
    // The task fails (exit 3, as any failed task does) and says why; the file is untouched.
    assert_eq!(out.code(), 3, "{out}");
    let why = "docs: failed: cannot open its log: docs.log: is a symlink, not a regular file";
    assert!(out.stdout.contains(why), "{out}");
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "precious\n");
    assert!(std::fs::symlink_metadata(logs.join("docs.log"))
        .unwrap()
        .is_symlink());

    let (_dir, logs, out) = plan_with_logs(|logs| mkfifo(&logs.join("docs.log")));
    // The task fails (exit 3, as any failed task does) and says why; the file is untouched.
    assert_eq!(out.code(), 3, "{out}");
    let why = "docs: failed: cannot open its log: docs.log: is a FIFO, not a regular file";
    assert!(out.stdout.contains(why), "{out}");
    let m = std::fs::symlink_metadata(logs.join("docs.log")).unwrap();
    assert!(m.file_type().is_fifo());
}

#[test]
fn plan_reports_are_not_renamed_over_a_symlink_or_device() {
    let outside_dir = tmp();
    let outside = outside_dir.path().join("victim.json");
    write(&outside, "precious\n");
    let (_dir, logs, out) = plan_with_logs(|logs| {
        std::os::unix::fs::symlink(&outside, logs.join("errors-latest.json")).unwrap();
    });
    assert_eq!(out.code(), 1, "{out}");
    assert!(
        out.stderr
            .contains("errors-latest.json: is a symlink, not a regular file"),
        "{out}"
    );
    let latest = logs.join("errors-latest.json");
    assert_eq!(std::fs::read_link(&latest).unwrap(), outside);
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "precious\n");
    assert!(temps_in(&logs).is_empty(), "{:?}", temps_in(&logs));

    let (_dir, logs, out) = plan_with_logs(|logs| {
        if let Some(n) = own_dev_null(logs) {
            std::fs::rename(n, logs.join("errors-latest.json")).unwrap();
        }
    });
    let latest = logs.join("errors-latest.json");
    if std::fs::symlink_metadata(&latest).is_ok() {
        assert_eq!(out.code(), 1, "{out}");
        assert!(
            out.stderr
                .contains("errors-latest.json: is a character device"),
            "{out}"
        );
        assert!(is_dev_null(&latest));
    }
}

#[test]
fn a_token_file_readable_by_others_gets_a_warning() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("f"), "data\n");
    let module = t.path().join("module");
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let token = t.path().join("token");
    write(&token, format!("{TOKEN}\n"));
    chmod(&token, 0o644);
    let out = sync(&["--token-file", s(&token), &slash(&src), &d.url("m/dst/")]);
    out.ok();
    let warnings: Vec<_> = out
        .err_lines()
        .into_iter()
        .filter(|l| l.contains("chmod 600"))
        .collect();
    assert_eq!(warnings.len(), 1, "{out}");
    assert!(warnings[0].contains(s(&token)), "{out}");
    chmod(&token, 0o600);
    let out = sync(&["--token-file", s(&token), &slash(&src), &d.url("m/dst2/")]);
    out.ok();
    assert!(!out.stderr.contains("chmod 600"), "{out}");
}

/// The daemon refuses (stronger than a warning: the token grants write access) to start with
/// a `token_file` its group or others can read. Already so before issue 13; kept covered.
#[test]
fn a_daemon_refuses_a_token_file_others_can_read() {
    let t = tmp();
    let module = t.path().join("module");
    let top = format!("state_dir = \"{}\"\n", s(&t.path().join("state")));
    let d = t.path().join("d");
    let config = Daemon::write_config(&d, &[Module::rw("m", &module)], &top, "");
    chmod(&d.join("token"), 0o640);
    let mut cmd = cutover_cmd();
    cmd.args(["serve", "--config", s(&config)]);
    let out = finish_within(Running::start(cmd), Duration::from_secs(20));
    let token = d.join("token");
    assert_one_line_error(&out, &[s(&token), "mode 0640", "chmod 600"]);
    assert_eq!(out.code(), 1, "{out}");
}
