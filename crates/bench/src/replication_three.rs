//! R7: failover to the partner, and the third node's catch-up. Three `cutover serve` on
//! 127.0.0.1 set up as `docs/replication.md` ("Three nodes") describes: alpha (the primary)
//! and beta (its partner) in protocol C over direct loopback, gamma (the new node) in
//! protocol A, each of the two links to it through a wanem relay of its own with the link's
//! options. Gamma waits for both; alpha dials beta and gamma; beta dials gamma.
//!
//! Untimed first: metadata on the three, alpha promoted with `--force`, the initial full
//! syncs (beta over loopback, gamma through alpha's relay), and beta and gamma learning from
//! alpha's acknowledgements that the other holds everything. Then:
//!
//! - a paced writer into alpha's export at half the link (1 MiB writes in order: the load
//!   the long link is sized for, as in R3) for `load_secs`, and `kill -9` of alpha while it
//!   writes;
//! - `cutover volume primary` on beta, then `written` bytes into beta's export as fast as it
//!   takes them: 1 MiB writes at distinct 1 MiB-aligned offsets in random order;
//! - timed from the promotion until beta's status shows gamma in step and drained (connected,
//!   beta the source, nothing out of sync, nothing in flight) and gamma's disk is UpToDate.
//!
//! The figure is what beta sent to gamma: `bytes_up` of beta's relay, counted since it
//! started (so the idle link before the failover is in it too), against 1.2 × `written`; a
//! full resync would send the whole volume. Afterwards beta's and gamma's backings must be
//! equal.

use crate::proc::Background;
use crate::replication::{describe_writer, Measured, POLL};
use crate::replication_pair::{
    kill9, peer_in_step, status_at, volume_at, Node, PeerLine, PeerOpts, Writer,
};
use crate::tools::{self, Env, Verify, Wanem, WireCount};
use crate::volume_io::{create_md, export_uri, same_bytes, serve, stop_cleanly, VOLUME};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The partner's link: synchronous, as in the old data center.
const SYNC: PeerOpts = PeerOpts {
    protocol: "C",
    csums: false,
};
/// The links to the new node, over the long link.
const ASYNC: PeerOpts = PeerOpts {
    protocol: "A",
    csums: false,
};
/// Both writers' write size, and the alignment of the second one's offsets.
const CHUNK: u64 = 1 << 20;
/// The target: bytes sent to the third node at most this many times the bytes written.
const BOUND: f64 = 1.2;

/// The peer called `name` in a node's status (Null when it has none).
fn peer<'a>(st: &'a Value, name: &str) -> &'a Value {
    st["peers"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or(&Value::Null)
}

fn peer_u64(st: &Value, name: &str, key: &str) -> u64 {
    peer(st, name)[key].as_u64().unwrap_or(0)
}

fn line<'a>(name: &'a str, node: &'a Node, address: Option<u16>, opts: PeerOpts) -> PeerLine<'a> {
    PeerLine {
        name,
        node,
        address,
        opts,
    }
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// The three daemons and the two relays in front of gamma.
struct Trio {
    bin: PathBuf,
    alpha: Node,
    beta: Node,
    gamma: Node,
    alpha_d: Option<Background>,
    beta_d: Option<Background>,
    gamma_d: Option<Background>,
    /// Alpha's relay to gamma, and beta's (whose count is the row's figure).
    wan_a: Option<Wanem>,
    wan_b: Option<Wanem>,
    /// wanem's link options, for the report.
    link: String,
}

impl Trio {
    /// Make the three nodes in `dir`, start them, promote alpha and wait (untimed) until
    /// both secondaries hold the volume and know the other does.
    fn start(env: &Env, dir: &Path, logs: &Path, size: u64) -> Result<Trio> {
        let bin = tools::cutover_bin(env)?;
        let alpha = Node::new(&bin, dir, "alpha", size, None)?;
        let beta = Node::new(&bin, dir, "beta", size, None)?;
        let gamma = Node::new(&bin, dir, "gamma", size, None)?;
        let daemon = |n: &Node, name: &str| -> Result<(Background, u16)> {
            create_md(&bin, &n.config, VOLUME)?;
            serve(
                &bin,
                &n.config,
                &n.dir.join("serve.port"),
                &logs.join(format!("{name}-serve.log")),
            )
        };
        gamma.configure_peers(&[
            line("alpha", &alpha, None, ASYNC),
            line("beta", &beta, None, ASYNC),
        ])?;
        let (gamma_d, gamma_port) = daemon(&gamma, "gamma")?;
        let relay = |from: &str| {
            let name = format!("wanem-{from}-gamma");
            Wanem::start(
                env,
                gamma_port,
                dir,
                &name,
                &logs.join(format!("{name}.log")),
            )
        };
        let (wan_a, wan_b) = (relay("alpha")?, relay("beta")?);
        beta.configure_peers(&[
            line("alpha", &alpha, None, SYNC),
            line("gamma", &gamma, Some(wan_b.port), ASYNC),
        ])?;
        let (beta_d, beta_port) = daemon(&beta, "beta")?;
        alpha.configure_peers(&[
            line("beta", &beta, Some(beta_port), SYNC),
            line("gamma", &gamma, Some(wan_a.port), ASYNC),
        ])?;
        let (alpha_d, _) = daemon(&alpha, "alpha")?;
        let trio = Trio {
            link: tools::shell_words(&env.link.args()),
            bin,
            alpha,
            beta,
            gamma,
            alpha_d: Some(alpha_d),
            beta_d: Some(beta_d),
            gamma_d: Some(gamma_d),
            wan_a: Some(wan_a),
            wan_b: Some(wan_b),
        };
        volume_at(&trio.bin, &trio.alpha, &["primary", VOLUME, "--force"])?;
        let t = Instant::now();
        // Gamma's sync crosses the emulated link: allow it 5 MB/s at the very least.
        let budget = Duration::from_secs(120 + size / 5_000_000);
        trio.until(budget, "the initial syncs", || {
            let a = trio.status(&trio.alpha)?;
            Ok(peer_in_step(peer(&a, "beta"))
                && peer_in_step(peer(&a, "gamma"))
                && trio.status(&trio.beta)?["disk"] == "UpToDate"
                && trio.status(&trio.gamma)?["disk"] == "UpToDate")
        })?;
        eprintln!(
            "  initial full syncs of {:.0} MB (beta over loopback, gamma through wanem): {:.1} s",
            mb(size),
            t.elapsed().as_secs_f64()
        );
        // Until then each secondary's bitmap for the other still names the initial sync.
        let what = "beta and gamma learning that the other holds everything";
        trio.until(Duration::from_secs(60), what, || {
            Ok(
                peer(&trio.status(&trio.beta)?, "gamma")["out_of_sync_bytes"] == 0
                    && peer(&trio.status(&trio.gamma)?, "beta")["out_of_sync_bytes"] == 0,
            )
        })?;
        Ok(trio)
    }

    fn status(&self, n: &Node) -> Result<Value> {
        status_at(&self.bin, n)
    }

    /// Every running node's status, for an error message.
    fn statuses(&self) -> String {
        [
            ("alpha", &self.alpha, &self.alpha_d),
            ("beta", &self.beta, &self.beta_d),
            ("gamma", &self.gamma, &self.gamma_d),
        ]
        .iter()
        .filter(|(_, _, d)| d.is_some())
        .map(|(name, n, _)| match self.status(n) {
            Ok(st) => format!("{name}: {st}"),
            Err(e) => format!("{name}: {e:#}"),
        })
        .collect::<Vec<_>>()
        .join("; ")
    }

    /// Poll `cond` every 100 ms until it holds, at most `budget`.
    fn until(
        &self,
        budget: Duration,
        what: &str,
        mut cond: impl FnMut() -> Result<bool>,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            let tick = Instant::now();
            if cond()? {
                return Ok(());
            }
            if start.elapsed() > budget {
                bail!(
                    "{what}: not after {:.0} s; {}",
                    budget.as_secs_f64(),
                    self.statuses()
                );
            }
            std::thread::sleep(POLL.saturating_sub(tick.elapsed()));
        }
    }

    /// Stop the relays (beta's count, then alpha's), the daemons still running, and compare
    /// beta's backing with gamma's.
    fn finish(mut self) -> Result<(WireCount, WireCount, Verify)> {
        let wire_b = self.wan_b.take().context("no relay from beta")?.finish()?;
        let wire_a = self.wan_a.take().context("no relay from alpha")?.finish()?;
        for (d, who) in [
            (&mut self.alpha_d, "alpha's cutover serve"),
            (&mut self.beta_d, "beta's cutover serve"),
            (&mut self.gamma_d, "gamma's cutover serve"),
        ] {
            if let Some(mut d) = d.take() {
                stop_cleanly(&mut d, who)?;
            }
        }
        let verify = same_bytes(&self.beta.backing, &self.gamma.backing);
        Ok((wire_b, wire_a, verify))
    }
}

/// What the catch-up phase saw: from the promotion until gamma is in step with beta.
struct CatchUp {
    seconds: f64,
    /// From the writer's end until in step.
    tail_s: f64,
    /// From the promotion until beta's link to gamma showed connected.
    link_up_s: Option<f64>,
    /// Beta's bitmap for gamma: its largest value while sampled.
    peak_oos: u64,
    samples: usize,
    writer: Value,
}

/// While `writer` writes into beta's export and after, poll beta's status until gamma is in
/// step, drained and UpToDate; timed from `t0` (the promotion).
fn catch_up(trio: &Trio, mut writer: Writer, t0: Instant, budget: Duration) -> Result<CatchUp> {
    let (mut peak_oos, mut samples) = (0, 0);
    let (mut writer_end, mut up) = (None, None);
    let done = loop {
        let tick = Instant::now();
        if writer_end.is_none() && !writer.running()? {
            writer_end = Some(Instant::now());
        }
        let b = trio.status(&trio.beta)?;
        samples += 1;
        let g = peer(&b, "gamma");
        peak_oos = peak_oos.max(g["out_of_sync_bytes"].as_u64().unwrap_or(0));
        if up.is_none() && g["connection"] == "connected" {
            up = Some(Instant::now());
        }
        if writer_end.is_some()
            && peer_in_step(g)
            && trio.status(&trio.gamma)?["disk"] == "UpToDate"
        {
            break Instant::now();
        }
        if t0.elapsed() > budget {
            bail!(
                "gamma is not in step with beta {:.0} s after the promotion{}; {}",
                budget.as_secs_f64(),
                if writer_end.is_none() {
                    " (the writer still runs)"
                } else {
                    ""
                },
                trio.statuses()
            );
        }
        std::thread::sleep(POLL.saturating_sub(tick.elapsed()));
    };
    let writer = writer.finish(Duration::from_secs(10))?;
    let since = |t: Instant| t.duration_since(t0).as_secs_f64();
    Ok(CatchUp {
        seconds: since(done),
        tail_s: writer_end.map_or(0.0, |e| done.duration_since(e).as_secs_f64()),
        link_up_s: up.map(since),
        peak_oos,
        samples,
        writer,
    })
}

/// R7: `load_secs` of paced writes into alpha, `kill -9` of alpha, beta promoted and
/// `written` bytes written into it, timed until gamma has caught up.
pub(crate) fn run(
    env: &Env,
    load_secs: u64,
    written: u64,
    size: u64,
    dir: &Path,
    logs: &Path,
) -> Result<Measured> {
    let mut trio = Trio::start(env, dir, logs, size)?;
    let rate = env.link.total_mbps * 1e6 / 2.0;
    let args = [
        "paced".to_string(),
        export_uri(&trio.alpha.state()),
        size.to_string(),
        rate.to_string(),
        "3600".into(),
        CHUNK.to_string(),
        "until-gone".into(),
    ];
    let mut load = Writer::spawn(dir, logs, "writer-alpha", &args)?;
    load.keep_for(Duration::from_secs(load_secs))?;
    let before_a = trio.status(&trio.alpha)?;
    let before_b = trio.status(&trio.beta)?;
    kill9(&mut trio.alpha_d, "alpha's cutover serve")?;
    let load_cmd = load.command.clone();
    let load = load.finish(Duration::from_secs(60))?;

    let t0 = Instant::now();
    volume_at(&trio.bin, &trio.beta, &["primary", VOLUME])?;
    let at_promotion_b = trio.status(&trio.beta)?;
    let at_promotion_g = trio.status(&trio.gamma)?;
    let args = [
        "spread".to_string(),
        export_uri(&trio.beta.state()),
        size.to_string(),
        written.to_string(),
        CHUNK.to_string(),
        "7".into(),
    ];
    let writer = Writer::spawn(dir, logs, "writer-beta", &args)?;
    let writer_cmd = writer.command.clone();
    let c = catch_up(&trio, writer, t0, env.timeout)?;
    let command = format!(
        "{}; after {load_secs} s: kill -9 of alpha's cutover serve; cutover volume primary {VOLUME} \
         on beta; {}; poll beta's `cutover volume status {VOLUME} --json` every 100 ms until peer \
         gamma is in step and drained and gamma's disk is UpToDate (timed from the promotion) \
         (configs: {}, {}, {}; alpha and beta each dial gamma through a wanem.py {} of their own)",
        describe_writer(&load_cmd, &load),
        describe_writer(&writer_cmd, &c.writer),
        trio.alpha.config.display(),
        trio.beta.config.display(),
        trio.gamma.config.display(),
        trio.link,
    );
    let (wire, wire_a, verify) = trio.finish()?;

    let wrote = c.writer["bytes"]
        .as_u64()
        .context("the writer printed no bytes")?;
    if wrote != written {
        bail!("the writer wrote {wrote} bytes, not the {written} asked");
    }
    let sent = wire.bytes_up.context("beta's relay counted no bytes_up")?;
    let ratio = sent as f64 / wrote as f64;
    let missed = peer_u64(&at_promotion_b, "gamma", "out_of_sync_bytes");
    let judged = format!(
        "{:.1} MB sent beta→gamma = {ratio:.3}× the {:.1} MB written after the failover \
         (≤ {BOUND}× = {:.1} MB); a full resync would send the {:.0} MB volume ({:.1}× as much); \
         gamma in step {:.1} s after the promotion ({:.1} s after the last write); \
         {:.1} MB out of sync for gamma on beta at the promotion",
        mb(sent),
        mb(wrote),
        wrote as f64 * BOUND / 1e6,
        mb(size),
        size as f64 / sent.max(1) as f64,
        c.seconds,
        c.tail_s,
        mb(missed),
    );
    let figures = json!({
        "written_bytes": wrote, "sent_to_gamma_bytes": sent, "ratio_sent_written": ratio,
        "bound_bytes": (wrote as f64 * BOUND) as u64, "volume_bytes": size,
        "full_resync_over_sent": size as f64 / sent.max(1) as f64,
        "from_gamma_bytes": wire.bytes_down, "relay_connections": wire.connections,
        "alpha_relay_bytes_total": wire_a.bytes_total,
        "catch_up_s": c.seconds, "after_last_write_s": c.tail_s, "link_up_s": c.link_up_s,
        "samples": c.samples,
        "alpha_gamma_lag_before_kill_bytes": peer_u64(&before_a, "gamma", "lag_bytes"),
        "alpha_gamma_oos_before_kill_bytes": peer_u64(&before_a, "gamma", "out_of_sync_bytes"),
        "beta_gamma_oos_before_kill_bytes": peer_u64(&before_b, "gamma", "out_of_sync_bytes"),
        "beta_gamma_oos_at_promotion_bytes": missed,
        "gamma_beta_oos_at_promotion_bytes": peer_u64(&at_promotion_g, "beta", "out_of_sync_bytes"),
        "beta_gamma_oos_peak_bytes": c.peak_oos,
        "load": load, "writer": c.writer,
    });
    Ok(Measured {
        command,
        seconds: c.seconds,
        wire,
        figures,
        met: Some(sent as f64 <= wrote as f64 * BOUND),
        judged,
        verify,
        reference: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_found_by_name() {
        let st = json!({"peers": [{"name": "alpha", "lag_bytes": 1},
            {"name": "gamma", "out_of_sync_bytes": 4096}]});
        assert_eq!(peer_u64(&st, "gamma", "out_of_sync_bytes"), 4096);
        assert_eq!(peer_u64(&st, "alpha", "out_of_sync_bytes"), 0);
        assert!(peer(&st, "beta").is_null());
        // A missing peer is never taken for one with nothing out of sync.
        assert!(peer(&st, "beta")["out_of_sync_bytes"] != 0);
    }
}
