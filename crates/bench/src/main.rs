//! cutover-bench: runs cutover and rsync (and `cp -a`) on the same data, through the same WAN
//! emulator, and writes the side-by-side table to BENCH.md and the raw figures to results.json.
//!
//! Data come from `shared/mkdata.py`, the link from `shared/wanem.py`, and rsync runs through
//! `shared/peers.sh`, so every figure is taken the same way for every tool.

mod calib;
mod data;
mod listed;
mod proc;
mod replication;
mod replication_cutover;
mod replication_pair;
mod replication_three;
mod report;
mod tls_cost;
mod tools;
mod volume_io;
mod volume_pass;
mod workloads;

use anyhow::{bail, Context, Result};
use clap::Parser;
use report::{Machine, Results, WorkloadResult};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};
use tls_cost::TlsCost;
use tools::{fmt_num, shell_words, Env, Link, ToolRun, Verify, WanRoute};
use workloads::{Outcome, Place, Spec};

/// Benchmark cutover against rsync and `cp -a` (see DESIGN.md, "Benchmarks").
#[derive(Parser, Debug)]
#[command(name = "cutover-bench", version)]
struct Args {
    /// Multiply data sizes and file counts (1.0 = the table's sizes; 0.05 for a smoke run).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Run only these ids (W1..W5, W1s, L1 (= L1a,L1b), L1a, L1b, M1, P1, V1, V2, V3, T1,
    /// R1..R5, R7), comma-separated.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Work directory: cached base data, run directories, logs, results.json.
    #[arg(long)]
    work: Option<PathBuf>,
    /// The Markdown report [default: WORK/BENCH.md].
    #[arg(long)]
    out: Option<PathBuf>,
    /// The cutover binary [default: the newest of REPO/target/release/cutover,
    /// $CARGO_TARGET_DIR/release/cutover and the one beside this binary].
    #[arg(long)]
    cutover: Option<PathBuf>,
    /// Directory holding wanem.py, mkdata.py and peers.sh [default: REPO/../shared].
    #[arg(long)]
    shared: Option<PathBuf>,
    /// Emulated round-trip time, ms.
    #[arg(long, default_value_t = 100.0)]
    rtt_ms: f64,
    /// Emulated cap per TCP connection, MB/s.
    #[arg(long, default_value_t = 2.0)]
    flow_mbps: f64,
    /// Emulated link capacity, MB/s.
    #[arg(long, default_value_t = 64.0)]
    total_mbps: f64,
    /// Give up on one tool's run after this many seconds.
    #[arg(long, default_value_t = 3600)]
    timeout_s: u64,
    /// Measure cutover only (no rsync, no cp): for quick iterations; ratios stay empty.
    #[arg(long)]
    no_peers: bool,
    /// Skip the link calibration (wanem alone) that precedes WAN workloads.
    #[arg(long)]
    no_calibrate: bool,
    /// Keep run directories (sources, destinations) after each workload.
    #[arg(long)]
    keep: bool,
    /// T1: runs of each variant (TLS, plaintext), alternated; the medians are compared.
    #[arg(long, default_value_t = 5)]
    t1_repetitions: usize,
}

/// The repository root, from where this crate was built.
fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_else(|| here.to_path_buf())
}

/// The cutover binary to measure, or a message saying why there is none.
fn find_cutover(explicit: Option<&Path>, repo: &Path) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return if p.is_file() {
            p.canonicalize()
                .map_err(|e| format!("{}: {e}", p.display()))
        } else {
            Err(format!("--cutover {} is not a file", p.display()))
        };
    }
    let mut candidates = vec![repo.join("target/release/cutover")];
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        candidates.push(PathBuf::from(t).join("release/cutover"));
    }
    if let Some(d) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
    {
        candidates.push(d.join("cutover"));
    }
    candidates
        .iter()
        .filter_map(|p| {
            let m = fs::metadata(p).ok().filter(|m| m.is_file())?;
            Some((m.modified().ok(), p.clone()))
        })
        .max_by_key(|(t, _)| *t)
        .map(|(_, p)| p)
        .ok_or_else(|| {
            format!(
                "no cutover binary at {}; build it with `CARGO_TARGET_DIR=/work/bench-target cargo build \
                 --release -p cli` or pass --cutover PATH",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

fn ensure_rsync() -> Result<()> {
    let have = Command::new("rsync")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if have {
        return Ok(());
    }
    eprintln!("rsync is missing; installing it with apt-get, as peers.sh would");
    let _ = Command::new("apt-get").args(["update", "-qq"]).status();
    let st = Command::new("apt-get")
        .args(["install", "-y", "-qq", "rsync"])
        .status()
        .context("apt-get")?;
    if !st.success() {
        bail!("apt-get install rsync failed ({st})");
    }
    Ok(())
}

fn select(all: Vec<Spec>, only: &[String]) -> Result<Vec<Spec>> {
    if only.is_empty() {
        return Ok(all);
    }
    for o in only {
        let known = all
            .iter()
            .any(|s| s.id.eq_ignore_ascii_case(o) || s.family.eq_ignore_ascii_case(o));
        if !known {
            let ids: Vec<_> = all.iter().map(|s| s.id).collect();
            bail!(
                "unknown workload {o:?} in --only; known: {}, L1",
                ids.join(", ")
            );
        }
    }
    Ok(all
        .into_iter()
        .filter(|s| {
            only.iter()
                .any(|o| s.id.eq_ignore_ascii_case(o) || s.family.eq_ignore_ascii_case(o))
        })
        .collect())
}

fn describe_run(r: &ToolRun) -> String {
    if let Some(e) = &r.error {
        let short: String = e.chars().take(300).collect();
        return format!("FAILED: {short}");
    }
    let mut s = format!("{:.2} s", r.seconds.unwrap_or(0.0));
    if let Some(w) = r.wire_bytes {
        s += &format!(", {:.2} MB on the wire", w as f64 / 1e6);
    }
    if let Some(kb) = r.max_rss_kb {
        s += &format!(", peak RSS {:.1} MB", kb as f64 * 1024.0 / 1e6);
    }
    s
}

fn record(slot: &mut Option<ToolRun>, r: ToolRun) {
    eprintln!("  -> {}: {}", r.tool, describe_run(&r));
    *slot = Some(r);
}

/// Run one row; `earlier` are the rows this invocation has already run.
fn run_workload(
    env: &Env,
    spec: &Spec,
    work: &Path,
    args: &Args,
    earlier: &[WorkloadResult],
) -> WorkloadResult {
    let mut res = WorkloadResult {
        id: spec.id.into(),
        work: spec.work.clone(),
        place: spec.place.label().into(),
        generate: mkdata_text(&env.mkdata(), &spec.generate),
        base_cached: false,
        edit: None,
        source: Default::default(),
        order: Vec::new(),
        cutover: None,
        rsync: None,
        cp: None,
        tls_cost: None,
        verify: None,
        target: spec.target.describe(env.link.total_mbps),
        met: None,
        judged: String::new(),
        error: None,
    };
    let run_dir = work.join("run").join(spec.id);
    if let Err(e) = run_inner(env, spec, work, &run_dir, args, earlier, &mut res) {
        eprintln!("  -> setup failed: {e:#}");
        res.error = Some(format!("{e:#}"));
    }
    if res.cutover.is_some() || res.tls_cost.is_some() {
        let (met, judged) = spec.target.judge(&Outcome {
            source_bytes: res.source.bytes,
            link_mbps: env.link.total_mbps,
            cutover: res.cutover.as_ref(),
            rsync: res.rsync.as_ref(),
            cp: res.cp.as_ref(),
            tls_cost: res.tls_cost.as_ref().and_then(|t| t.cost),
        });
        res.met = met;
        res.judged = judged;
    }
    if !args.keep {
        eprintln!("  removing {}", run_dir.display());
        if let Err(e) = data::remove_tree(&run_dir) {
            eprintln!("  warning: {e:#}");
        }
    }
    res
}

fn mkdata_text(mkdata: &Path, args: &[String]) -> String {
    let mut words = vec!["python3".to_string(), mkdata.display().to_string()];
    if let Some((sub, rest)) = args.split_first() {
        words.push(sub.clone());
        words.push("DIR".into());
        words.extend(rest.iter().cloned());
    }
    shell_words(&words)
}

/// The rsync run of `spec.rsync_as_in` when that row ran earlier in this invocation, on the
/// same data, and rsync succeeded there.
fn rsync_measured_before(
    spec: &Spec,
    earlier: &[WorkloadResult],
    res: &WorkloadResult,
) -> Option<ToolRun> {
    let id = spec.rsync_as_in?;
    let row = earlier
        .iter()
        .find(|w| w.id == id && w.generate == res.generate)?;
    let mut run = row.rsync.clone().filter(ToolRun::ok)?;
    run.measured_in = Some(id.to_string());
    Some(run)
}

fn run_inner(
    env: &Env,
    spec: &Spec,
    work: &Path,
    run_dir: &Path,
    args: &Args,
    earlier: &[WorkloadResult],
    res: &mut WorkloadResult,
) -> Result<()> {
    let base = data::ensure_base(work, &env.mkdata(), &spec.generate)?;
    res.base_cached = base.cached;
    data::remove_tree(run_dir)?;
    fs::create_dir_all(run_dir)?;
    let logs = work.join("logs").join(spec.id);
    data::remove_tree(&logs)?;
    fs::create_dir_all(&logs)?;

    if spec.place == Place::Loopback {
        res.source = base.stats;
        res.order.push(format!(
            "cutover TLS and cutover plaintext, alternated, {} each",
            args.t1_repetitions
        ));
        let mut cost = TlsCost {
            repetitions: args.t1_repetitions,
            ..Default::default()
        };
        let ran = tls_cost::run(
            env,
            &base.path,
            base.stats.bytes,
            run_dir,
            &logs,
            args.keep,
            &mut cost,
        );
        cost.summarise();
        res.tls_cost = Some(cost);
        return ran;
    }

    if let Some(io) = match spec.place {
        Place::VolumeConvert => Some(volume_io::VolumeIo::Convert),
        Place::VolumeWrites { count } => Some(volume_io::VolumeIo::Writes { count }),
        _ => None,
    } {
        res.source = base.stats;
        // mkdata's `big --count 1` makes one file of this name.
        let image = base.path.join("big00.bin");
        return volume_io::run(env, io, &image, run_dir, &logs, res);
    }
    if let Place::Replication(row) = spec.place {
        res.source = base.stats;
        let image = base.path.join("big00.bin");
        return replication::run(env, row, &image, run_dir, &logs, res);
    }
    if spec.place == Place::VolumePass {
        res.source = base.stats;
        return volume_pass::run(env, &base.path.join("big00.bin"), run_dir, &logs, res);
    }
    if spec.place == Place::Listed {
        return listed::run(env, spec, &base.path, base.stats.files, run_dir, &logs, res);
    }

    let src = match &spec.edit {
        Some(edit) => {
            let s = run_dir.join("src");
            eprintln!("  copying the base to a fresh source and editing it");
            data::copy(&base.path, &s, &logs.join("copy-src.log"))?;
            res.edit = Some(data::edit(&env.mkdata(), &s, edit, &logs.join("edit.log"))?);
            res.source = data::walk(&s)?;
            s
        }
        None => {
            res.source = base.stats;
            base.path.clone()
        }
    };
    let dst_c = run_dir.join("dst-cutover");
    let dst_r = run_dir.join("dst-rsync");
    let dst_cp = run_dir.join("dst-cp");
    if spec.resync {
        eprintln!("  copying the base to both destinations (cp -a)");
        data::copy(&base.path, &dst_c, &logs.join("copy-dst-cutover.log"))?;
        if !args.no_peers {
            data::copy(&base.path, &dst_r, &logs.join("copy-dst-rsync.log"))?;
        }
    } else {
        fs::create_dir_all(&dst_c)?;
        fs::create_dir_all(&dst_r)?;
    }

    match spec.place {
        Place::Wan | Place::WanSsh => {
            res.order.push("cutover".into());
            let route = if spec.place == Place::WanSsh {
                WanRoute::Ssh
            } else {
                WanRoute::Daemon
            };
            record(
                &mut res.cutover,
                tools::cutover_wan(env, route, &src, &dst_c, run_dir, &logs),
            );
            if !args.no_peers {
                match rsync_measured_before(spec, earlier, res) {
                    Some(run) => {
                        let from = run.measured_in.clone().unwrap_or_default();
                        eprintln!(
                            "  rsync: the same command on the same data ran in {from}; \
                             its run stands here too"
                        );
                        res.order.push(format!("rsync (measured in {from})"));
                        res.rsync = Some(run);
                    }
                    None => {
                        res.order.push("rsync".into());
                        record(
                            &mut res.rsync,
                            tools::rsync_remote(env, &src, &dst_r, &logs),
                        );
                    }
                }
            }
        }
        Place::Loopback
        | Place::Listed
        | Place::VolumeConvert
        | Place::VolumeWrites { .. }
        | Place::VolumePass
        | Place::Replication(_) => {
            unreachable!("T1, P1, V1, V2, V3, R1–R5 and R7 returned above")
        }
        Place::Local => {
            if spec.with_cp && !args.no_peers {
                res.order.push("cp".into());
                let mut cmd = Command::new("cp");
                cmd.arg("-a").arg(&src).arg(&dst_cp);
                record(&mut res.cp, tools::local(env, "cp", &mut cmd, &logs, false));
            }
            let rsync = |res: &mut WorkloadResult| {
                res.order.push("rsync".into());
                let mut cmd = Command::new("rsync");
                cmd.arg("-a")
                    .arg(tools::slash(&src))
                    .arg(tools::slash(&dst_r));
                record(
                    &mut res.rsync,
                    tools::local(env, "rsync", &mut cmd, &logs, spec.sample_rss),
                );
            };
            if spec.resync {
                res.order.push("cutover".into());
                record(
                    &mut res.cutover,
                    tools::cutover_local(env, &src, &dst_c, &logs, spec.sample_rss),
                );
                if !args.no_peers {
                    rsync(res);
                }
            } else {
                if !args.no_peers {
                    rsync(res);
                }
                res.order.push("cutover".into());
                record(
                    &mut res.cutover,
                    tools::cutover_local(env, &src, &dst_c, &logs, spec.sample_rss),
                );
            }
        }
    }

    let cut_ok = res.cutover.as_ref().is_some_and(ToolRun::ok);
    res.verify = Some(if cut_ok {
        tools::verify(env, "cutover's destination", &src, &dst_c, &logs)
    } else {
        Verify::skipped("cutover did not finish")
    });
    Ok(())
}

/// The command that repeats this run, with every default spelled out.
fn repro(
    args: &Args,
    specs: &[Spec],
    work: &Path,
    out: &Path,
    shared: &Path,
    repo: &Path,
) -> String {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("cutover-bench"));
    let target = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "target".into());
    let cli = if repo.join("crates/cli/Cargo.toml").is_file() {
        " -p cli"
    } else {
        ""
    };
    let mut w = vec![
        exe.display().to_string(),
        "--scale".into(),
        fmt_num(args.scale),
    ];
    if !args.only.is_empty() {
        w.push("--only".into());
        w.push(specs.iter().map(|s| s.id).collect::<Vec<_>>().join(","));
    }
    w.extend([
        "--work".into(),
        work.display().to_string(),
        "--out".into(),
        out.display().to_string(),
        "--shared".into(),
        shared.display().to_string(),
    ]);
    if let Some(c) = &args.cutover {
        w.push("--cutover".into());
        w.push(c.display().to_string());
    }
    w.extend([
        "--rtt-ms".into(),
        fmt_num(args.rtt_ms),
        "--flow-mbps".into(),
        fmt_num(args.flow_mbps),
        "--total-mbps".into(),
        fmt_num(args.total_mbps),
        "--timeout-s".into(),
        args.timeout_s.to_string(),
    ]);
    for (on, flag) in [
        (args.no_peers, "--no-peers"),
        (args.no_calibrate, "--no-calibrate"),
        (args.keep, "--keep"),
    ] {
        if on {
            w.push(flag.into());
        }
    }
    if specs.iter().any(|s| s.place == Place::Loopback) {
        w.push("--t1-repetitions".into());
        w.push(args.t1_repetitions.to_string());
    }
    format!(
        "cd {} && CARGO_TARGET_DIR={} cargo build --release{cli} -p bench\n{}",
        proc::quote(&repo.display().to_string()),
        proc::quote(&target),
        shell_words(&w)
    )
}

fn real_main() -> Result<ExitCode> {
    let args = Args::parse();
    if !(args.scale.is_finite() && args.scale > 0.0) {
        bail!("--scale must be a positive number");
    }
    if args.t1_repetitions == 0 {
        bail!("--t1-repetitions must be at least 1");
    }
    for (v, name) in [
        (args.rtt_ms, "--rtt-ms"),
        (args.flow_mbps, "--flow-mbps"),
        (args.total_mbps, "--total-mbps"),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            bail!("{name} must be a non-negative number");
        }
    }
    let repo = repo_root();
    let mut all = workloads::all(args.scale);
    all.extend(replication::specs(args.scale));
    all.extend(replication_cutover::specs(args.scale));
    let specs = select(all, &args.only)?;
    let work = args.work.clone().unwrap_or_else(|| repo.join("bench-work"));
    fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;
    let work = work.canonicalize()?;
    eprintln!(
        "work dir {} ({:.0} GB free; a full-scale run needs about 30 GB at its peak)",
        work.display(),
        report::free_bytes(&work).unwrap_or(0) as f64 / 1e9
    );
    let out = args.out.clone().unwrap_or_else(|| work.join("BENCH.md"));
    let out = if out.is_absolute() {
        out
    } else {
        std::env::current_dir()?.join(out)
    };
    let shared = args
        .shared
        .clone()
        .unwrap_or_else(|| repo.join("../shared"));
    let shared = shared
        .canonicalize()
        .with_context(|| format!("shared scripts directory {}", shared.display()))?;
    for f in ["wanem.py", "mkdata.py", "peers.sh"] {
        if !shared.join(f).is_file() {
            bail!("{} is missing", shared.join(f).display());
        }
    }
    ensure_rsync()?;

    let cutover = find_cutover(args.cutover.as_deref(), &repo);
    match &cutover {
        Ok(p) => eprintln!("cutover: {}", p.display()),
        Err(e) => eprintln!("cutover-bench: error: {e}\n  (measuring the peers only; every cutover cell will say why)"),
    }
    let env = Env {
        cutover: cutover.clone(),
        shared: shared.clone(),
        link: Link {
            rtt_ms: args.rtt_ms,
            flow_mbps: args.flow_mbps,
            total_mbps: args.total_mbps,
        },
        timeout: Duration::from_secs(args.timeout_s.max(1)),
    };
    let repro = repro(&args, &specs, &work, &out, &shared, &repo);
    let mut results = Results {
        date: report::utc_now(),
        command: repro.clone(),
        scale: args.scale,
        link: env.link,
        machine: Machine::probe(&work, &repo, &cutover),
        calibration: None,
        calibration_error: None,
        workloads: Vec::new(),
    };

    if !args.no_calibrate && specs.iter().any(|s| s.place.is_wan()) {
        let dir = work.join("logs").join("calibration");
        fs::create_dir_all(&dir)?;
        let total = ((1u64 << 30) as f64 * args.scale) as u64;
        let total = total.max(64 << 20);
        let flows = 32;
        eprintln!(
            "[calibration] {flows} flows, {:.0} MB through wanem alone",
            total as f64 / 1e6
        );
        match calib::run(&env, &dir, flows, total) {
            Ok(c) => {
                eprintln!(
                    "  -> 1 flow {:.2} MB/s; {} flows {:.1} MB/s",
                    c.single.mb_per_s, c.parallel.flows, c.parallel.mb_per_s
                );
                results.calibration = Some(c);
            }
            Err(e) => {
                eprintln!("  -> calibration failed: {e:#}");
                results.calibration_error = Some(format!("{e:#}"));
            }
        }
    }

    let started = Instant::now();
    for spec in &specs {
        eprintln!("[{}] {}", spec.id, spec.work);
        let t = Instant::now();
        let r = run_workload(&env, spec, &work, &args, &results.workloads);
        eprintln!(
            "[{}] done in {:.0} s: target {}: {}",
            spec.id,
            t.elapsed().as_secs_f64(),
            match r.met {
                Some(true) => "met",
                Some(false) => "NOT met",
                None => "cannot tell",
            },
            r.judged
        );
        results.workloads.push(r);
        report::write(&results, &repro, &work, &out)?;
    }
    report::write(&results, &repro, &work, &out)?;
    eprintln!(
        "wrote {} and {} ({:.0} s)",
        out.display(),
        work.join("results.json").display(),
        started.elapsed().as_secs_f64()
    );
    let failed = results
        .workloads
        .iter()
        .any(|w| w.error.is_some() || w.runs().any(|r| !r.ok()) || w.verifies().any(|v| !v.ok()));
    Ok(if failed {
        eprintln!("some runs failed or did not verify (see the report)");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn main() -> ExitCode {
    match real_main() {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cutover-bench: error: {e:#}");
            ExitCode::from(2)
        }
    }
}
