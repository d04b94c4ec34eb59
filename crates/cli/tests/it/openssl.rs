//! Interoperability with OpenSSL 3: `openssl s_client` against the real daemon. A handshake
//! with the exporter-based token proof computed from OpenSSL's own keying material, KeyUpdate
//! messages from the client (with and without asking the daemon to update too, and one sent
//! in the same TCP write as the client's Finished), a close_notify before the hello,
//! truncated, over-long and garbage records after the handshake, and ALPN refusals. Every
//! test checks what OpenSSL saw, what the daemon logged, and that the daemon still serves.
//!
//! OpenSSL's `-msg` trace (`-msgfile`) shows every TLS message either way in the clear, which
//! is how the tests see KeyUpdates that are encrypted on the wire.

use crate::util::*;
use proto::{Hello, NewSession, Role, SyncOptions, Welcome, PROTOCOL_VERSION};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The exporter label of the token proof (`net::tls`).
const LABEL: &str = "EXPORTER-cutover-token-proof";
/// Patience for anything OpenSSL or the daemon should do at once (CI machines are loaded).
const WAIT: Duration = Duration::from_secs(20);
/// How long to watch for a second log line, or more output, after the expected one came.
const SETTLE: Duration = Duration::from_millis(400);
/// Content types of TLS records.
const CHANGE_CIPHER_SPEC: u8 = 20;
const APPLICATION_DATA: u8 = 23;
/// Length field of the record that carries a KeyUpdate in TLS 1.3 with a 16-byte AEAD tag:
/// the 5-byte message, the inner content type and the tag. No other record of the client's
/// flight has this length (an empty Certificate is 25, a Finished 53 or 69).
const KEY_UPDATE_RECORD: usize = 5 + 1 + 16;
/// s_client takes a stdin chunk starting with one of these as a command, not as data.
const COMMAND_LETTERS: &[u8] = b"QRKk";

/// A small tree for the "still serves" push at the end of every test.
fn probe_tree(dir: &Path) -> PathBuf {
    let src = dir.join("probe");
    write(&src.join("a"), "probe a\n");
    write(&src.join("sub/b"), random_bytes(7, 3000));
    src
}

/// A normal `cutover sync` push to the daemon must still work and land exactly.
fn assert_serves(d: &Daemon, module: &Path, src: &Path, tag: &str) {
    sync(&[&slash(src), &d.url(&format!("m/{tag}/"))]).ok();
    assert_same(src, &module.join(tag));
}

/// A daemon with one token-protected read-write module `m`.
struct Setup {
    t: tempfile::TempDir,
    module: PathBuf,
    probe: PathBuf,
    d: Daemon,
}

fn setup() -> Setup {
    let t = tmp();
    let module = t.path().join("module");
    let probe = probe_tree(t.path());
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    // Its last start-up line may come just after the port file: the log lines a test counts
    // start after it.
    assert!(d.log_shows("listening on", WAIT), "{}", d.log());
    Setup {
        t,
        module,
        probe,
        d,
    }
}

// ---------------------------------------------------------------------------------------------
// `openssl s_client` as a child process.

/// The last 6000 bytes of `t` or a little less (from a character boundary).
fn tail(t: &str) -> &str {
    let mut from = t.len().saturating_sub(6000);
    while !t.is_char_boundary(from) {
        from += 1;
    }
    &t[from..]
}

/// Collect everything a pipe delivers into a shared buffer, as it arrives.
fn gather(mut r: impl Read + Send + 'static, into: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 << 10];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

/// A running `openssl s_client`, killed on drop.
struct SClient {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    trace: PathBuf,
    readers: Vec<JoinHandle<()>>,
}

impl SClient {
    /// `openssl s_client -connect 127.0.0.1:PORT -tls1_3` exporting the token proof's keying
    /// material, offering `alpn` (none: no ALPN extension), tracing messages to a file in `dir`.
    fn start(dir: &Path, port: u16, alpn: Option<&str>) -> SClient {
        std::fs::create_dir_all(dir).unwrap();
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let trace = dir.join(format!("s_client-{n}.msg"));
        let mut cmd = Command::new("openssl");
        cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(["-tls1_3", "-keymatexport", LABEL, "-keymatexportlen", "32"])
            .args(["-msg", "-msgfile", s(&trace)]);
        if let Some(p) = alpn {
            cmd.args(["-alpn", p]);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run openssl s_client (install openssl): {e}"));
        let (out, err) = (Arc::default(), Arc::default());
        let readers = vec![
            gather(child.stdout.take().unwrap(), Arc::clone(&out)),
            gather(child.stderr.take().unwrap(), Arc::clone(&err)),
        ];
        SClient {
            stdin: child.stdin.take(),
            child,
            out,
            err,
            trace,
            readers,
        }
    }

    fn stdout(&self) -> Vec<u8> {
        self.out.lock().unwrap().clone()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// OpenSSL's trace of the messages sent (`>>>`) and received (`<<<`).
    fn trace(&self) -> String {
        std::fs::read_to_string(&self.trace).unwrap_or_default()
    }

    /// Everything s_client printed so far, for failure messages.
    fn dump(&self) -> String {
        let out = String::from_utf8_lossy(&self.stdout()).into_owned();
        let trace = self.trace();
        format!(
            "--- s_client stdout (tail):\n{}\n--- s_client stderr:\n{}\n--- s_client -msg trace (tail):\n{}",
            tail(&out),
            self.stderr(),
            tail(&trace)
        )
    }

    /// Wait until `done` holds for (stdout, stderr); panics with everything after `WAIT`.
    fn wait_for(&self, what: &str, done: impl Fn(&[u8], &str) -> bool) {
        let started = Instant::now();
        while !done(&self.stdout(), &self.stderr()) {
            assert!(
                started.elapsed() < WAIT,
                "s_client: no {what} within {WAIT:?}\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exporter output (`Keying material: HEX`), printed once the handshake is done.
    fn keying_material(&self) -> [u8; 32] {
        self.wait_for("keying material", |out, _| keying_material(out).is_some());
        keying_material(&self.stdout()).unwrap()
    }

    /// Write `bytes` to s_client's stdin (it sends them as application data, or takes them
    /// as a command when they start with a command letter).
    fn send(&mut self, bytes: &[u8]) {
        self.send_or(bytes, String::new);
    }

    /// `send`, adding `context` (the daemon's log) to the failure when s_client has exited.
    fn send_or(&mut self, bytes: &[u8], context: impl Fn() -> String) {
        let stdin = self.stdin.as_mut().expect("s_client stdin is open");
        if let Err(e) = stdin.write_all(bytes).and_then(|()| stdin.flush()) {
            // s_client has exited: the connection ended.
            std::thread::sleep(SETTLE);
            panic!(
                "cannot write to s_client's stdin ({e}): it exited, {:?}\n{}\n{}",
                self.child.try_wait(),
                self.dump(),
                context()
            );
        }
    }

    /// Ask for a KeyUpdate (`K`: the peer must update too; `k`: it need not) and wait until
    /// s_client took the command, so the next write is read as data on its own.
    fn key_update(&mut self, requested: bool) {
        let before = self.stderr().matches("KEYUPDATE").count();
        self.send(if requested { b"K\n" } else { b"k\n" });
        self.wait_for("KEYUPDATE (the command taken)", |_, err| {
            err.matches("KEYUPDATE").count() > before
        });
    }

    /// Close stdin (s_client then sends close_notify and exits) and wait for the exit.
    fn finish(mut self) -> Finished {
        drop(self.stdin.take());
        let started = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break st;
            }
            assert!(
                started.elapsed() < WAIT,
                "s_client did not exit within {WAIT:?} of its stdin closing\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Finished {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
            trace: self.trace(),
            dump: self.dump(),
        }
    }
}

impl Drop for SClient {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What an s_client that exited left behind.
struct Finished {
    status: ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
    trace: String,
    dump: String,
}

impl Finished {
    /// The alert numbers s_client reported receiving ("SSL alert number N").
    fn alerts(&self) -> Vec<u32> {
        alert_numbers(&self.stderr)
    }
}

/// The alerts in an OpenSSL `-msg` trace that came from the peer ("fatal decode_error",
/// "warning close_notify").
fn received_alerts(trace: &str) -> Vec<String> {
    trace
        .lines()
        .filter(|l| l.starts_with("<<<") && l.contains(", Alert ["))
        .filter_map(|l| l.rsplit_once("], ").map(|(_, a)| a.to_string()))
        .collect()
}

fn alert_numbers(text: &str) -> Vec<u32> {
    text.split("SSL alert number ")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// `Keying material: <64 hex digits>` in s_client's (or s_server's) output.
fn keying_material(out: &[u8]) -> Option<[u8; 32]> {
    let text = String::from_utf8_lossy(out);
    let at = text.find("Keying material: ")?;
    let hex = text[at + "Keying material: ".len()..].get(..64)?;
    let mut km = [0u8; 32];
    for (i, b) in km.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(km)
}

/// A hello as a complete frame.
fn hello_bytes(hello: &Hello) -> Vec<u8> {
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    proto::frame::encode_frame(hello, false, &mut None, &mut plain, &mut out).expect("encode");
    out
}

/// A welcome as a complete frame.
fn welcome_bytes(welcome: &Welcome) -> Vec<u8> {
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    proto::frame::encode_frame(welcome, false, &mut None, &mut plain, &mut out).expect("encode");
    out
}

/// The frame of a `Hello::New` push to module `m` proving `token` over `binding`. The frame
/// starts with its length's low byte, which must not be a command letter of s_client: the
/// path grows until it is not.
fn hello_frame(token: &str, binding: &[u8; 32]) -> Vec<u8> {
    for extra in 0..4 {
        let hello = Hello::New(NewSession {
            version: PROTOCOL_VERSION,
            module: "m".into(),
            path: format!("ossl{}/", "x".repeat(extra)),
            server_role: Role::Receiver,
            options: SyncOptions::default(),
            token_proof: Some(net::tls::token_proof(token.as_bytes(), binding)),
        });
        let bytes = hello_bytes(&hello);
        if !COMMAND_LETTERS.contains(&bytes[0]) {
            return bytes;
        }
    }
    unreachable!("four consecutive lengths cannot all be command letters")
}

/// The `Welcome` frame in s_client's stdout: the first place where a frame decodes as a
/// `Welcome` that encodes back to exactly those bytes (s_client's own text around it has no
/// NUL bytes, so cannot pass for a length prefix of a small frame).
fn find_welcome(out: &[u8]) -> Option<Welcome> {
    (0..out.len().saturating_sub(5)).find_map(|i| {
        let len = u32::from_le_bytes(out[i..i + 4].try_into().unwrap()) as usize;
        if len == 0 || len > 4096 || i + 4 + len > out.len() {
            return None;
        }
        let welcome = proto::frame::decode_payload::<Welcome>(out[i + 4], &out[i + 5..i + 4 + len])
            .ok()
            .flatten()?;
        (welcome_bytes(&welcome) == out[i..i + 4 + len]).then_some(welcome)
    })
}

/// KeyUpdate messages in an OpenSSL `-msg` trace, in order: (received, update_requested).
fn key_updates(trace: &str) -> Vec<(bool, bool)> {
    let lines: Vec<&str> = trace.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.ends_with("KeyUpdate"))
        .filter_map(|(i, l)| {
            // The message's bytes follow on the next line (once written).
            let body = lines.get(i + 1)?.trim();
            Some((l.starts_with("<<<"), body == "18 00 00 01 01"))
        })
        .collect()
}

/// Line numbers in the trace of received KeyUpdates and of received application data
/// records (an inner content type of 0x17), to tell which came first.
fn received_order(trace: &str) -> (Vec<usize>, Vec<usize>) {
    let lines: Vec<&str> = trace.lines().collect();
    let mut updates = Vec::new();
    let mut data = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if !l.starts_with("<<<") {
            continue;
        }
        if l.ends_with("KeyUpdate") {
            updates.push(i);
        }
        if l.contains("InnerContent") && lines.get(i + 1).map(|b| b.trim()) == Some("17") {
            data.push(i);
        }
    }
    (updates, data)
}

// ---------------------------------------------------------------------------------------------
// The daemon's log.

/// Daemon log lines written after `mark` (a byte length of the log): waits until there are
/// at least `n`, then a little longer for any more.
fn lines_since(d: &Daemon, mark: usize, n: usize) -> Vec<String> {
    let grab = || -> Vec<String> {
        d.log()[mark..]
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(str::to_string)
            .collect()
    };
    let started = Instant::now();
    while grab().len() < n && started.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(SETTLE);
    grab()
}

/// Exactly one new log line, naming `peer`, which is returned.
fn one_line_since(d: &Daemon, mark: usize, peer: SocketAddr, context: &str) -> String {
    let lines = lines_since(d, mark, 1);
    assert!(
        lines.len() == 1 && lines[0].contains(&format!("peer={peer}")),
        "{context}: expected exactly one daemon log line, naming the peer {peer}, got:\n{}",
        lines.join("\n")
    );
    lines[0].clone()
}

// ---------------------------------------------------------------------------------------------
// Sessions through s_client.

/// Handshake, prove the token over OpenSSL's exported keying material, and see the session
/// open: the daemon logs it and the Welcome reaches s_client's stdout. With `update`, s_client
/// first sends a KeyUpdate (`Some(true)`: asking the daemon to update its keys too).
fn open_session(x: &Setup, c: &mut SClient, update: Option<bool>) -> Welcome {
    let km = c.keying_material();
    let mark = x.d.log().len();
    if let Some(requested) = update {
        c.key_update(requested);
    }
    let log = || format!("--- daemon log:\n{}", x.d.log());
    c.send_or(&hello_frame(TOKEN, &km), log);
    let started = Instant::now();
    while !x.d.log()[mark..].contains("session opened") && started.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        x.d.log()[mark..].contains("session opened"),
        "no session opened after the hello\n--- daemon log:\n{}\n{}",
        x.d.log(),
        c.dump()
    );
    c.wait_for("Welcome frame on stdout", |out, _| {
        find_welcome(out).is_some()
    });
    let welcome = find_welcome(&c.stdout()).unwrap();
    assert!(
        matches!(welcome, Welcome::Accepted { .. }),
        "expected Accepted, got {welcome:?}"
    );
    welcome
}

#[test]
fn s_client_proves_the_token_with_openssl_keying_material_and_the_session_opens() {
    let x = setup();
    let mut c = SClient::start(x.t.path(), x.d.port, Some("cutover/2"));
    open_session(&x, &mut c, None);
    let log = x.d.log();
    let line = log.lines().find(|l| l.contains("session opened")).unwrap();
    assert!(line.contains("module=m") && line.contains("ossl"), "{line}");
    let done = c.finish();
    assert!(
        done.alerts().is_empty(),
        "s_client received an alert\n{}",
        done.dump
    );
    assert!(
        String::from_utf8_lossy(&done.stdout).contains("ALPN protocol: cutover/2"),
        "{}",
        done.dump
    );
    assert_serves(&x.d, &x.module, &x.probe, "after");
}

#[test]
fn s_client_with_a_wrong_token_is_refused_and_logged() {
    let x = setup();
    let mut c = SClient::start(x.t.path(), x.d.port, Some("cutover/2"));
    let km = c.keying_material();
    let mark = x.d.log().len();
    c.send(&hello_frame("a-wrong-token-of-enough-length", &km));
    c.wait_for("Welcome frame on stdout", |out, _| {
        find_welcome(out).is_some()
    });
    let welcome = find_welcome(&c.stdout()).unwrap();
    let Welcome::Refused { reason } = &welcome else {
        panic!("a wrong token was welcomed: {welcome:?}\n{}", c.dump());
    };
    assert!(
        reason.contains("authentication failed") && reason.contains("\"m\""),
        "{reason}"
    );
    // The daemon warns of the failed authentication and logs the refusal, both naming the
    // same peer.
    let lines = lines_since(&x.d, mark, 2);
    let peer = |l: &str| {
        l.split_whitespace()
            .find(|w| w.starts_with("peer="))
            .map(str::to_string)
    };
    assert!(
        lines
            .iter()
            .any(|l| l.contains("authentication failed") && l.contains("module=m"))
            && lines
                .iter()
                .all(|l| peer(l).is_some() && peer(l) == peer(&lines[0])),
        "wrong token: expected an authentication failure logged for one peer, got:\n{}",
        lines.join("\n")
    );
    assert!(!x.d.log().contains("session opened"), "{}", x.d.log());
    // The daemon ends the connection after its refusal, cleanly: s_client exits on its
    // own, with its stdin still open, having received a close_notify and no other alert.
    let done = ended_by_the_daemon(c);
    assert_eq!(
        received_alerts(&done.trace),
        vec!["warning close_notify".to_string()],
        "{}",
        done.dump
    );
    assert_serves(&x.d, &x.module, &x.probe, "after");
}

/// A KeyUpdate from s_client before its hello, then the hello under the new key; with
/// `requested` the daemon must answer with a KeyUpdate of its own before the Welcome.
fn key_update_before_hello(requested: bool) {
    let x = setup();
    let mut c = SClient::start(x.t.path(), x.d.port, Some("cutover/2"));
    open_session(&x, &mut c, Some(requested));
    let done = c.finish();
    check_key_updates(&done, requested);
    assert_serves(&x.d, &x.module, &x.probe, "after");
}

/// What the trace of a session with one client KeyUpdate must show: s_client sent exactly
/// one, with `requested`; the daemon answered with exactly one (not requesting another)
/// before its first data when asked, and with none when not.
fn check_key_updates(done: &Finished, requested: bool) {
    let updates = key_updates(&done.trace);
    let sent: Vec<bool> = updates.iter().filter(|u| !u.0).map(|u| u.1).collect();
    let received: Vec<bool> = updates.iter().filter(|u| u.0).map(|u| u.1).collect();
    assert_eq!(
        sent,
        vec![requested],
        "s_client's KeyUpdates\n{}",
        done.dump
    );
    if requested {
        assert_eq!(
            received,
            vec![false],
            "the daemon must answer a requested KeyUpdate with one KeyUpdate of its own\n{}",
            done.dump
        );
        let (upd, data) = received_order(&done.trace);
        assert!(
            !data.is_empty() && upd[0] < data[0],
            "the daemon's KeyUpdate must come before its Welcome\n{}",
            done.dump
        );
    } else {
        assert!(
            received.is_empty(),
            "the daemon sent a KeyUpdate nobody asked for\n{}",
            done.dump
        );
    }
    assert!(done.alerts().is_empty(), "{}", done.dump);
}

#[test]
fn key_update_from_s_client_not_requested() {
    key_update_before_hello(false);
}

#[test]
fn key_update_from_s_client_requested_is_answered_before_the_welcome() {
    key_update_before_hello(true);
}

// ---------------------------------------------------------------------------------------------
// A relay between s_client and the daemon that can hold, cut and inject records.

/// What the relay does with the client's records.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    /// Forward each record as soon as it is complete.
    Nothing,
    /// Forward the ClientHello, then hold every record until the KeyUpdate's (by its length)
    /// has arrived, and forward them all in one write.
    UntilKeyUpdate,
}

enum Cmd {
    /// Forward only the first half of the client's next record, then shut down the write
    /// side towards the daemon.
    CutNextRecord,
    /// Write these bytes to the daemon now (between two whole records of the client's).
    Inject(Vec<u8>),
}

/// What the relay saw.
#[derive(Default, Debug)]
struct Seen {
    /// The relay's end of its connection to the daemon: the peer the daemon logs.
    upstream: Option<SocketAddr>,
    /// (content type, length) of each record of the one held-back write.
    coalesced: Vec<(u8, usize)>,
    /// Bytes of the record that was cut, and how many of them went to the daemon.
    cut: Option<(usize, usize)>,
}

struct Relay {
    port: u16,
    cmds: tokio::sync::mpsc::UnboundedSender<Cmd>,
    seen: Arc<Mutex<Seen>>,
    // Dropped last: ends the relay's tasks and sockets.
    _rt: tokio::runtime::Runtime,
}

/// The length of the whole record at the start of `buf`, once it is all there.
fn whole_record(buf: &[u8]) -> Option<usize> {
    let len = 5 + u16::from_be_bytes(buf.get(3..5)?.try_into().unwrap()) as usize;
    (buf.len() >= len).then_some(len)
}

/// TLS record headers in `buf`: (content type, length) of each whole record.
fn record_headers(mut buf: &[u8]) -> Vec<(u8, usize)> {
    let mut out = Vec::new();
    while let Some(len) = whole_record(buf) {
        out.push((buf[0], len - 5));
        buf = &buf[len..];
    }
    out
}

impl Relay {
    /// Listen on a loopback port; relay the first connection to the daemon's `port`.
    fn start(daemon_port: u16, hold: Hold) -> Relay {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cmds, cmd_rx) = tokio::sync::mpsc::unbounded_channel();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let seen2 = Arc::clone(&seen);
        rt.spawn(async move {
            let (client, _) = listener.accept().await.expect("relay accept");
            let daemon = tokio::net::TcpStream::connect(("127.0.0.1", daemon_port))
                .await
                .expect("relay connect to the daemon");
            let _ = client.set_nodelay(true);
            let _ = daemon.set_nodelay(true);
            seen2.lock().unwrap().upstream = Some(daemon.local_addr().unwrap());
            let (mut cr, mut cw) = client.into_split();
            let (mut dr, dw) = daemon.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut dr, &mut cw).await;
                let _ = cw.shutdown().await;
            });
            up(&mut cr, dw, hold, cmd_rx, &seen2).await;
        });
        Relay {
            port,
            cmds,
            seen,
            _rt: rt,
        }
    }

    fn send(&self, cmd: Cmd) {
        self.cmds.send(cmd).expect("the relay is running");
    }

    fn upstream(&self) -> SocketAddr {
        let started = Instant::now();
        loop {
            if let Some(a) = self.seen.lock().unwrap().upstream {
                return a;
            }
            assert!(started.elapsed() < WAIT, "the relay connected nowhere");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Client to daemon, record by record.
async fn up(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hold: Hold,
    mut cmds: tokio::sync::mpsc::UnboundedReceiver<Cmd>,
    seen: &Mutex<Seen>,
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut records = 0usize;
    let mut held: Vec<u8> = Vec::new();
    let mut holding = hold == Hold::UntilKeyUpdate;
    // A KeyUpdate that never comes must not hold the handshake back for ever: the records
    // then go on after this long (and the test sees no coalesced write).
    let mut give_up = tokio::time::Instant::now() + 2 * WAIT;
    let (mut cut_next, mut cut_done, mut cmds_open) = (false, false, true);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(give_up), if holding && !held.is_empty() => {
                holding = false;
                if to.write_all(&std::mem::take(&mut held)).await.is_err() {
                    return;
                }
            }
            cmd = cmds.recv(), if cmds_open => match cmd {
                Some(Cmd::CutNextRecord) => cut_next = true,
                Some(Cmd::Inject(bytes)) => {
                    if to.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                None => cmds_open = false,
            },
            got = from.read(&mut chunk) => {
                let n = match got {
                    Ok(0) | Err(_) => {
                        if !cut_done {
                            let _ = to.write_all(&held).await;
                            let _ = to.write_all(&buf).await;
                            let _ = to.shutdown().await;
                        }
                        return;
                    }
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                while let Some(len) = whole_record(&buf) {
                    let record: Vec<u8> = buf.drain(..len).collect();
                    records += 1;
                    if cut_done {
                        continue;
                    }
                    if cut_next {
                        let half = record.len() / 2;
                        let _ = to.write_all(&record[..half]).await;
                        let _ = to.shutdown().await;
                        cut_done = true;
                        seen.lock().unwrap().cut = Some((record.len(), half));
                        continue;
                    }
                    if holding && records > 1 {
                        if held.is_empty() {
                            give_up = tokio::time::Instant::now() + WAIT / 2;
                        }
                        held.extend_from_slice(&record);
                        if record[0] == APPLICATION_DATA && len - 5 == KEY_UPDATE_RECORD {
                            seen.lock().unwrap().coalesced = record_headers(&held);
                            holding = false;
                            // All of them in one write.
                            if to.write_all(&std::mem::take(&mut held)).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    if to.write_all(&record).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}

#[test]
fn key_update_in_the_same_write_as_the_clients_finished() {
    let x = setup();
    let relay = Relay::start(x.d.port, Hold::UntilKeyUpdate);
    let mut c = SClient::start(x.t.path(), relay.port, Some("cutover/2"));
    // s_client reads stdin only once its handshake is done: the KeyUpdate goes out right
    // behind its Finished.
    c.send(b"K\n");
    c.wait_for("KEYUPDATE", |_, err| err.contains("KEYUPDATE"));
    open_session(&x, &mut c, None);
    let coalesced = relay.seen.lock().unwrap().coalesced.clone();
    // The held write: [ChangeCipherSpec,] the client's encrypted flight (Certificate,
    // Finished), and last the KeyUpdate.
    assert!(
        coalesced.len() > 1
            && coalesced.last() == Some(&(APPLICATION_DATA, KEY_UPDATE_RECORD))
            && coalesced[..coalesced.len() - 1]
                .iter()
                .any(|r| r.0 == APPLICATION_DATA),
        "the relay did not put the client's Finished and its KeyUpdate in one write: {coalesced:?}"
    );
    assert!(
        coalesced
            .iter()
            .all(|r| r.0 == APPLICATION_DATA || r.0 == CHANGE_CIPHER_SPEC),
        "{coalesced:?}"
    );
    let done = c.finish();
    check_key_updates(&done, true);
    assert_serves(&x.d, &x.module, &x.probe, "after");
}

#[test]
fn close_notify_before_the_hello_is_one_log_line() {
    let x = setup();
    let relay = Relay::start(x.d.port, Hold::Nothing);
    let mark = x.d.log().len();
    let c = SClient::start(x.t.path(), relay.port, Some("cutover/2"));
    c.keying_material();
    // s_client's stdin ends: it says close_notify and exits.
    let done = c.finish();
    assert_eq!(done.status.code(), Some(0), "{}", done.dump);
    assert!(
        done.trace
            .contains(">>> TLS 1.3, Alert [length 0002], warning close_notify"),
        "s_client sent no close_notify\n{}",
        done.dump
    );
    let line = one_line_since(&x.d, mark, relay.upstream(), "close_notify");
    assert!(line.contains("closed before saying hello"), "{line}");
    assert_serves(&x.d, &x.module, &x.probe, "after");
}

/// An open session through a plain relay; returns the relay, s_client, and the log mark
/// after "session opened".
fn session_through_relay(x: &Setup) -> (Relay, SClient, usize) {
    let relay = Relay::start(x.d.port, Hold::Nothing);
    let mut c = SClient::start(x.t.path(), relay.port, Some("cutover/2"));
    open_session(x, &mut c, None);
    let mark = x.d.log().len();
    (relay, c, mark)
}

/// Wait for s_client to exit on its own (the daemon closed the connection), stdin open.
fn ended_by_the_daemon(mut c: SClient) -> Finished {
    let started = Instant::now();
    while matches!(c.child.try_wait(), Ok(None)) {
        assert!(
            started.elapsed() < WAIT,
            "the daemon did not close the connection within {WAIT:?}\n{}",
            c.dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    c.finish()
}

#[test]
fn truncated_record_after_the_handshake() {
    let x = setup();
    let (relay, mut c, mark) = session_through_relay(&x);
    relay.send(Cmd::CutNextRecord);
    // Data that is not a command: s_client sends it as one record, of which the daemon
    // gets the first half and then the end of the stream.
    c.send(b"0123456789abcdefghijklmnopqrstuvwxyz\n");
    let started = Instant::now();
    while relay.seen.lock().unwrap().cut.is_none() {
        assert!(started.elapsed() < WAIT, "no record to cut\n{}", c.dump());
        std::thread::sleep(Duration::from_millis(10));
    }
    let done = ended_by_the_daemon(c);
    // A stream that ends inside a record is an error for the reader, not an alert: the
    // session ends and the daemon closes its side cleanly, with a close_notify.
    assert_eq!(
        received_alerts(&done.trace),
        vec!["warning close_notify".to_string()],
        "{}",
        done.dump
    );
    assert_eq!(done.alerts(), Vec::<u32>::new(), "{}", done.dump);
    let line = one_line_since(&x.d, mark, relay.upstream(), "truncated record");
    eprintln!(
        "truncated record: s_client said {:?}, received {:?}; daemon logged: {line}",
        done.stderr.lines().last(),
        received_alerts(&done.trace)
    );
    assert_serves(&x.d, &x.module, &x.probe, "after");
}

/// After the session opened, inject `bytes` into the client's stream: the daemon must
/// answer with alert `alert` (seen by s_client), log one line and close.
fn injected_after_the_handshake(bytes: Vec<u8>, alert: u32, what: &str) {
    let x = setup();
    let (relay, c, mark) = session_through_relay(&x);
    relay.send(Cmd::Inject(bytes));
    let done = ended_by_the_daemon(c);
    assert_eq!(
        done.alerts(),
        vec![alert],
        "{what}: expected exactly alert {alert} from the daemon\n{}",
        done.dump
    );
    let line = one_line_since(&x.d, mark, relay.upstream(), what);
    eprintln!(
        "{what}: s_client said {:?}, received {:?}; daemon logged: {line}",
        done.stderr.lines().last(),
        received_alerts(&done.trace)
    );
    assert_serves(&x.d, &x.module, &x.probe, "after");
}

/// A record header announcing 2^14 + 256 + 1 bytes, the most RFC 8446 allows plus one, and
/// that many bytes. rustls 0.23 reads records of up to 2^14 + 2048 bytes before it decrypts
/// (so this one is not refused as too long) and then fails to decrypt it: bad_record_mac (20).
#[test]
fn over_long_record_after_the_handshake() {
    let len = (1usize << 14) + 256 + 1;
    let mut bytes = vec![APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
    bytes.extend(random_bytes(11, len));
    injected_after_the_handshake(bytes, 20, "over-long record");
}

/// A record longer than any TLS version allows (2^14 + 2048 + 1, past TLS 1.2's bound that
/// rustls reads to): refused for its length before any decryption. rustls reports a record
/// header it cannot parse as decode_error (50), not record_overflow.
#[test]
fn record_past_every_length_limit_after_the_handshake() {
    let len = (1usize << 14) + 2048 + 1;
    let mut bytes = vec![APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
    bytes.extend(random_bytes(13, len));
    injected_after_the_handshake(bytes, 50, "record past every length limit");
}

/// 64 bytes that are no TLS record (the first byte is no content type): rustls refuses
/// them as an invalid message, decode_error (50).
#[test]
fn garbage_after_the_handshake() {
    let mut bytes = random_bytes(12, 64);
    bytes[0] = 0xa5;
    injected_after_the_handshake(bytes, 50, "garbage");
}

/// s_client offering `alpn` (None: no ALPN extension) is refused during the handshake: it
/// gets a fatal alert and never completes (no keying material), and the daemon logs one
/// line.
fn refused_alpn(alpn: Option<&str>, alerts: &[u32]) {
    let x = setup();
    let relay = Relay::start(x.d.port, Hold::Nothing);
    let mark = x.d.log().len();
    let mut c = SClient::start(x.t.path(), relay.port, alpn);
    // A handshake that completes (OpenSSL prints the keying material) is the failure: say so
    // at once rather than wait for the daemon's handshake timeout.
    let started = Instant::now();
    while matches!(c.child.try_wait(), Ok(None)) {
        assert!(
            keying_material(&c.stdout()).is_none(),
            "the daemon completed a handshake with ALPN {alpn:?}\n{}",
            c.dump()
        );
        assert!(
            started.elapsed() < WAIT,
            "s_client still connected after {WAIT:?}\n{}",
            c.dump()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let done = c.finish();
    assert_ne!(done.status.code(), Some(0), "{}", done.dump);
    assert!(
        keying_material(&done.stdout).is_none(),
        "the handshake completed with ALPN {alpn:?}\n{}",
        done.dump
    );
    let got = done.alerts();
    assert!(
        got.len() == 1 && alerts.contains(&got[0]),
        "ALPN {alpn:?}: expected one of alerts {alerts:?}, got {got:?}\n{}",
        done.dump
    );
    let line = one_line_since(&x.d, mark, relay.upstream(), "ALPN");
    eprintln!(
        "ALPN {alpn:?}: s_client said {:?}, received {:?}; daemon logged: {line}",
        done.stderr.lines().last(),
        received_alerts(&done.trace)
    );
    assert!(!x.d.log().contains("session opened"), "{}", x.d.log());
    assert_serves(&x.d, &x.module, &x.probe, "after");
}

/// Another protocol: rustls's own refusal, no_application_protocol (120).
#[test]
fn alpn_h2_is_refused_at_the_handshake() {
    refused_alpn(Some("h2"), &[120]);
}

/// No ALPN at all: refused too (the daemon decides how; rustls's choices are
/// no_application_protocol (120), handshake_failure (40) or, from a certificate resolver
/// that declines, access_denied (49)).
#[test]
fn no_alpn_is_refused_at_the_handshake() {
    refused_alpn(None, &[120, 40, 49]);
}
