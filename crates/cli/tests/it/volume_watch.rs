//! Watching replicated volumes, on two real daemons on loopback with a 4 MiB volume:
//! `cutover volume status --watch` into a pipe prints each new state once (text blocks, or
//! JSON lines), ends with status 0 on Ctrl-C or when its reader goes away, and with one
//! line and status 1 when the daemon goes away; the daemon's `[[volume_notify]]` hooks: a
//! command told once that a stopped peer is gone and once that it is back (the event's
//! JSON on stdin, its names in the environment), and a webhook POSTed a split brain.

use crate::replication::{configure, have_qemu, node_of, volume, wait_in_step, Node};
use crate::split_brain::{split, wait_for};
use crate::util::*;
use rustix::process::Signal;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};

/// Small: these tests watch states, not data.
const SMALL: u64 = 4 << 20;

/// Two nodes replicating a 4 MiB "db" in step, `a` primary (it dials `b`); `a_top` is
/// added to a's config (top-level tables such as `[[volume_notify]]`).
fn small_pair(root: &Path, a_top: &str) -> (Node, Daemon, Node, Daemon) {
    let a = node_of(root, "a", SMALL);
    let b = node_of(root, "b", SMALL);
    configure(&b, "a", &a.fingerprint, "");
    volume(&b, &["create-md", "db"]).ok();
    let db = Daemon::start_with(&b.dir, &b.config);
    configure(
        &a,
        "b",
        &b.fingerprint,
        &format!("address = \"127.0.0.1:{}\"\n", db.port),
    );
    let text = std::fs::read_to_string(&a.config).unwrap();
    std::fs::write(&a.config, format!("{text}{a_top}")).unwrap();
    volume(&a, &["create-md", "db"]).ok();
    let da = Daemon::start_with(&a.dir, &a.config);
    volume(&a, &["primary", "db", "--force"]).ok();
    wait_in_step(&a, &b, "initial sync");
    (a, da, b, db)
}

/// `cutover volume status db --watch --interval 0.2` on `n`, stdout piped.
fn watch_cmd(n: &Node, extra: &[&str]) -> std::process::Command {
    let mut c = cutover_cmd();
    c.args(["volume", "status", "db", "--watch", "--interval", "0.2"])
        .args(extra)
        .args(["--config", s(&n.config)]);
    c
}

/// The blocks of a piped text watch, each without its header line (checked here).
fn blocks(out: &Out) -> Vec<String> {
    out.stdout
        .split("\n\n")
        .map(|b| {
            let (head, body) = b.split_once('\n').unwrap_or((b, ""));
            assert!(
                head.starts_with("Every 0.2s: cutover volume status db    20"),
                "header {head:?} in\n{out}"
            );
            body.to_string()
        })
        .collect()
}

#[test]
fn status_watch_into_a_pipe_prints_each_new_state_and_ends_cleanly() {
    let t = tmp();
    let (a, mut da, b, _db) = small_pair(t.path(), "");
    let text = Running::start(watch_cmd(&a, &[]));
    let json = Running::start(watch_cmd(&a, &["--json"]));
    // Several looks at one state, then two changes of the link.
    std::thread::sleep(Duration::from_millis(1000));
    volume(&a, &["disconnect", "db"]).ok();
    std::thread::sleep(Duration::from_millis(600));
    volume(&a, &["connect", "db"]).ok();
    wait_in_step(&a, &b, "reconnected");
    std::thread::sleep(Duration::from_millis(600));
    text.signal(Signal::INT);
    json.signal(Signal::INT);

    let out = text.wait();
    assert_eq!(out.code(), 0, "{out}");
    let blocks = blocks(&out);
    assert!(blocks.len() >= 3, "{out}");
    assert!(
        blocks[0].contains("peer b (dialled, protocol C): connected"),
        "{out}"
    );
    assert!(
        blocks
            .iter()
            .any(|b| b.contains("peer b (dialled, protocol C): disconnected")),
        "{out}"
    );
    assert!(
        blocks.last().unwrap().contains(": connected, source"),
        "{out}"
    );
    // A state is printed once, however many looks saw it.
    assert!(blocks.windows(2).all(|w| w[0] != w[1]), "{out}");
    assert!(
        blocks.len() < 12,
        "the same state printed again and again:\n{out}"
    );

    let out = json.wait();
    assert_eq!(out.code(), 0, "{out}");
    let docs = out.json();
    assert_eq!(docs.len(), out.stdout.lines().count(), "{out}");
    assert!(docs.len() >= 3, "{out}");
    let conn = |d: &Value| d["volumes"][0]["peers"][0]["connection"].clone();
    assert!(docs
        .iter()
        .all(|d| d["time"].is_string() && d["volumes"][0]["name"] == "db"));
    assert!(docs.iter().any(|d| conn(d) == "disconnected"), "{out}");
    assert!(
        docs.windows(2).all(|w| w[0]["volumes"] != w[1]["volumes"]),
        "{out}"
    );

    // Its reader gone (`| head -1`), a watch ends at once, without waiting for a change.
    let mut c = watch_cmd(&a, &[]);
    c.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut first = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    assert!(first.starts_with("Every 0.2s"), "{first}");
    drop(stdout);
    let started = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > Duration::from_secs(5) {
            let _ = child.kill();
            panic!("the watch did not end within 5 s of its reader");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(st.code(), Some(0));

    // The daemon going away ends the watch: one line, status 1.
    let watching = Running::start(watch_cmd(&a, &[]));
    std::thread::sleep(Duration::from_millis(500));
    let _ = da.terminate().wait();
    let out = watching.wait();
    assert_one_line_error(&out, &["cutover volume status: the daemon went away"]);
    assert!(out.stdout.starts_with("Every 0.2s"), "{out}");
}

/// A `[[volume_notify]]` command that appends its stdin (one JSON document) to
/// `dir/notices` and its environment to `dir/env`.
fn recording_hook(dir: &Path, extra: &str) -> String {
    format!(
        "[[volume_notify]]\ncommand = '{{ cat; echo; }} >> {0}/notices; \
         echo \"$CUTOVER_EVENT $CUTOVER_VOLUME $CUTOVER_PEER $CUTOVER_RESOLVED\" >> {0}/env'\n{extra}",
        s(dir)
    )
}

/// The JSON documents in `path` once there are `n` (10 s at most).
fn wait_lines(path: &Path, n: usize, what: &str) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let docs: Vec<Value> = text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
            .collect();
        if docs.len() >= n {
            return docs;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: {} notice(s) after 10 s: {text}",
            docs.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_notify_command_is_told_once_that_a_stopped_peer_is_gone_and_once_that_it_is_back() {
    let t = tmp();
    let hook = recording_hook(t.path(), "on = [\"peer-gone\"]\npeer_gone_secs = 1\n");
    let (a, da, b, mut db) = small_pair(t.path(), &hook);
    let _ = db.terminate().wait();
    // Back on the port a dials.
    let text = std::fs::read_to_string(&b.config).unwrap();
    let text = text.replace("127.0.0.1:0", &format!("127.0.0.1:{}", db.port));
    std::fs::write(&b.config, text).unwrap();
    let gone = wait_lines(&t.path().join("notices"), 1, "peer gone");
    let n = &gone[0];
    assert_eq!(n["event"], "peer-gone", "{n}");
    assert_eq!(n["resolved"], false, "{n}");
    assert_eq!(
        (&n["volume"], &n["peer"]),
        (&"db".into(), &"b".into()),
        "{n}"
    );
    assert_eq!(
        (&n["role"], &n["disk"]),
        (&"primary".into(), &"UpToDate".into()),
        "{n}"
    );
    assert_ne!(n["state"]["connection"], "connected", "{n}");
    let m = n["message"].as_str().unwrap();
    assert!(m.starts_with("volume db: peer b not connected for "), "{m}");
    assert!(n["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{n}");
    // Still gone: no more notices.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(wait_lines(&t.path().join("notices"), 1, "").len(), 1);

    let _db = Daemon::start_with(&b.dir, &b.config);
    wait_in_step(&a, &b, "the peer back");
    let back = wait_lines(&t.path().join("notices"), 2, "peer back");
    assert_eq!(back.len(), 2, "{back:?}");
    assert_eq!(
        (&back[1]["event"], &back[1]["resolved"]),
        (&"peer-gone".into(), &true.into())
    );
    assert_eq!(back[1]["message"], "volume db: peer b connected again");
    let env = std::fs::read_to_string(t.path().join("env")).unwrap();
    assert_eq!(env, "peer-gone db b 0\npeer-gone db b 1\n");
    drop(da);
}

/// A local HTTP server that answers 200 to every POST and hands over each body.
fn webhook_server() -> (u16, std::sync::mpsc::Receiver<(String, Value)>) {
    use std::io::{BufRead, Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            let mut r = std::io::BufReader::new(c.try_clone().unwrap());
            let (mut line, mut request, mut length) = (String::new(), String::new(), 0);
            while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                if request.is_empty() {
                    request = line.trim().to_string();
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                line.clear();
            }
            let mut body = vec![0; length];
            let _ = r.read_exact(&mut body);
            let _ =
                c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
            let body = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if tx.send((request, body)).is_err() {
                return;
            }
        }
    });
    (port, rx)
}

#[test]
fn a_webhook_is_posted_a_split_brain() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let (port, posts) = webhook_server();
    let hook = format!(
        "[[volume_notify]]\nwebhook = \"http://127.0.0.1:{port}/hooks/T0/secret\"\non = [\"split-brain\"]\n"
    );
    let (a, da, b, db) = small_pair(t.path(), &hook);
    split(&a, &b, &["write -P 0xaa 1M 64k"], &["write -P 0xbb 2M 16k"]);
    let (request, n) = posts
        .recv_timeout(Duration::from_secs(20))
        .expect("no POST within 20 s of the split brain");
    assert_eq!(request, "POST /hooks/T0/secret HTTP/1.1");
    assert_eq!(
        (&n["event"], &n["resolved"]),
        (&"split-brain".into(), &false.into()),
        "{n}"
    );
    assert_eq!(
        (&n["volume"], &n["peer"]),
        (&"db".into(), &"b".into()),
        "{n}"
    );
    let m = n["message"].as_str().unwrap();
    assert!(
        m.starts_with("volume db: peer b: refused: split brain: this node wrote"),
        "{m}"
    );
    assert_eq!(n["state"]["connection"], "standalone", "{n}");
    // Settled: one more POST, resolved.
    volume(&b, &["connect", "db", "--discard-my-data"]).ok();
    volume(&a, &["connect", "db"]).ok();
    wait_for(&a, "connected again", |st| {
        st["peers"][0]["connection"] == "connected"
    });
    let (_, n) = posts
        .recv_timeout(Duration::from_secs(10))
        .expect("no resolved POST");
    assert_eq!(
        (&n["event"], &n["resolved"]),
        (&"split-brain".into(), &true.into()),
        "{n}"
    );
    assert!(
        posts.recv_timeout(Duration::from_millis(500)).is_err(),
        "a POST too many"
    );
    drop((da, db));
}
