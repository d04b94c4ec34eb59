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

mod relay;
mod sclient;

use relay::*;
use sclient::*;

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

/// No ALPN at all: refused too, by the daemon's certificate resolver declining, which rustls
/// reports as access_denied (49).
#[test]
fn no_alpn_is_refused_at_the_handshake() {
    refused_alpn(None, &[49]);
}
