//! TLS, pinning and authentication against a real daemon: trust on first use and a changed
//! key, `--server-fingerprint`, wrong and missing tokens, read-only grants, client
//! certificates, joins bound to their connection, plaintext clients (and only to loopback),
//! TLS clients without cutover's ALPN, a slow handshake, garbage on the socket, and a daemon
//! that refuses to start without authentication.

use crate::hostile::dial;
use crate::util::*;
use proto::{Hello, NewSession, Role, SyncOptions, Welcome, PROTOCOL_VERSION};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

/// A small source tree and a daemon with one read-write module `m` (own key in `t/state`).
struct Setup {
    t: tempfile::TempDir,
    src: std::path::PathBuf,
    module: std::path::PathBuf,
    d: Daemon,
}

fn setup(per_module: &str) -> Setup {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["mixed", s(&src), "--scale", "0.0005"]);
    let module = t.path().join("module");
    let top = format!("state_dir = \"{}\"\n", s(&t.path().join("state")));
    let d = Daemon::start_with_extra(
        &t.path().join("d"),
        &[Module::rw("m", &module)],
        &top,
        per_module,
    );
    Setup { t, src, module, d }
}

/// The fingerprint the daemon printed when it started.
fn daemon_fingerprint(d: &Daemon) -> String {
    let log = d.log();
    let line = log
        .lines()
        .find(|l| l.contains("certificate sha256:"))
        .unwrap_or_else(|| panic!("the daemon did not print its fingerprint: {log}"));
    line.split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap()
        .to_string()
}

fn write_secret(path: &std::path::Path, text: &str) {
    write(path, text);
    chmod(path, 0o600);
}

#[test]
fn first_use_pins_the_certificate_and_a_changed_one_is_refused() {
    let x = setup("");
    let kh = x.t.path().join("kh");
    let url = x.d.url("m/dst/");
    let out = sync(&["--known-hosts", s(&kh), &slash(&x.src), &url]);
    out.ok();
    assert!(out.stderr.contains("first use"), "{out}");
    assert_same(&x.src, &x.module.join("dst"));
    let fp = daemon_fingerprint(&x.d);
    let pinned = std::fs::read_to_string(&kh).unwrap();
    assert_eq!(pinned, format!("127.0.0.1:{} {fp}\n", x.d.port));

    // Pinned now: no notice the second time.
    let out = sync(&["--known-hosts", s(&kh), &slash(&x.src), &url]);
    out.ok();
    assert!(!out.stderr.contains("first use"), "{out}");

    // The file now pins another key for this address: a hard error naming file and line.
    let other = format!("sha256:{}", "ab".repeat(32));
    write(
        &kh,
        format!("# pinned by hand\n127.0.0.1:{} {other}\n", x.d.port),
    );
    write(&x.src.join("new-file"), "must not arrive");
    let out = sync(&["--known-hosts", s(&kh), &slash(&x.src), &url]);
    assert_one_line_error(&out, &[&fp, &format!("{}:2", s(&kh)), "delete line 2"]);
    assert!(!x.module.join("dst/new-file").exists());
}

#[test]
fn server_fingerprint_flag_pins_without_known_hosts() {
    let x = setup("");
    let kh = x.t.path().join("kh");
    let fp = daemon_fingerprint(&x.d);
    let url = x.d.url("m/dst/");
    let wrong = format!("sha256:{}", "01".repeat(32));
    let out = sync(&[
        "--known-hosts",
        s(&kh),
        "--server-fingerprint",
        &wrong,
        &slash(&x.src),
        &url,
    ]);
    assert_one_line_error(&out, &["--server-fingerprint", &fp]);
    assert!(!x.module.join("dst").exists());
    let out = sync(&[
        "--known-hosts",
        s(&kh),
        "--server-fingerprint",
        &fp,
        &slash(&x.src),
        &url,
    ]);
    out.ok();
    assert_same(&x.src, &x.module.join("dst"));
    assert!(
        !kh.exists(),
        "a given fingerprint must not write known_hosts"
    );
    let out = sync(&["--server-fingerprint", "nonsense", &slash(&x.src), &url]);
    assert_eq!(out.code(), 2, "{out}");
}

#[test]
fn wrong_or_missing_token_is_refused_delayed_and_logged() {
    let x = setup("");
    let url = x.d.url("m/dst/");
    let started = Instant::now();
    let out = Running::start({
        let mut c = sync_cmd(&[&slash(&x.src), &url]);
        c.env("CUTOVER_TOKEN", "a-wrong-token-of-enough-length");
        c
    })
    .wait();
    assert_one_line_error(&out, &["authentication failed", "\"m\"", "--token-file"]);
    assert!(started.elapsed() >= Duration::from_millis(900), "no delay");
    let out = Running::start({
        let mut c = sync_cmd(&[&slash(&x.src), &url]);
        c.env_remove("CUTOVER_TOKEN");
        c
    })
    .wait();
    assert_one_line_error(&out, &["authentication failed"]);
    assert!(!x.module.join("dst").exists());
    let log = x.d.log();
    assert!(
        log.contains("authentication failed") && log.contains("127.0.0.1:"),
        "{log}"
    );
    assert!(log.contains("failures=2"), "{log}");

    // The right token from a file works.
    let token = x.t.path().join("client-token");
    write_secret(&token, TOKEN);
    let out = Running::start({
        let mut c = sync_cmd(&["--token-file", s(&token), &slash(&x.src), &url]);
        c.env_remove("CUTOVER_TOKEN");
        c
    })
    .wait();
    out.ok();
    assert_same(&x.src, &x.module.join("dst"));
}

#[test]
fn read_only_grant_allows_pull_and_refuses_push() {
    let t = tmp();
    let ro_token = t.path().join("ro-token");
    write_secret(&ro_token, "read-only-token-0123456789");
    let x = setup(&format!(
        "[[module.allow]]\ntoken_file = \"{}\"\naccess = \"read-only\"\n",
        s(&ro_token)
    ));
    sync(&[&slash(&x.src), &x.d.url("m/data/")]).ok();
    write(&x.src.join("extra"), "not allowed in");
    let ro = |args: &[&str]| {
        let mut c = sync_cmd(args);
        c.env_remove("CUTOVER_TOKEN")
            .arg("--token-file")
            .arg(&ro_token);
        Running::start(c).wait()
    };
    let out = ro(&[&slash(&x.src), &x.d.url("m/data/")]);
    assert_one_line_error(&out, &["read-only"]);
    assert!(!x.module.join("data/extra").exists());
    let pulled = x.t.path().join("pulled");
    ro(&[&x.d.url("m/data/"), &slash(&pulled)]).ok();
    assert_same(&x.module.join("data"), &pulled);
}

#[test]
fn client_certificate_fingerprint_grants_access() {
    let t = tmp();
    let id = t.path().join("me/identity.pem");
    let made = Command::new(bin())
        .args(["identity", "--file", s(&id)])
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");
    let fp = String::from_utf8(made.stdout).unwrap().trim().to_string();
    assert!(fp.starts_with("sha256:"), "{fp}");
    // Asking again prints the same fingerprint: the identity is made once.
    let again = Command::new(bin())
        .args(["identity", "--file", s(&id)])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8(again.stdout).unwrap().trim(), fp);

    let x = setup(&format!(
        "[[module.allow]]\nclient_fingerprint = \"{fp}\"\naccess = \"read-write\"\n"
    ));
    let with_id = |id: &std::path::Path| {
        let mut c = sync_cmd(&["--identity", s(id), &slash(&x.src), &x.d.url("m/dst/")]);
        c.env_remove("CUTOVER_TOKEN");
        Running::start(c).wait()
    };
    let stranger = t.path().join("stranger/identity.pem");
    Command::new(bin())
        .args(["identity", "--file", s(&stranger)])
        .output()
        .unwrap();
    assert_one_line_error(&with_id(&stranger), &["authentication failed"]);
    with_id(&id).ok();
    assert_same(&x.src, &x.module.join("dst"));
}

#[test]
fn plaintext_is_refused_unless_the_loopback_daemon_allows_it() {
    let x = setup("");
    let out = sync(&["--insecure-plaintext", &slash(&x.src), &x.d.url("m/dst/")]);
    assert_one_line_error(&out, &["only accepts TLS", "--insecure-plaintext"]);
    assert!(!x.module.join("dst").exists());

    let t = tmp();
    let module = t.path().join("module");
    let d = Daemon::start_with_extra(
        &t.path().join("d"),
        &[Module::rw("m", &module)],
        "insecure_plaintext = true",
        "",
    );
    sync(&["--insecure-plaintext", &slash(&x.src), &d.url("m/dst/")]).ok();
    assert_same(&x.src, &module.join("dst"));
    // The same daemon still speaks TLS.
    sync(&[&slash(&x.src), &d.url("m/tls/")]).ok();
    assert_same(&x.src, &module.join("tls"));
}

#[test]
fn slow_handshakes_and_garbage_are_dropped_and_the_daemon_keeps_serving() {
    let x = setup("");
    let t = tmp();
    let module = t.path().join("module");
    let d = Daemon::start_with_extra(
        &t.path().join("d"),
        &[Module::rw("m", &module)],
        "handshake_timeout_secs = 1",
        "",
    );
    // Slowloris: connect, say nothing. The daemon hangs up after its handshake timeout.
    let mut idle = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 16];
    let n = idle.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "the daemon answered a silent client");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(5),
        "hung up after {waited:?}"
    );
    // Garbage that looks like neither TLS nor a frame, and a TLS-looking prefix cut short.
    for junk in [
        &b"GET / HTTP/1.0\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2][..],
    ] {
        let mut c = TcpStream::connect(("127.0.0.1", d.port)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.write_all(junk);
        let _ = c.read(&mut buf);
    }
    sync(&[&slash(&x.src), &d.url("m/dst/")]).ok();
    assert_same(&x.src, &module.join("dst"));
    let log = d.log();
    assert!(log.contains("no handshake within"), "{log}");
}

#[test]
fn daemon_refuses_to_start_without_authentication_or_with_plaintext_off_loopback() {
    let t = tmp();
    let state = t.path().join("state");
    let cases = [
        (
            format!(
                "state_dir = \"{}\"\n[[module]]\nname = \"m\"\npath = \"/tmp\"\n",
                s(&state)
            ),
            "no [[module.allow]]",
        ),
        (
            format!(
                "listen = \"0.0.0.0:0\"\ninsecure_plaintext = true\nstate_dir = \"{}\"\n[[module]]\nname = \"m\"\npath = \"/tmp\"\n[[module.allow]]\nclient_fingerprint = \"sha256:{}\"\naccess = \"read-only\"\n",
                s(&state),
                "00".repeat(32)
            ),
            "only allowed on loopback",
        ),
    ];
    for (i, (toml, needle)) in cases.iter().enumerate() {
        let config = t.path().join(format!("c{i}.toml"));
        write(&config, toml);
        let out = Command::new(bin())
            .args(["serve", "--config", s(&config)])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(needle), "{err}");
        assert!(!err.contains("panicked"), "{err}");
    }
    // With TLS and authentication, any address is fine.
    let module = t.path().join("module");
    let d = Daemon::start_with_extra(
        &t.path().join("d"),
        &[Module::rw("m", &module)],
        "listen = \"0.0.0.0:0\"",
        "",
    );
    let src = t.path().join("src");
    write(&src.join("f"), "x");
    sync(&[&slash(&src), &d.url("m/dst/")]).ok();
    assert_same(&src, &module.join("dst"));
}

#[test]
fn traversal_paths_are_refused_and_nothing_lands_outside_the_module() {
    let x = setup("");
    let outside = x.t.path().join("escape");
    for path in ["m/../escape/", "m/a/../../escape/", "m//tmp/abs/"] {
        let url = format!("cutover://127.0.0.1:{}/{path}", x.d.port);
        let out = sync(&[&slash(&x.src), &url]);
        assert_one_line_error(&out, &["refused"]);
        let out = sync(&[&url, &slash(&x.t.path().join("pulled"))]);
        assert_ne!(out.code(), 0, "{out}");
    }
    assert!(!outside.exists());
    assert!(!std::path::Path::new("/tmp/abs").exists());
    assert!(!x.module.exists() || std::fs::read_dir(&x.module).unwrap().next().is_none());
}

/// A push session opened by hand with the suite's token; returns its control connection (kept
/// open, so the session lives), id and secret.
async fn open_session_by_hand(
    port: u16,
) -> (
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    u64,
    [u8; 16],
) {
    let (control, welcome) = dial(port, |binding| {
        Hello::New(NewSession {
            version: PROTOCOL_VERSION,
            module: "m".into(),
            path: String::new(),
            server_role: Role::Receiver,
            options: SyncOptions::default(),
            token_proof: Some(net::tls::token_proof(TOKEN.as_bytes(), &binding)),
        })
    })
    .await;
    let Welcome::Accepted { session, secret } = welcome else {
        panic!("the daemon refused an authenticated session: {welcome:?}");
    };
    (control, session, secret)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A hello built from the dialled connection's binding.
type MakeHello = Box<dyn FnOnce([u8; 32]) -> Hello>;

#[test]
fn a_join_proof_is_bound_to_its_connection_and_failed_joins_are_late_logged_and_counted() {
    let x = setup("");
    let port = x.d.port;
    runtime().block_on(async {
        let (_control, session, secret) = open_session_by_hand(port).await;
        // A proper join, whose proof an eavesdropper (or a relay) could copy.
        let mut copied = None;
        let (_first, welcome) = dial(port, |binding| {
            let proof = net::tls::join_proof(&secret, &binding);
            copied = Some(proof);
            Hello::Join { session, proof }
        })
        .await;
        assert!(matches!(welcome, Welcome::Accepted { .. }), "{welcome:?}");
        let copied = copied.unwrap();

        // The same session id and proof on another TLS connection; a wrong proof; an unknown
        // session with a proof right for its connection. One answer for all, each late.
        let cases: [(&str, MakeHello); 3] = [
            (
                "copied",
                Box::new(move |_| Hello::Join {
                    session,
                    proof: copied,
                }),
            ),
            (
                "wrong",
                Box::new(move |_| Hello::Join {
                    session,
                    proof: [7; 32],
                }),
            ),
            (
                "unknown session",
                Box::new(move |b| Hello::Join {
                    session: session.wrapping_add(1),
                    proof: net::tls::join_proof(&secret, &b),
                }),
            ),
        ];
        for (what, make) in cases {
            let started = Instant::now();
            let (_refused, welcome) = dial(port, make).await;
            let Welcome::Refused { reason } = welcome else {
                panic!("{what} proof: the join was accepted");
            };
            assert_eq!(reason, "unknown session", "{what}");
            assert!(
                started.elapsed() >= Duration::from_millis(900),
                "{what}: refused after {:?}, without the delay",
                started.elapsed()
            );
        }
        // The session is still there for a proper join.
        let (_second, welcome) = dial(port, |binding| Hello::Join {
            session,
            proof: net::tls::join_proof(&secret, &binding),
        })
        .await;
        assert!(matches!(welcome, Welcome::Accepted { .. }), "{welcome:?}");
    });
    assert!(
        x.d.log_shows("failures=3", Duration::from_secs(5)),
        "{}",
        x.d.log()
    );
    let log = x.d.log();
    let refused: Vec<&str> = log.lines().filter(|l| l.contains("join refused")).collect();
    assert_eq!(refused.len(), 3, "{log}");
    assert!(
        refused
            .iter()
            .all(|l| l.contains("WARN") && l.contains("127.0.0.1:")),
        "{log}"
    );
}

#[test]
fn multi_connection_syncs_join_over_tls_and_over_plaintext() {
    let t = tmp();
    let src = t.path().join("src");
    mkdata(&["mixed", s(&src), "--scale", "0.001"]);
    let module = t.path().join("module");
    let d = Daemon::start_with_extra(
        &t.path().join("d"),
        &[Module::rw("m", &module)],
        "insecure_plaintext = true",
        "",
    );
    sync(&["-j", "4", &slash(&src), &d.url("m/tls/")]).ok();
    assert_same(&src, &module.join("tls"));
    sync(&[
        "-j",
        "4",
        "--insecure-plaintext",
        &slash(&src),
        &d.url("m/plain/"),
    ])
    .ok();
    assert_same(&src, &module.join("plain"));
    let pulled = t.path().join("pulled");
    sync(&["-j", "4", &d.url("m/tls/"), &slash(&pulled)]).ok();
    assert_same(&src, &pulled);
    // Every data connection joined: none was refused (the sync would still finish on fewer).
    let log = d.log();
    assert!(!log.contains("join refused"), "{log}");
}

#[test]
fn insecure_plaintext_refuses_a_destination_off_loopback_before_dialling() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("f"), "x");
    // In a network namespace of its own with nothing but a loopback interface that is down,
    // so that a client that did dial would reach nobody, here or elsewhere.
    let started = Instant::now();
    let out = Running::start({
        let mut c = Command::new("unshare");
        c.arg("--net")
            .arg(bin())
            .args(["sync", "--insecure-plaintext", "--retry-for", "0"])
            .arg(slash(&src))
            .arg("cutover://192.0.2.1:9/mod/");
        c.env_remove("CUTOVER_LOG")
            .env("XDG_CONFIG_HOME", client_config_home());
        c
    })
    .wait();
    assert_one_line_error(
        &out,
        &[
            "--insecure-plaintext only talks to loopback daemons",
            "192.0.2.1:9 is not one",
            "drop --insecure-plaintext",
        ],
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn tls_clients_without_cutovers_alpn_fail_the_handshake_and_the_daemon_keeps_serving() {
    let x = setup("");
    let port = x.d.port;
    let alerts = runtime().block_on(async {
        let mut alerts = Vec::new();
        for offer in [vec![], vec![b"h2".to_vec()]] {
            let mut config = (*net::tls::client_config(
                None,
                None,
                std::sync::Arc::new(std::sync::Mutex::new(None)),
            )
            .unwrap())
            .clone();
            config.alpn_protocols = offer.clone();
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap();
            let name = rustls::pki_types::ServerName::try_from("cutover").unwrap();
            let e = match tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(name, tcp)
                .await
            {
                Ok(_) => panic!("a client offering ALPN {offer:?} completed the handshake"),
                Err(e) => e,
            };
            let alert = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .cloned();
            alerts.push(alert);
        }
        alerts
    });
    // Both get an alert, not merely a closed socket: no offer is denied by our resolver,
    // another protocol gets rustls's no_application_protocol (RFC 7301).
    let alert = |a| Some(rustls::Error::AlertReceived(a));
    assert_eq!(
        alerts,
        [
            alert(rustls::AlertDescription::AccessDenied),
            alert(rustls::AlertDescription::NoApplicationProtocol)
        ]
    );
    let needle = "TLS handshake failed: the client did not offer ALPN cutover/2";
    let shown = |log: &str| log.lines().filter(|l| l.contains(needle)).count();
    let started = Instant::now();
    while shown(&x.d.log()) < 2 && started.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(shown(&x.d.log()), 2, "{}", x.d.log());
    sync(&[&slash(&x.src), &x.d.url("m/dst/")]).ok();
    assert_same(&x.src, &x.module.join("dst"));
}
