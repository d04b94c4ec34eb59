//! R1–R5: a volume replicated by two `cutover serve` daemons on 127.0.0.1, the whole link
//! through wanem. "beta" (the secondary) listens; "alpha" (the primary) dials it with
//! [`CONNECTIONS`] data connections. Each row first makes the pair (untimed): metadata on
//! both nodes, alpha promoted with `--force`, and the initial full sync over direct loopback;
//! then alpha is restarted with its peer `address` pointing at a wanem relay in front of
//! beta, and waits until the peer is in step again. What is timed then:
//!
//! - R1: `disconnect`, the base image written into alpha's export (`qemu-img convert -n`),
//!   `connect`, and the seconds until alpha's status says the peer is in step; the same
//!   bytes then cross a relay of their own as raw TCP over as many flows (the emulator's
//!   own ceiling on this machine).
//! - R2: as R1 with `csums = true` on both nodes, the volume starting as the image and the
//!   image written again with one block in ten changed: wire bytes against the dirty bytes.
//! - R3: protocol A under a paced writer (1 MiB writes at half the link): the peer's lag,
//!   sampled from `cutover volume status --json` every 200 ms.
//! - R4: protocol C, 4 KiB writes with FUA one at a time: their latencies, beside raw 4 KiB
//!   round trips through a relay of their own.
//! - R5: protocol C under scattered 4–64 KiB writes from 8 connections, `kill -9` of alpha,
//!   restart: the bytes out of sync after the restart against the activity log's span.
//!
//! The relay is replaced by a fresh one on the same port while alpha is disconnected or
//! dead (R1, R2, R5), so its byte count is the measured phase's alone. Writers are
//! `nbd_load.py` (libnbd's Python bindings). Afterwards both backings must be equal.
//!
//! R7 (three daemons: failover to the partner, the third node's catch-up) is listed and
//! dispatched here and runs in `replication_three.rs`.

use crate::calib;
use crate::proc::{describe, stdout_of};
use crate::replication_pair::*;
use crate::replication_three;
use crate::report::WorkloadResult;
use crate::tools::{self, Env, ToolRun, Verify, Wanem, WireCount};
use crate::volume_io::export_uri;
use crate::volume_io::VOLUME;
use crate::workloads::{big, mib, scaled, Place, Spec, Target};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Data connections of the link: 40 flows of 2 MB/s can fill a 64 MB/s link.
pub(crate) const CONNECTIONS: usize = 40;
/// An activity log extent (the volume crate's `EXTENT_SIZE`, DRBD's 4 MiB).
const EXTENT: u64 = 4 << 20;
/// How often alpha's status is read while a phase is timed.
pub(crate) const POLL: Duration = Duration::from_millis(100);
/// R3's sampling interval.
const LAG_SAMPLE: Duration = Duration::from_millis(200);
/// R5's writer connections.
const CRASH_THREADS: u64 = 8;
/// The writers, run with a python3 that has libnbd's bindings.
pub(crate) const NBD_LOAD: &str = include_str!("nbd_load.py");

/// Which row, with its scaled parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    /// R1: resync of a whole volume of dirty blocks after an outage.
    Resync,
    /// R2: the same with `csums`, one block in ten really different.
    Csums,
    /// R3: protocol A under a paced writer at half the link for `secs` seconds.
    Lag { secs: u64 },
    /// R4: protocol C, `writes` 4 KiB writes with FUA, one at a time.
    Fua { writes: u64 },
    /// R5: kill -9 of the primary after `load_secs` of scattered writes, and restart.
    Crash { load_secs: u64 },
    /// R7 (three nodes, `replication_three.rs`): kill -9 of the primary after `load_secs`
    /// of paced writes, its partner promoted and `written` bytes written to it; the third
    /// node's catch-up.
    Failover { load_secs: u64, written: u64 },
    /// R6: a plan's `replica` task cuts a `mb` MiB volume over to its peer under a steady
    /// writer, `warm_secs` before presync and between presync and cutover
    /// (`replication_cutover.rs`).
    Cutover { mb: u64, warm_secs: u64 },
}

impl Row {
    /// The target, as the table shows it.
    pub fn target(self, link_mbps: f64) -> String {
        match self {
            Row::Resync => format!("≥ 85% of the {link_mbps} MB/s link"),
            Row::Csums => "wire ≤ 15% of the dirty bytes".into(),
            Row::Lag { .. } => "lag p99 ≤ 1 s, no growth".into(),
            Row::Fua { .. } => "p50 ≤ RTT + 10 ms".into(),
            Row::Crash { .. } => "bytes resynced ≤ the activity log's span".into(),
            Row::Failover { written, .. } => format!(
                "bytes to the third node ≤ 1.2 × the {} written",
                mib(written >> 20)
            ),
            Row::Cutover { .. } => crate::replication_cutover::TARGET.into(),
        }
    }
}

/// R1–R5 and R7 at `scale` (1.0: a 1 GiB volume, R3 for 60 s, R4 200 writes, R5 10 s of
/// load, R7 10 s of load and 256 MiB written after the failover).
pub fn specs(scale: f64) -> Vec<Spec> {
    let mb = scaled(1024, scale);
    let vol = mib(mb);
    let secs = scaled(60, scale).max(10);
    let writes = scaled(200, scale).max(20);
    let load_secs = scaled(10, scale).max(3);
    let spec = |id, row, work| row_spec(id, row, work, big(1, mb, false));
    vec![
        spec(
            "R1",
            Row::Resync,
            format!("resync of {vol} of dirty blocks after an outage, {CONNECTIONS} connections"),
        ),
        spec(
            "R2",
            Row::Csums,
            format!("resync with csums: {vol} marked dirty, one block in ten really different"),
        ),
        spec(
            "R3",
            Row::Lag { secs },
            format!("protocol A, 1 MiB writes at 50% of the link for {secs} s, {vol} volume"),
        ),
        spec(
            "R4",
            Row::Fua { writes },
            format!("protocol C, {writes} 4 KiB writes with FUA, one at a time"),
        ),
        spec(
            "R5",
            Row::Crash { load_secs },
            format!(
                "kill -9 of the primary after {load_secs} s of 4–64 KiB writes at random \
                 (protocol C, {vol} volume), restart"
            ),
        ),
        spec(
            "R7",
            Row::Failover {
                load_secs,
                written: scaled(256, scale) << 20,
            },
            format!(
                "failover to the partner, then catch-up of the third node after {} written \
                 during the failover ({vol} volume)",
                mib(scaled(256, scale))
            ),
        ),
    ]
}

/// A replication row `id` whose base set is made by `generate` (mkdata's arguments).
pub(crate) fn row_spec(id: &'static str, row: Row, work: String, generate: Vec<String>) -> Spec {
    Spec {
        id,
        family: id,
        work,
        generate,
        edit: None,
        resync: true,
        place: Place::Replication(row),
        with_cp: false,
        sample_rss: false,
        rsync_as_in: None,
        target: Target::Replication(row),
    }
}

/// The verdict the row's run left in its report.
pub fn judge(run: Option<&ToolRun>) -> (Option<bool>, String) {
    match run.filter(|r| r.ok()).and_then(|r| r.report.as_ref()) {
        Some(rep) => (
            rep["met"].as_bool(),
            rep["judged"].as_str().unwrap_or_default().to_string(),
        ),
        None => (None, "no measurement".into()),
    }
}

/// What one row measured.
pub(crate) struct Measured {
    /// How to repeat the timed phase by hand.
    pub(crate) command: String,
    pub(crate) seconds: f64,
    pub(crate) wire: WireCount,
    /// The row's figures (an object); `met` and `judged` are added to it.
    pub(crate) figures: Value,
    pub(crate) met: Option<bool>,
    pub(crate) judged: String,
    pub(crate) verify: Verify,
    /// The reference measured beside it (the peer's column), if any.
    pub(crate) reference: Option<ToolRun>,
}

/// Run one row; `image` (the base set's one file) gives the volume's size.
pub fn run(
    env: &Env,
    row: Row,
    image: &Path,
    run_dir: &Path,
    logs: &Path,
    res: &mut WorkloadResult,
) -> Result<()> {
    res.order.push(match row {
        Row::Failover { .. } => {
            "cutover: three daemons, the links to the third through wanem".into()
        }
        _ => "cutover: two daemons, the link through wanem".into(),
    });
    let size = fs::metadata(image)
        .with_context(|| format!("stat {}", image.display()))?
        .len();
    let measured = match row {
        Row::Resync => run_resync(env, false, image, run_dir, logs),
        Row::Csums => run_resync(env, true, image, run_dir, logs),
        Row::Lag { secs } => run_lag(env, secs, size, run_dir, logs),
        Row::Fua { writes } => run_fua(env, writes, size, run_dir, logs),
        Row::Crash { load_secs } => run_crash(env, load_secs, size, run_dir, logs),
        Row::Failover { load_secs, written } => {
            replication_three::run(env, load_secs, written, size, run_dir, logs)
        }
        Row::Cutover { mb, warm_secs } => {
            crate::replication_cutover::run(env, mb << 20, warm_secs, run_dir, logs)
        }
    };
    let mut run = ToolRun {
        tool: "cutover replication".into(),
        logs: vec![logs.to_path_buf()],
        ..Default::default()
    };
    match measured {
        Ok(m) => {
            eprintln!("  -> {}", m.judged);
            let mut figures = m.figures;
            figures["met"] = json!(m.met);
            figures["judged"] = json!(m.judged);
            run.command = m.command;
            run.seconds = Some(m.seconds);
            m.wire.fill(&mut run);
            run.report = Some(figures);
            res.rsync = m.reference;
            res.verify = Some(m.verify);
        }
        Err(e) => {
            eprintln!("  -> failed: {e:#}");
            run.error = Some(format!("{e:#}"));
        }
    }
    res.cutover = Some(run);
    Ok(())
}

/// `qemu-img convert -n` of `image` into the export at `uri`.
fn write_image(image: &Path, uri: &str) -> Result<String> {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(image)
        .arg(uri);
    let text = describe(&cmd);
    eprintln!("  writing: {text}");
    stdout_of(&mut cmd)?;
    Ok(text)
}

/// A copy of `image` with one `block` in ten (the fifth, the fifteenth, …) overwritten
/// with new bytes; its path and the bytes that differ.
fn changed_copy(image: &Path, dir: &Path, block: u64) -> Result<(PathBuf, u64)> {
    let out = dir.join("changed.img");
    fs::copy(image, &out)
        .with_context(|| format!("copy {} to {}", image.display(), out.display()))?;
    let size = fs::metadata(&out)?.len();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(&out)
        .with_context(|| format!("open {}", out.display()))?;
    let mut state: u64 = 0x2545_f491_4f6c_dd1d;
    let mut buf = vec![0u8; block as usize];
    let mut changed = 0;
    let mut b = 5;
    while (b + 1) * block <= size {
        for word in buf.chunks_mut(8) {
            // xorshift64: any bytes the image does not already hold.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes()[..word.len()]);
        }
        f.write_all_at(&buf, b * block)
            .with_context(|| format!("write {}", out.display()))?;
        changed += block;
        b += 10;
    }
    Ok((out, changed))
}

/// R1 (`csums` false) and R2 (`csums` true).
fn run_resync(env: &Env, csums: bool, image: &Path, dir: &Path, logs: &Path) -> Result<Measured> {
    let size = fs::metadata(image)?.len();
    let opts = PeerOpts {
        protocol: "C",
        csums,
    };
    // R2's peer already holds the image, so that rewriting it changes few blocks.
    let mut pair = Pair::start(env, dir, logs, size, csums.then_some(image), opts)?;
    let block = pair.status()?["block_size"]
        .as_u64()
        .context("status has no block_size")?;
    let (new, differing) = if csums {
        changed_copy(image, dir, block)?
    } else {
        (image.to_path_buf(), size)
    };
    pair.volume(&["disconnect", VOLUME])?;
    pair.swap_wanem(env, "wanem")?;
    let write = write_image(&new, &export_uri(&pair.alpha.state()))?;
    let dirty = peer_u64(&pair.status()?, "out_of_sync_bytes");
    let cpu0 = pair.cpu_mark();
    let t = Instant::now();
    pair.volume(&["connect", VOLUME])?;
    let mut up = None;
    let (done, _) = pair.wait_in_step(env.timeout, "the resync", |st| link_up(&mut up, st))?;
    let seconds = done.duration_since(t).as_secs_f64();
    // The link's own setup (its connections dialled) against the resync once it is up.
    let up_s = up.map_or(0.0, |u: Instant| u.duration_since(t).as_secs_f64());
    let cpu = cpu0.share_until(&pair.cpu_mark());
    let command = pair.command(&[
        "cutover volume disconnect bench".into(),
        write,
        "cutover volume connect bench".into(),
        "poll `cutover volume status bench --json` every 100 ms until the peer is in step (timed from connect)".into(),
    ]);
    let (wire, verify) = pair.finish()?;
    let rate = dirty as f64 / seconds;
    let link = env.link.total_mbps * 1e6;
    let wire_bytes = wire.bytes_total.unwrap_or(0);
    let mut figures = json!({
        "connections": CONNECTIONS, "dirty_bytes": dirty, "differing_bytes": differing,
        "resync_s": seconds, "rate_mb_s": rate / 1e6, "link_share": rate / link,
        "link_up_s": up_s, "rate_after_link_up_mb_s": dirty as f64 / (seconds - up_s).max(1e-9) / 1e6,
        "wire_bytes": wire.bytes_total, "wire_share_of_dirty": wire_bytes as f64 / dirty.max(1) as f64,
        "cpu_cores": cpu,
    });
    let wanem_cpu = cpu["wanem"].as_f64().unwrap_or(0.0) * 100.0;
    if csums {
        let share = wire_bytes as f64 / dirty.max(1) as f64;
        let mut judged = format!(
            "wire {:.0} MB = {:.1}% of the {:.0} MB marked dirty ({:.0} MB really differ); resync {:.1} s",
            wire_bytes as f64 / 1e6,
            share * 100.0,
            dirty as f64 / 1e6,
            differing as f64 / 1e6,
            seconds
        );
        if share > 0.5 {
            judged.push_str(": csums not used yet");
        }
        return Ok(Measured {
            command,
            seconds,
            wire,
            figures,
            met: Some(share <= 0.15),
            judged,
            verify,
            reference: None,
        });
    }
    let reference = raw_flows(env, dir, dirty)?;
    let raw_rate = reference.seconds.map(|s| dirty as f64 / s);
    figures["raw_rate_mb_s"] = json!(raw_rate.map(|r| r / 1e6));
    let share = rate / link;
    let judged = format!(
        "{:.1} MB/s = {:.0}% of the link from `connect` ({:.0}% of the {:.1} MB/s raw TCP over \
         {CONNECTIONS} flows carried through wanem alone; the link took {up_s:.1} s to come up, \
         then {:.1} MB/s); wanem used {wanem_cpu:.0}% of a core",
        rate / 1e6,
        share * 100.0,
        raw_rate.map_or(0.0, |r| rate / r * 100.0),
        raw_rate.unwrap_or(0.0) / 1e6,
        dirty as f64 / (seconds - up_s).max(1e-9) / 1e6,
    );
    Ok(Measured {
        command,
        seconds,
        wire,
        figures,
        met: Some(share >= 0.85),
        judged,
        verify,
        reference: Some(reference),
    })
}

/// `bytes` of raw TCP over [`CONNECTIONS`] flows through a relay of their own, with the
/// link's options (the calibration's measurement): what the emulator carries here.
fn raw_flows(env: &Env, dir: &Path, bytes: u64) -> Result<ToolRun> {
    let cal_dir = dir.join("raw-flows");
    fs::create_dir_all(&cal_dir)?;
    eprintln!("  the same bytes as raw TCP over {CONNECTIONS} flows through wanem alone");
    let c = calib::run(env, &cal_dir, CONNECTIONS, bytes)?;
    Ok(ToolRun {
        tool: format!("raw TCP, {CONNECTIONS} flows, through wanem alone"),
        command: format!(
            "in-process source and sink, {} flows of {} bytes each through wanem.py {} (after 1 flow of {} bytes)",
            c.parallel.flows,
            c.parallel.bytes / c.parallel.flows as u64,
            tools::shell_words(&env.link.args()),
            c.single.bytes
        ),
        seconds: Some(c.parallel.seconds),
        wire_bytes: Some(c.parallel.bytes),
        connections: Some(c.parallel.flows as u64),
        report: Some(json!({"mb_per_s": c.parallel.mb_per_s, "single_flow_mb_per_s": c.single.mb_per_s})),
        ..Default::default()
    })
}

/// The value at quantile `q` of `v` (sorted in place).
fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// A lag series' quantiles, and its means over the first and last `window` seconds.
#[derive(Debug, Clone, Copy)]
struct LagStats {
    p50: f64,
    p99: f64,
    max: f64,
    first: f64,
    last: f64,
    /// The last window's mean is over 1.5× the first's plus 0.1 s.
    grows: bool,
}

impl LagStats {
    /// Of `(seconds since start, lag seconds)` samples.
    fn of(series: &[(f64, f64)], window: f64) -> LagStats {
        let end = series.last().map_or(0.0, |s| s.0);
        let in_window = |keep: &dyn Fn(f64) -> bool| {
            let v: Vec<f64> = series.iter().filter(|s| keep(s.0)).map(|s| s.1).collect();
            mean(&v)
        };
        let first = in_window(&|t| t < window);
        let last = in_window(&|t| t > end - window);
        let mut all: Vec<f64> = series.iter().map(|s| s.1).collect();
        LagStats {
            p50: quantile(&mut all, 0.5),
            p99: quantile(&mut all, 0.99),
            max: quantile(&mut all, 1.0),
            first,
            last,
            grows: last > first * 1.5 + 0.1,
        }
    }
}

/// R3: protocol A under a writer at half the link for `secs` seconds.
fn run_lag(env: &Env, secs: u64, size: u64, dir: &Path, logs: &Path) -> Result<Measured> {
    let opts = PeerOpts {
        protocol: "A",
        csums: false,
    };
    let pair = Pair::start(env, dir, logs, size, None, opts)?;
    let rate = env.link.total_mbps * 1e6 / 2.0;
    let uri = export_uri(&pair.alpha.state());
    let args = [
        "paced".to_string(),
        uri,
        size.to_string(),
        rate.to_string(),
        secs.to_string(),
        (1u64 << 20).to_string(),
    ];
    let mut writer = Writer::spawn(dir, logs, "writer", &args)?;
    let cpu0 = pair.cpu_mark();
    let start = Instant::now();
    // (seconds since start, lag bytes, lag seconds when status has them, connected)
    let mut samples: Vec<(f64, u64, Option<f64>, bool)> = Vec::new();
    while writer.running()? {
        let tick = Instant::now();
        let st = pair.status()?;
        let p = &st["peers"][0];
        samples.push((
            start.elapsed().as_secs_f64(),
            peer_u64(&st, "lag_bytes"),
            p["lag_secs"].as_f64(),
            p["connection"] == "connected",
        ));
        if start.elapsed() > Duration::from_secs(secs + 120) {
            bail!("the writer has not ended 120 s after it should have");
        }
        std::thread::sleep(LAG_SAMPLE.saturating_sub(tick.elapsed()));
    }
    let cpu = cpu0.share_until(&pair.cpu_mark());
    let writer_cmd = writer.command.clone();
    let w = writer.finish(Duration::from_secs(10))?;
    let command = pair.command(&[
        describe_writer(&writer_cmd, &w),
        "sample `cutover volume status bench --json` on alpha every 200 ms".into(),
    ]);
    pair.wait_in_step(
        Duration::from_secs(120),
        "draining after the writer",
        |_| {},
    )?;
    let (wire, verify) = pair.finish()?;
    let samples_log = logs.join("lag-samples.json");
    fs::write(&samples_log, serde_json::to_string(&samples)?)?;

    let achieved = w["rate"].as_f64().unwrap_or(0.0);
    let window = secs as f64 / 6.0;
    // lag_bytes ÷ the write rate, and the status's own lag_secs when it has them.
    let estimated: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| (s.0, s.1 as f64 / achieved.max(1.0)))
        .collect();
    let reported: Vec<(f64, f64)> = samples.iter().filter_map(|s| Some((s.0, s.2?))).collect();
    let est = LagStats::of(&estimated, window);
    let from_status = !reported.is_empty();
    let lag = if from_status {
        LagStats::of(&reported, window)
    } else {
        est
    };
    let held = achieved >= rate * 0.95;
    let disconnected = samples.iter().filter(|s| !s.3).count();
    let judged = format!(
        "lag p50 {:.3} s, p99 {:.3} s, max {:.3} s ({}); first {window:.0} s mean {:.3} s, last {window:.0} s {:.3} s ({}); \
         lag_bytes ÷ rate: p99 {:.3} s, max {:.1} MB; writer {:.1} MB/s of {:.1} asked{}",
        lag.p50,
        lag.p99,
        lag.max,
        if from_status { "status's lag_secs" } else { "lag_bytes ÷ the write rate: status has no lag_secs" },
        lag.first,
        lag.last,
        if lag.grows { "grows" } else { "no growth" },
        est.p99,
        samples.iter().map(|s| s.1).max().unwrap_or(0) as f64 / 1e6,
        achieved / 1e6,
        rate / 1e6,
        if disconnected > 0 { format!("; {disconnected} sample(s) not connected") } else { String::new() },
    );
    let figures = json!({
        "samples": samples.len(), "samples_file": samples_log, "lag_secs_from_status": from_status,
        "lag_p50_s": lag.p50, "lag_p99_s": lag.p99, "lag_max_s": lag.max,
        "first_window_mean_s": lag.first, "last_window_mean_s": lag.last, "grows": lag.grows,
        "estimated_p50_s": est.p50, "estimated_p99_s": est.p99, "estimated_max_s": est.max,
        "estimated_grows": est.grows, "lag_max_bytes": samples.iter().map(|s| s.1).max(),
        "writer": w, "cpu_cores": cpu,
    });
    Ok(Measured {
        command,
        seconds: w["seconds"].as_f64().unwrap_or(0.0),
        wire,
        figures,
        met: Some(lag.p99 <= 1.0 && !lag.grows && held && disconnected == 0),
        judged,
        verify,
        reference: None,
    })
}

/// The writer's command line and what it wrote, as the report shows it.
pub(crate) fn describe_writer(command: &str, w: &Value) -> String {
    format!("{command} (it wrote {} bytes)", w["bytes"])
}

/// R4: protocol C, `writes` 4 KiB FUA writes one at a time.
fn run_fua(env: &Env, writes: u64, size: u64, dir: &Path, logs: &Path) -> Result<Measured> {
    let opts = PeerOpts {
        protocol: "C",
        csums: false,
    };
    let pair = Pair::start(env, dir, logs, size, None, opts)?;
    let args = [
        "fua".to_string(),
        export_uri(&pair.alpha.state()),
        writes.to_string(),
        "4096".into(),
    ];
    let writer = Writer::spawn(dir, logs, "writer", &args)?;
    let writer_cmd = writer.command.clone();
    let cpu0 = pair.cpu_mark();
    let w = writer.finish(Duration::from_secs(60 + writes * 5))?;
    let cpu = cpu0.share_until(&pair.cpu_mark());
    let command = pair.command(&[describe_writer(&writer_cmd, &w)]);
    let (wire, verify) = pair.finish()?;
    let mut lat: Vec<f64> = w["latencies_ms"]
        .as_array()
        .context("the writer printed no latencies")?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    let seconds = lat.iter().sum::<f64>() / 1e3;
    let (p50, p99, max) = (
        quantile(&mut lat, 0.5),
        quantile(&mut lat, 0.99),
        quantile(&mut lat, 1.0),
    );
    // As many round trips as writes, so the two columns' seconds compare.
    let mut raw = raw_round_trips(env, dir, logs, writes, 4096)?;
    let raw_p50 = quantile(&mut raw, 0.5);
    let bound = env.link.rtt_ms + 10.0;
    let judged = format!(
        "p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms (≤ {bound:.0} ms); a raw 4 KiB round trip through \
         wanem alone: p50 {raw_p50:.1} ms"
    );
    let figures = json!({
        "writes": writes, "p50_ms": p50, "p99_ms": p99, "max_ms": max, "bound_ms": bound,
        "raw_round_trip_p50_ms": raw_p50, "raw_round_trip_p99_ms": quantile(&mut raw, 0.99), "cpu_cores": cpu,
    });
    let reference = ToolRun {
        tool: "raw 4 KiB round trips through wanem alone".into(),
        command: format!(
            "{} round trips (4096 bytes out, 1 byte back) on one TCP connection through wanem.py {}",
            raw.len(),
            tools::shell_words(&env.link.args())
        ),
        seconds: Some(raw.iter().sum::<f64>() / 1e3),
        report: Some(json!({"p50_ms": raw_p50})),
        ..Default::default()
    };
    Ok(Measured {
        command,
        seconds,
        wire,
        figures,
        met: Some(p50 <= bound),
        judged,
        verify,
        reference: Some(reference),
    })
}

/// `count` round trips of `size` bytes out and one byte back, one at a time, on one TCP
/// connection through a relay of its own: what the emulator alone costs a small write.
/// Milliseconds each.
fn raw_round_trips(
    env: &Env,
    dir: &Path,
    logs: &Path,
    count: u64,
    size: usize,
) -> Result<Vec<f64>> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let wanem = Wanem::start(env, port, dir, "wanem-rtt", &logs.join("wanem-rtt.log"))?;
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        let mut buf = vec![0u8; size];
        loop {
            match s.read_exact(&mut buf) {
                Ok(()) => s.write_all(&[1])?,
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    let mut c = TcpStream::connect(("127.0.0.1", wanem.port)).context("connect to the relay")?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let out = vec![7u8; size];
    let mut one = [0u8; 1];
    let mut ms = Vec::new();
    for _ in 0..count {
        let t = Instant::now();
        c.write_all(&out).context("raw round trip: send")?;
        c.read_exact(&mut one).context("raw round trip: reply")?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    drop(c);
    echo.join()
        .map_err(|_| anyhow::anyhow!("the echo thread panicked"))?
        .context("the echo side")?;
    wanem.finish()?;
    Ok(ms)
}

/// R5: kill -9 of alpha after `load_secs` of scattered writes, restart, resync.
fn run_crash(env: &Env, load_secs: u64, size: u64, dir: &Path, logs: &Path) -> Result<Measured> {
    let opts = PeerOpts {
        protocol: "C",
        csums: false,
    };
    let mut pair = Pair::start(env, dir, logs, size, None, opts)?;
    let args = [
        "scattered".to_string(),
        export_uri(&pair.alpha.state()),
        size.to_string(),
        CRASH_THREADS.to_string(),
        "3600".into(),
    ];
    let mut writer = Writer::spawn(dir, logs, "writer", &args)?;
    writer.keep_for(Duration::from_secs(load_secs))?;
    let before = pair.status()?;
    pair.kill_alpha()?;
    let writer_cmd = writer.command.clone();
    let load = writer.finish(Duration::from_secs(60))?;
    pair.swap_wanem(env, "wanem")?;
    let t = Instant::now();
    pair.start_alpha()?;
    let cpu0 = pair.cpu_mark();
    let (mut first, mut peak) = (None, 0);
    let mut up = None;
    let (done, _) = pair.wait_in_step(env.timeout, "the resync after the restart", |st| {
        link_up(&mut up, st);
        let oos = peer_u64(st, "out_of_sync_bytes");
        first.get_or_insert(oos);
        peak = peak.max(oos);
    })?;
    let seconds = done.duration_since(t).as_secs_f64();
    let up_s = up.map(|u: Instant| u.duration_since(t).as_secs_f64());
    let cpu = cpu0.share_until(&pair.cpu_mark());
    let command = pair.command(&[
        describe_writer(&writer_cmd, &load),
        format!("after {load_secs} s: kill -9 of alpha's cutover serve"),
        "cutover serve --config alpha (restart)".into(),
        "poll `cutover volume status bench --json` every 100 ms until the peer is in step (timed from the restart)".into(),
    ]);
    let (wire, verify) = pair.finish()?;
    let al = &before["activity_log"];
    let hot = al["hot_extents"]
        .as_u64()
        .context("status has no activity_log.hot_extents")?;
    let span = (hot * EXTENT).min(size);
    let wire_bytes = wire.bytes_total.unwrap_or(0);
    let judged = format!(
        "{:.0} MB to resync after the restart ({:.0} MB on the wire, {seconds:.1} s) against the activity \
         log's span of {:.0} MB ({hot} hot extent(s) of 4 MiB, capacity {}; the volume is {:.0} MB)",
        peak as f64 / 1e6,
        wire_bytes as f64 / 1e6,
        span as f64 / 1e6,
        al["capacity"],
        size as f64 / 1e6,
    );
    let figures = json!({
        "out_of_sync_first_bytes": first, "out_of_sync_peak_bytes": peak,
        "out_of_sync_before_kill_bytes": peer_u64(&before, "out_of_sync_bytes"),
        "lag_before_kill_bytes": peer_u64(&before, "lag_bytes"),
        "activity_log_before_kill": al, "al_span_bytes": span, "wire_bytes": wire.bytes_total,
        "resync_s": seconds, "link_up_s": up_s, "load": load, "cpu_cores": cpu,
    });
    Ok(Measured {
        command,
        seconds,
        wire,
        figures,
        met: Some(peak <= span),
        judged,
        verify,
        reference: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_taken_from_the_sorted_values() {
        let mut v = vec![5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(quantile(&mut v, 0.5), 3.0);
        assert_eq!(quantile(&mut v, 0.99), 5.0);
        assert_eq!(quantile(&mut v, 1.0), 5.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
    }

    #[test]
    fn lag_growth_compares_the_first_and_last_windows() {
        let flat: Vec<(f64, f64)> = (0..60).map(|t| (t as f64, 0.2)).collect();
        let s = LagStats::of(&flat, 10.0);
        let near = |x: f64| (x - 0.2).abs() < 1e-9;
        assert!(
            !s.grows && near(s.p99) && near(s.first) && near(s.last),
            "{s:?}"
        );
        let rising: Vec<(f64, f64)> = (0..60).map(|t| (t as f64, t as f64 / 20.0)).collect();
        let s = LagStats::of(&rising, 10.0);
        assert!(s.grows, "{s:?}");
        assert_eq!(s.max, 59.0 / 20.0);
    }

    #[test]
    fn in_step_needs_every_condition() {
        let mut st = json!({"peers": [{"connection": "connected", "replication": "source",
            "out_of_sync_bytes": 0, "lag_bytes": 0, "peer_disk": "UpToDate"}]});
        assert!(in_step(&st));
        st["peers"][0]["lag_bytes"] = json!(4096);
        assert!(!in_step(&st));
        st["peers"][0]["lag_bytes"] = json!(0);
        st["peers"][0]["peer_disk"] = json!("Inconsistent");
        assert!(!in_step(&st));
        assert!(!in_step(&json!({"peers": []})));
    }

    #[test]
    fn one_block_in_ten_is_changed() {
        let dir = std::env::temp_dir().join(format!("rbench-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let image = dir.join("image");
        fs::write(&image, vec![0u8; 100 * 4096]).unwrap();
        let (copy, changed) = changed_copy(&image, &dir, 4096).unwrap();
        let data = fs::read(&copy).unwrap();
        let differs: Vec<usize> = (0..100)
            .filter(|b| data[b * 4096..(b + 1) * 4096].iter().any(|&x| x != 0))
            .collect();
        assert_eq!(differs, (0..10).map(|i| 5 + 10 * i).collect::<Vec<_>>());
        assert_eq!(changed, 10 * 4096);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rows_are_named_r1_to_r5_and_r7() {
        let ids: Vec<_> = specs(0.05).iter().map(|s| s.id).collect();
        assert_eq!(ids, ["R1", "R2", "R3", "R4", "R5", "R7"]);
        assert!(cpu_secs(std::process::id() as i32).is_some());
    }
}
