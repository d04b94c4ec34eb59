//! `cutover serve`'s metrics (`metrics_listen`, `metrics_tls`): real daemons scraped with
//! curl, and the text parsed by the Python Prometheus client's own parser (so the format is
//! checked by another implementation than the one that wrote it). A replicating pair shows
//! its roles, writes, write latencies and a disconnected peer's out-of-sync bytes; a daemon
//! serving a module over HTTPS counts its sync sessions, their bytes and refused
//! connections; a metrics address off loopback without TLS is refused in one line.

use crate::replication::{have_qemu, node_of, qemu_io, sock, volume, wait_in_step, Node};
use crate::util::*;
use serde_json::Value;
use std::path::Path;
use std::process::{Command, Stdio};

/// Reads Prometheus text on stdin and prints every sample as JSON: name, labels, value, and
/// the type of its family.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"type": fam.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

/// The samples of one scrape.
struct Scraped(Vec<Value>);

impl Scraped {
    /// The samples `name` whose labels include `labels`.
    fn matching(&self, name: &str, labels: &[(&str, &str)]) -> Vec<&Value> {
        self.0
            .iter()
            .filter(|s| s["name"] == name && labels.iter().all(|(k, v)| s["labels"][k] == *v))
            .collect()
    }

    /// The value of the sample `name` whose labels include `labels`; panics if none or many.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found = self.matching(name, labels);
        assert_eq!(
            found.len(),
            1,
            "{name} {labels:?}: expected one sample, found {found:?}"
        );
        found[0]["value"].as_f64().unwrap()
    }

    /// Assert that sample `name` with `labels` has `value`.
    fn expect(&self, name: &str, labels: &[(&str, &str)], value: f64) {
        let got = self.get(name, labels);
        assert_eq!(got, value, "{name} {labels:?}");
    }

    /// Assert that of the state gauges `name` with `labels`, exactly one is 1 (the others 0)
    /// and its label `key` is `current`.
    fn state(&self, name: &str, labels: &[(&str, &str)], key: &str, current: &str) {
        let all = self.matching(name, labels);
        let on: Vec<&&Value> = all.iter().filter(|s| s["value"] == 1.0).collect();
        assert!(
            on.len() == 1
                && on[0]["labels"][key] == current
                && all.iter().all(|s| s["value"] == 1.0 || s["value"] == 0.0),
            "{name} {labels:?}: expected {key}={current} alone at 1, got {all:?}"
        );
    }

    fn type_of(&self, name: &str) -> String {
        let s = self.0.iter().find(|s| s["name"] == name);
        s.unwrap_or_else(|| panic!("no sample {name}"))["type"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// `curl` the metrics at `url` and parse them with the Python client's parser; checks the
/// content type on the way.
fn scrape(url: &str) -> Scraped {
    scrape_with(url, &[])
}

/// [`scrape`] over HTTPS, trusting only the daemon's certificate, copied out of its identity
/// file as a user would give it to Prometheus, under its name `cutover`.
fn scrape_https(url: &str, identity: &Path) -> Scraped {
    let cert = identity.with_file_name("metrics-ca.crt");
    let x509 = Command::new("openssl")
        .args(["x509", "-in", s(identity), "-out", s(&cert)])
        .output()
        .expect("openssl");
    assert!(x509.status.success(), "{x509:?}");
    let addr = url
        .trim_start_matches("https://")
        .trim_end_matches("/metrics");
    let port = addr.rsplit(':').next().unwrap();
    let resolve = format!("cutover:{port}:127.0.0.1");
    let named = format!("https://cutover:{port}/metrics");
    scrape_with(&named, &["--cacert", s(&cert), "--resolve", &resolve])
}

fn scrape_with(url: &str, extra: &[&str]) -> Scraped {
    let out = Command::new("curl")
        .args(["-sS", "--fail", "-D", "/dev/stderr"])
        .args(extra)
        .arg(url)
        .output()
        .expect("curl");
    assert!(out.status.success(), "curl {url}: {out:?}");
    let headers = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    // The system python3: Debian's python3-prometheus-client is installed for it.
    let mut parse = Command::new("/usr/bin/python3")
        .args(["-c", PARSE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("/usr/bin/python3");
    use std::io::Write;
    parse.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let parsed = parse.wait_with_output().unwrap();
    assert!(
        parsed.status.success(),
        "the Prometheus parser refused the text: {}\n{}",
        String::from_utf8_lossy(&parsed.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    Scraped(serde_json::from_slice(&parsed.stdout).unwrap())
}

/// The metrics URL a daemon logged at startup.
fn metrics_url(log: &str) -> String {
    let line = log
        .lines()
        .find(|l| l.contains("metrics on "))
        .unwrap_or_else(|| panic!("no metrics address logged:\n{log}"));
    line.rsplit(' ').next().unwrap().to_string()
}

/// `n`'s config: the metrics keys in `top`, volume "db" with one peer.
fn configure(n: &Node, top: &str, peer: &Node, peer_name: &str, peer_extra: &str) {
    std::fs::write(
        &n.config,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n{top}\n[[volume]]\nname = \"db\"\nbacking = \"{}\"\n\
             [[volume.peer]]\nname = \"{peer_name}\"\nfingerprint = \"{}\"\n{peer_extra}",
            s(&n.dir.join("state")),
            s(&n.image),
            peer.fingerprint,
        ),
    )
    .unwrap();
}

const MIB: u64 = 1 << 20;

#[test]
fn a_replicating_pair_shows_roles_writes_latencies_and_out_of_sync_bytes() {
    if !have_qemu() {
        return;
    }
    let t = tmp();
    let a = node_of(t.path(), "a", 4 * MIB);
    let b = node_of(t.path(), "b", 4 * MIB);
    let plain = "metrics_listen = \"127.0.0.1:0\"";
    configure(&b, plain, &a, "a", "");
    volume(&b, &["create-md", "db"]).ok();
    let db = Daemon::start_with(&b.dir, &b.config);
    configure(
        &a,
        plain,
        &b,
        "b",
        &format!("address = \"127.0.0.1:{}\"", db.port),
    );
    volume(&a, &["create-md", "db"]).ok();
    let da = Daemon::start_with(&a.dir, &a.config);
    let (url_a, url_b) = (metrics_url(&da.log()), metrics_url(&db.log()));
    volume(&a, &["primary", "db", "--force"]).ok();
    let w = qemu_io(&sock(&a), &["write -P 0x11 0 1M", "write -P 0x22 2M 512k"]);
    assert!(w.status.success(), "{w:?}");
    wait_in_step(&a, &b, "initial sync");

    let m = scrape(&url_a);
    let db_ = [("volume", "db")];
    m.state("cutover_volume_role", &db_, "role", "primary");
    m.state("cutover_volume_disk_state", &db_, "state", "UpToDate");
    m.expect(
        "cutover_volume_written_bytes_total",
        &db_,
        (MIB + MIB / 2) as f64,
    );
    m.expect("cutover_volume_writes_total", &db_, 2.0);
    assert_eq!(
        m.type_of("cutover_volume_write_latency_seconds_count"),
        "histogram"
    );
    m.expect("cutover_volume_write_latency_seconds_count", &db_, 2.0);
    let inf = [("volume", "db"), ("le", "+Inf")];
    m.expect("cutover_volume_write_latency_seconds_bucket", &inf, 2.0);
    assert!(m.get("cutover_volume_write_latency_seconds_sum", &db_) > 0.0);
    m.expect("cutover_volume_size_bytes", &db_, (4 * MIB) as f64);
    let peer_b = [("volume", "db"), ("peer", "b")];
    let link = "cutover_volume_peer_connection_state";
    m.state(link, &peer_b, "state", "connected");
    m.state(
        "cutover_volume_peer_disk_state",
        &peer_b,
        "state",
        "UpToDate",
    );
    m.expect("cutover_volume_peer_out_of_sync_bytes", &peer_b, 0.0);
    m.expect("cutover_volume_peer_lag_bytes", &peer_b, 0.0);
    let on_b = scrape(&url_b);
    on_b.state("cutover_volume_role", &db_, "role", "secondary");
    on_b.state("cutover_volume_disk_state", &db_, "state", "UpToDate");
    // The secondary's export took no writes of its own: replication is not counted there.
    on_b.expect("cutover_volume_writes_total", &db_, 0.0);

    // Cut off from its peer, the primary owes it what it writes now: 256 KiB, whole blocks.
    volume(&a, &["disconnect", "db"]).ok();
    let w = qemu_io(&sock(&a), &["write -P 0x33 3M 256k"]);
    assert!(w.status.success(), "{w:?}");
    let m = scrape(&url_a);
    m.state(link, &peer_b, "state", "disconnected");
    m.expect(
        "cutover_volume_peer_out_of_sync_bytes",
        &peer_b,
        (256 << 10) as f64,
    );
    m.expect("cutover_volume_writes_total", &db_, 3.0);
    m.expect("cutover_volume_write_latency_seconds_count", &db_, 3.0);
    drop((da, db));
}

#[test]
fn a_daemon_counts_its_sync_sessions_their_bytes_and_refusals_over_https() {
    let t = tmp();
    let src = t.path().join("src");
    write(&src.join("f.bin"), random_bytes(7, 200 << 10));
    let dst = t.path().join("dst");
    let top = "metrics_listen = \"127.0.0.1:0\"\nmetrics_tls = true";
    let state = t.path().join("d/state");
    let top = format!("{top}\nstate_dir = \"{}\"", s(&state));
    let d = Daemon::start_with_extra(&t.path().join("d"), &[Module::rw("m", &dst)], &top, "");
    let url = metrics_url(&d.log());
    let scrape = |url: &str| scrape_https(url, &state.join("identity.pem"));
    assert!(url.starts_with("https://"), "{url}");
    // Plain HTTP to the HTTPS listener gets no metrics.
    let http = Command::new("curl")
        .args([
            "-sS",
            "--fail",
            "-m",
            "5",
            &url.replacen("https", "http", 1),
        ])
        .output()
        .unwrap();
    assert!(!http.status.success(), "{http:?}");

    let pushed = sync_json(&[&format!("{}/", s(&src)), &d.url("m/")]);
    pushed.ok();
    // The daemon ends its side of the session just after the client's: wait for that.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let m = loop {
        let m = scrape(&url);
        if m.get("cutover_sync_sessions_active", &[]) == 0.0 {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the session never ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    m.expect("cutover_sync_sessions_total", &[], 1.0);
    let (sent, received) = (
        m.get("cutover_sync_sent_bytes_total", &[]),
        m.get("cutover_sync_received_bytes_total", &[]),
    );
    // The daemon counts the frames of its session connections as the client counts its.
    assert_eq!(sent + received, pushed.stat("wire_bytes") as f64);
    assert!(received > (200 << 10) as f64, "{received}");

    let wrong = sync_cmd(&[s(&src), &d.url("m/")])
        .env("CUTOVER_TOKEN", "not-the-token-0123456789")
        .output()
        .unwrap();
    assert!(!wrong.status.success(), "{wrong:?}");
    // An HTTPS client at the daemon's own port fails the handshake (no cutover ALPN).
    let probe = Command::new("curl")
        .args(["-sSk", "-m", "5", &format!("https://127.0.0.1:{}/", d.port)])
        .output()
        .unwrap();
    assert!(!probe.status.success(), "{probe:?}");
    let m = scrape(&url);
    let reason = |r| [("reason", r)];
    m.expect("cutover_auth_failures_total", &reason("credentials"), 1.0);
    m.expect("cutover_auth_failures_total", &reason("tls_handshake"), 1.0);
    // A config without volumes still has the families, with no samples.
    assert!(m.0.iter().all(|s| s["labels"].get("volume").is_none()));
}

#[test]
fn a_metrics_address_off_loopback_without_tls_is_refused_in_one_line() {
    let t = tmp();
    for (top, words) in [
        ("metrics_listen = \"0.0.0.0:0\"", "metrics_tls = true"),
        ("metrics_listen = \"localhost:9464\"", "IP:PORT"),
    ] {
        let dir = t.path().join("d");
        let config = Daemon::write_config(&dir, &[Module::rw("m", &dir.join("m"))], top, "");
        let mut c = cutover_cmd();
        c.args(["serve", "--config", s(&config)]);
        let out = Running::start(c).wait();
        out.expect_code(1);
        let lines = out.err_lines();
        assert_eq!(lines.len(), 1, "{out}");
        assert!(
            lines[0].contains("metrics_listen") && lines[0].contains(words),
            "{out}"
        );
    }
}
