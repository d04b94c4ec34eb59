//! Our TLS client (`net::secure::connect`, as `cutover sync` dials a daemon) against OpenSSL
//! 3's `openssl s_server`: the exported binding equals OpenSSL's keying material for the
//! same label, frames cross both ways, and a KeyUpdate from OpenSSL (`k`: no answer wanted,
//! `K`: we must update our own sending key before our next data) is handled without losing
//! or garbling a frame. OpenSSL's `-msg` trace shows the (encrypted) KeyUpdates in the clear.
//!
//! Needs `openssl` on PATH (scripts/test installs it).

use net::tls::{client_config, Identity};
use proto::{Msg, WireCounter};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const LABEL: &str = "EXPORTER-cutover-token-proof";
/// Patience for anything OpenSSL or our client should do at once (CI machines are loaded).
const WAIT: Duration = Duration::from_secs(20);
/// s_server takes stdin starting with one of these as a command (some only when a newline
/// follows, and `P` writes plaintext onto the connection): frames must not start so.
const COMMAND_LETTERS: &[u8] = b"QqPSBrRKk";

/// The last 6000 bytes of `t` or a little less (from a character boundary).
fn tail(t: &str) -> &str {
    let mut from = t.len().saturating_sub(6000);
    while !t.is_char_boundary(from) {
        from += 1;
    }
    &t[from..]
}

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

/// A running `openssl s_server` for one connection, killed on drop.
struct SServer {
    child: Child,
    stdin: ChildStdin,
    out: Arc<Mutex<Vec<u8>>>,
    err: Arc<Mutex<Vec<u8>>>,
    trace: PathBuf,
    port: u16,
    _readers: Vec<JoinHandle<()>>,
}

impl SServer {
    /// `openssl s_server` on a loopback port of its choosing, TLS 1.3 only, ALPN
    /// `cutover/2`, with the certificate and key in `pem`.
    fn start(dir: &Path, pem: &Path) -> SServer {
        let trace = dir.join("s_server.msg");
        let mut child = Command::new("openssl")
            .args(["s_server", "-accept", "127.0.0.1:0", "-naccept", "1"])
            .args(["-tls1_3", "-alpn", "cutover/2"])
            .arg("-cert")
            .arg(pem)
            .arg("-key")
            .arg(pem)
            .args(["-keymatexport", LABEL, "-keymatexportlen", "32"])
            .arg("-msg")
            .arg("-msgfile")
            .arg(&trace)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run openssl s_server (install openssl): {e}"));
        let (out, err) = (Arc::default(), Arc::default());
        let readers = vec![
            gather(child.stdout.take().unwrap(), Arc::clone(&out)),
            gather(child.stderr.take().unwrap(), Arc::clone(&err)),
        ];
        let mut s = SServer {
            stdin: child.stdin.take().unwrap(),
            child,
            out,
            err,
            trace,
            port: 0,
            _readers: readers,
        };
        s.wait_for("ACCEPT line", |out| accept_port(out).is_some());
        s.port = accept_port(&s.stdout()).unwrap();
        s
    }

    fn stdout(&self) -> Vec<u8> {
        self.out.lock().unwrap().clone()
    }

    fn dump(&self) -> String {
        let trace = std::fs::read_to_string(&self.trace).unwrap_or_default();
        format!(
            "--- s_server stdout:\n{}\n--- s_server stderr:\n{}\n--- s_server -msg trace (tail):\n{}",
            String::from_utf8_lossy(&self.stdout()),
            String::from_utf8_lossy(&self.err.lock().unwrap()),
            tail(&trace)
        )
    }

    fn wait_for(&self, what: &str, done: impl Fn(&[u8]) -> bool) {
        let started = Instant::now();
        while !done(&self.stdout()) {
            assert!(
                started.elapsed() < WAIT,
                "s_server: no {what} within {WAIT:?}\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stdin
            .write_all(bytes)
            .expect("write to s_server's stdin");
        self.stdin.flush().unwrap();
    }

    /// KeyUpdate messages in the trace, in order: (received, update_requested).
    fn key_updates(&self) -> Vec<(bool, bool)> {
        let trace = std::fs::read_to_string(&self.trace).unwrap_or_default();
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

    /// Line numbers in the trace of received KeyUpdates and received application data.
    fn received_order(&self) -> (Vec<usize>, Vec<usize>) {
        let trace = std::fs::read_to_string(&self.trace).unwrap_or_default();
        let lines: Vec<&str> = trace.lines().collect();
        let (mut updates, mut data) = (Vec::new(), Vec::new());
        for (i, l) in lines
            .iter()
            .enumerate()
            .filter(|(_, l)| l.starts_with("<<<"))
        {
            if l.ends_with("KeyUpdate") {
                updates.push(i);
            }
            if l.contains("InnerContent") && lines.get(i + 1).map(|b| b.trim()) == Some("17") {
                data.push(i);
            }
        }
        (updates, data)
    }
}

impl Drop for SServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn accept_port(out: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(out);
    let at = text.find("ACCEPT 127.0.0.1:")? + "ACCEPT 127.0.0.1:".len();
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    text[at + digits.len()..]
        .starts_with('\n')
        .then(|| digits.parse().ok())
        .flatten()
}

fn keying_material(out: &[u8]) -> Option<[u8; 32]> {
    let text = String::from_utf8_lossy(out);
    let at = text.find("Keying material: ")? + "Keying material: ".len();
    let hex = text.get(at..at + 64)?;
    let mut km = [0u8; 32];
    for (i, b) in km.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(km)
}

fn frame(msg: &Msg) -> Vec<u8> {
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    proto::frame::encode_frame(msg, false, &mut None, &mut plain, &mut out).expect("encode");
    assert!(
        !COMMAND_LETTERS.contains(&out[0]),
        "a test frame starts with the s_server command letter {:?}",
        out[0] as char
    );
    out
}

/// Connect our client to s_server; with `update` (`k` or `K`) s_server then sends a
/// KeyUpdate; then a frame from s_server, and one from us.
fn exchange(update: Option<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("identity.pem");
    let (identity, made) = Identity::load_or_create(&pem).expect("identity");
    assert!(made);
    let mut server = SServer::start(dir.path(), &pem);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();

    let seen = Arc::new(Mutex::new(None));
    let config = client_config(None, None, Arc::clone(&seen)).expect("client config");
    let addr = format!("127.0.0.1:{}", server.port);
    let wire = Arc::new(WireCounter::default());
    let dialled = rt
        .block_on(net::secure::connect(&addr, Some(config), wire, Some(WAIT)))
        .unwrap_or_else(|e| panic!("connect to s_server: {e}\n{}", server.dump()));
    assert_eq!(*seen.lock().unwrap(), Some(identity.fingerprint));

    // Both ends export the same keying material for the token proof's label.
    server.wait_for("keying material", |out| keying_material(out).is_some());
    let theirs = keying_material(&server.stdout()).unwrap();
    assert_eq!(
        dialled.binding,
        Some(theirs),
        "our binding differs from OpenSSL's keying material"
    );
    let mut conn = dialled.conn;

    if let Some(letter) = update {
        // s_server reports the command with printf, which a pipe buffers: its trace shows
        // when the KeyUpdate went out.
        server.send(&[letter, b'\n']);
        let started = Instant::now();
        while !server.key_updates().iter().any(|u| !u.0) {
            assert!(
                started.elapsed() < WAIT,
                "s_server sent no KeyUpdate within {WAIT:?}\n{}",
                server.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // A frame from OpenSSL (under its new key, after a KeyUpdate) arrives intact.
    let from_openssl = Msg::Data {
        id: 7,
        offset: 4242,
        data: b"from openssl s_server: payload-3b7d".to_vec(),
    };
    server.send(&frame(&from_openssl));
    let got = rt
        .block_on(async { tokio::time::timeout(WAIT, conn.reader.recv()).await })
        .unwrap_or_else(|_| panic!("no frame from s_server within {WAIT:?}\n{}", server.dump()))
        .unwrap_or_else(|e| panic!("reading s_server's frame: {e}\n{}", server.dump()));
    assert_eq!(got, Some(from_openssl), "{}", server.dump());

    // And one of ours reaches OpenSSL: after a `K` our client must have updated its own key
    // first, else s_server could not decrypt it.
    let ours = Msg::Data {
        id: 9,
        offset: 0,
        data: b"from cutover: PAYLOAD-5f1c-9a7e".to_vec(),
    };
    let bytes = frame(&ours);
    rt.block_on(async { tokio::time::timeout(WAIT, conn.writer.send(ours, false)).await })
        .expect("send within the limit")
        .expect("send to s_server");
    server.wait_for("our frame on stdout", |out| {
        out.windows(bytes.len()).any(|w| w == bytes.as_slice())
    });

    let updates = server.key_updates();
    let sent: Vec<bool> = updates.iter().filter(|u| !u.0).map(|u| u.1).collect();
    let received: Vec<bool> = updates.iter().filter(|u| u.0).map(|u| u.1).collect();
    match update {
        None => assert!(updates.is_empty(), "{updates:?}\n{}", server.dump()),
        Some(letter) => {
            let requested = letter == b'K';
            assert_eq!(sent, vec![requested], "{}", server.dump());
            if requested {
                assert_eq!(
                    received,
                    vec![false],
                    "our client must answer a requested KeyUpdate with one of its own\n{}",
                    server.dump()
                );
                let (upd, data) = server.received_order();
                assert!(
                    !data.is_empty() && upd[0] < data[0],
                    "our KeyUpdate must come before our data\n{}",
                    server.dump()
                );
            } else {
                assert!(received.is_empty(), "{}", server.dump());
            }
        }
    }
    rt.block_on(conn.writer.close());
    drop(conn);
}

#[test]
fn binding_equals_openssl_keying_material_and_frames_cross() {
    exchange(None);
}

#[test]
fn key_update_from_openssl_not_requested() {
    exchange(Some(b'k'));
}

#[test]
fn key_update_from_openssl_requested_is_answered_before_our_data() {
    exchange(Some(b'K'));
}
