//! Plans after the final pass and around it: `verify_mode` (content hashes compared on both
//! sides, through a real daemon), webhook notify hooks (a real HTTP listener on loopback) and
//! `destination_command` on ssh destinations (a real sshd) or refused for daemon ones.

use crate::delta::corrupt_behind_size_and_mtime;
use crate::plan::{errors_json, example_copy, hook, plan, setup, status, task, tree_task};
use crate::util::*;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::time::Duration;

/// The report (JSON) and its Markdown twin of the plan's run number `run`.
fn report_of_run(dir: &Path, run: u32) -> (Value, String) {
    let logs = dir.join("move.state/logs");
    let json = std::fs::read_dir(&logs)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with("report-") && n.ends_with(&format!("-run{run}.json"))
        })
        .unwrap_or_else(|| panic!("no report of run {run} in {}", logs.display()));
    let v = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (
        v,
        std::fs::read_to_string(json.with_extension("md")).unwrap(),
    )
}

fn report_task<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["tasks"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["task"] == name))
        .unwrap_or_else(|| panic!("no task {name} in {report}"))
}

/// Append a byte to `path`'s content without changing its length: rewrite one byte.
fn touch_content(path: &Path) {
    let mut b = std::fs::read(path).unwrap();
    b[0] = b[0].wrapping_add(1);
    std::fs::write(path, b).unwrap();
}

#[test]
fn verify_mode_full_passes_a_clean_cutover_and_finds_what_was_corrupted_behind_its_back() {
    let (dir, src, dst, p) = setup();
    let module = dir.path().join("module");
    let d = Daemon::start(&dir.path().join("daemon"), &[Module::rw("m", &module)]);
    write(
        &p,
        format!(
            "verify_mode = \"full\"\n{}{}{}{}",
            // Through the daemon, with the plan's default: full.
            tree_task("remote", "src/docs/", &d.url("m/docs/"), ""),
            tree_task(
                "sent",
                "src/data/",
                &slash(&dst.join("data")),
                "verify_mode = \"transferred\""
            ),
            tree_task(
                "none",
                "src/",
                &slash(&dst.join("rest")),
                "excludes = [\"/docs/\", \"/data/\"]\nverify_mode = \"none\""
            ),
            hook("post_final", "echo thawed >> thawed", ""),
        ),
    );
    plan(&["presync", s(&p)]).ok();
    // The final pass sends one file of `sent`, which "transferred" then compares.
    touch_content(&src.join("data/2026/block0.bin"));
    let out = plan(&["cutover", s(&p)]);
    out.ok();
    assert!(!out.stdout.contains("mismatch"), "{out}");
    let (r, _) = report_of_run(dir.path(), 2);
    assert_eq!(report_task(&r, "remote")["verify"], "ok", "{r}");
    assert_eq!(report_task(&r, "sent")["verify"], "ok", "{r}");
    assert_eq!(report_task(&r, "none")["verify"], "-", "{r}");
    let sent_log = std::fs::read_to_string(dir.path().join("move.state/logs/sent.log")).unwrap();
    assert!(
        sent_log.contains("verify_mode transferred: comparing content hashes of the 1 entries the final pass sent"),
        "{sent_log}"
    );

    // Behind cutover's back: one byte of a file in each destination, size and mtime kept.
    // A normal pass cannot see it.
    corrupt_behind_size_and_mtime(&module.join("docs/note03.txt"), 3);
    corrupt_behind_size_and_mtime(&dst.join("data/2026/block1.bin"), 100);
    corrupt_behind_size_and_mtime(&dst.join("rest/README.txt"), 0);
    touch_content(&src.join("data/2026/block0.bin"));
    let out = plan(&["cutover", s(&p)]);
    out.expect_code(3);
    // "full" compares everything and finds it; the pass itself sent nothing for it.
    assert!(
        out.stdout
            .contains("mismatch: remote: note03.txt: content differs"),
        "{out}"
    );
    assert!(
        out.stdout
            .contains("remote: verify_mode full: 1 mismatch (first: note03.txt: content differs)"),
        "{out}"
    );
    // "transferred" compares only what the final pass sent (block0), as DataSync's
    // ONLY_FILES_TRANSFERRED does; "none" compares nothing.
    assert!(!out.stdout.contains("block1.bin"), "{out}");
    assert!(!out.stdout.contains("README.txt"), "{out}");
    let (r, md) = report_of_run(dir.path(), 3);
    let remote = report_task(&r, "remote");
    assert_eq!(remote["result"], "ok", "{r}");
    assert_eq!(remote["verify"], "mismatch (1)", "{r}");
    assert_eq!(
        remote["mismatches"],
        serde_json::json!([{"path": "note03.txt", "reason": "content differs"}])
    );
    assert_eq!(report_task(&r, "sent")["verify"], "ok", "{r}");
    assert_eq!(report_task(&r, "none")["verify"], "-", "{r}");
    assert!(md.contains("| remote | ok |"), "{md}");
    assert!(md.contains("| mismatch (1) |"), "{md}");
    assert!(
        md.contains("## Mismatches\n\n- **remote** `note03.txt`: content differs"),
        "{md}"
    );
    // The task failed verification: post_final did not run again, rerun picks it up.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("thawed")).unwrap(),
        "thawed\n"
    );
    let st = status(&p);
    assert_eq!(task(&st, "remote")["phase"], "failed");
    assert_eq!(task(&st, "sent")["phase"], "done");
    assert_eq!(
        errors_json(dir.path())["rerun"],
        serde_json::json!(["remote"])
    );
    // Nothing was repaired behind the user's back either: it is a check, not a pass.
    assert_ne!(
        std::fs::read(module.join("docs/note03.txt")).unwrap(),
        std::fs::read(src.join("docs/note03.txt")).unwrap()
    );
}

#[test]
fn bad_verify_mode_and_hook_keys_are_named() {
    let dir = tmp();
    let p = dir.path().join("move.toml");
    let t = tree_task("a", "src/", "dst/", "verify_mode = \"some\"");
    write(&p, &t);
    assert_one_line_error(
        &plan(&["check", s(&p)]),
        &["move.toml:6:", "some", "transferred", "full", "none"],
    );
    let t = tree_task("a", "src/", "dst/", "");
    write(
        &p,
        format!("{t}[[on_failure]]\nwebhook = \"ftp://hooks.example/x\"\n"),
    );
    assert_one_line_error(
        &plan(&["check", s(&p)]),
        &["move.toml:8:", "webhook", "http:// or https://"],
    );
    write(
        &p,
        format!("{t}[[pre_final]]\nwebhook = \"https://hooks.example/x\"\n"),
    );
    assert_one_line_error(
        &plan(&["check", s(&p)]),
        &[
            "move.toml:8:",
            "[[pre_final]] webhook only applies to notify hooks",
        ],
    );
    write(
        &p,
        format!("{t}[[on_success]]\ncommand = \"true\"\nwebhook = \"https://hooks.example/x\"\n"),
    );
    assert_one_line_error(
        &plan(&["check", s(&p)]),
        &["move.toml:9:", "both command and webhook"],
    );
}

/// One HTTP request received by [`listen_once`]: its head (request line and headers) and body.
struct Request {
    head: String,
    body: Vec<u8>,
}

/// A tiny HTTP server on 127.0.0.1: takes one request, answers `status`, hands it back.
fn listen_once(status: u16) -> (u16, std::sync::mpsc::Receiver<Request>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((mut conn, _)) = l.accept() else {
            return;
        };
        conn.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse::<usize>().ok())?
            })
            .unwrap_or(0);
        let mut body = vec![0; len];
        reader.read_exact(&mut body).unwrap();
        let _ = write!(
            conn,
            "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        let _ = tx.send(Request { head, body });
    });
    (port, rx)
}

#[test]
fn webhooks_get_the_json_summary_and_a_failing_one_changes_nothing() {
    let (dir, _src, dst, p) = setup();
    let (port, got) = listen_once(200);
    // Nothing listens here: the on_failure webhook fails.
    let closed = free_port();
    let secret = "T0-secret-path";
    let tasks = tree_task("docs", "src/docs/", &slash(&dst.join("docs")), "");
    write(
        &p,
        format!(
            "{tasks}[[on_success]]\nwebhook = \"http://127.0.0.1:{port}/hooks/{secret}\"\ntimeout = \"10s\"\n\
             [[on_failure]]\nwebhook = \"http://127.0.0.1:{closed}/hooks/{secret}\"\ntimeout = \"5s\"\n\
             [[on_failure]]\ncommand = \"touch alerted\"\n"
        ),
    );
    plan(&["presync", s(&p)]).ok();
    let req = got
        .recv_timeout(Duration::from_secs(20))
        .expect("the webhook was not called");
    assert!(
        req.head
            .starts_with(&format!("POST /hooks/{secret} HTTP/1.1\r\n")),
        "{}",
        req.head
    );
    assert!(
        req.head
            .to_ascii_lowercase()
            .contains("content-type: application/json\r\n"),
        "{}",
        req.head
    );
    // The body is the run's report: the same JSON as the report file.
    let body: Value = serde_json::from_slice(&req.body).unwrap();
    assert_eq!(body["mode"], "presync");
    assert_eq!(body["outcome"], "ok");
    assert_eq!(body["tasks"][0]["task"], "docs");
    let (file, _) = report_of_run(dir.path(), 1);
    assert_eq!(body, file);

    // A failing run: the webhook cannot connect; that is logged, the next hook still runs,
    // and the outcome (exit 3, the task's failure) is the run's own.
    std::fs::remove_dir_all(dir.path().join("src/docs")).unwrap();
    let out = plan(&["presync", s(&p)]);
    out.expect_code(3);
    assert!(
        out.stdout.contains(&format!(
            "on_failure hook \"webhook to http://127.0.0.1:{closed}\" failed: POST http://127.0.0.1:{closed}:"
        )),
        "{out}"
    );
    assert!(dir.path().join("alerted").exists());
    let hooks_log = std::fs::read_to_string(dir.path().join("move.state/logs/hooks.log")).unwrap();
    assert!(hooks_log.contains("answered 200"), "{hooks_log}");
    // The URL's path (often the hook's secret) is never written down.
    assert!(!hooks_log.contains(secret), "{hooks_log}");
    assert!(!out.stdout.contains(secret), "{out}");
}

#[test]
fn destination_command_runs_on_an_ssh_destination_and_is_refused_for_a_daemon() {
    let dir = tmp();
    example_copy(dir.path());
    let sshd = Sshd::start(&dir.path().join("sshd"));
    let remote = dir.path().join("remote");
    std::fs::create_dir(&remote).unwrap();
    let restored = dir.path().join("restored.txt");
    let p = dir.path().join("move.toml");
    // The "dump" is a tree listing; the "restore" writes what it reads, on the remote side
    // (here the same machine, reached through sshd as root).
    write(
        &p,
        format!(
            "[[task]]\nname = \"db\"\nkind = \"command\"\ncommand = \"cat src/docs/note0*.txt\"\n\
             destination = \"root@127.0.0.1:{}/\"\ndestination_command = \"cat > {}; echo restored-on-$(hostname) >&2\"\n\
             rsh = \"{}\"\nremote_cutover = \"{}\"\nverify_mode = \"full\"\n",
            s(&remote),
            s(&restored),
            sshd.rsh(),
            bin()
        ),
    );
    plan(&["check", s(&p)]).ok();
    plan(&["presync", s(&p)]).ok();
    // Presync moves the dump only; the restore belongs to the final pass.
    assert!(!restored.exists());
    let logins = sshd.logins();
    let out = plan(&["cutover", s(&p)]);
    out.ok();
    let dump = std::fs::read(remote.join("db")).unwrap();
    assert!(dump.len() > 100);
    assert_eq!(std::fs::read(&restored).unwrap(), dump);
    // It went through ssh (the sync's connections and the command's own login).
    assert!(sshd.logins() > logins, "{}", sshd.logins());
    let log = std::fs::read_to_string(dir.path().join("move.state/logs/db.log")).unwrap();
    assert!(log.contains("destination_command: restored-on-"), "{log}");
    assert!(log.contains("destination_command done"), "{log}");
    assert!(
        log.contains("verify_mode full: same content on both sides"),
        "{log}"
    );

    // A daemon runs no commands: `check` says so, with the task, the key and the fix.
    write(
        &p,
        "[[task]]\nname = \"db\"\nkind = \"command\"\ncommand = \"true\"\n\
         destination = \"cutover://new-dc/data/db.dump\"\ndestination_command = \"pg_restore -d app\"\n",
    );
    assert_one_line_error(
        &plan(&["check", s(&p)]),
        &[
            "move.toml:6:",
            "task \"db\": destination_command",
            "a daemon never runs commands",
            "[user@]host:PATH",
        ],
    );
}
