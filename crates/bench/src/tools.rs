//! The measured commands: cutover through `cutover serve` + wanem or locally, rsync through
//! `peers.sh` or locally, `cp -a`, and the `rsync --checksum` verification of a destination.

use crate::proc::{self, describe, quote, tail, Background, ProcPeak};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The emulated link, as wanem options.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Link {
    pub rtt_ms: f64,
    pub flow_mbps: f64,
    pub total_mbps: f64,
}

impl Link {
    pub fn args(&self) -> Vec<String> {
        vec![
            "--rtt-ms".into(),
            fmt_num(self.rtt_ms),
            "--flow-mbps".into(),
            fmt_num(self.flow_mbps),
            "--total-mbps".into(),
            fmt_num(self.total_mbps),
        ]
    }
}

/// A number without a needless ".0".
pub fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// Everything the tools need to know about this run.
pub struct Env {
    /// The cutover binary, or why there is none.
    pub cutover: Result<PathBuf, String>,
    pub shared: PathBuf,
    pub link: Link,
    pub timeout: Duration,
}

impl Env {
    pub fn wanem(&self) -> PathBuf {
        self.shared.join("wanem.py")
    }
    pub fn peers(&self) -> PathBuf {
        self.shared.join("peers.sh")
    }
    pub fn mkdata(&self) -> PathBuf {
        self.shared.join("mkdata.py")
    }
}

/// One tool's measurement in one workload.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ToolRun {
    pub tool: String,
    pub command: String,
    pub seconds: Option<f64>,
    pub wire_bytes: Option<u64>,
    /// TCP connections wanem carried.
    pub connections: Option<u64>,
    pub exit: Option<i32>,
    /// `wait4` ru_maxrss of the timed command (max over it and its waited-for descendants).
    pub max_rss_kb: Option<u64>,
    /// Sampled VmHWM of the timed command and each descendant process.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub process_peaks: Vec<ProcPeak>,
    /// VmHWM of `cutover serve` just before it was stopped.
    pub server_rss_kb: Option<u64>,
    /// cutover's `--json` summary object, or peers.sh's JSON line.
    pub report: Option<serde_json::Value>,
    pub error: Option<String>,
    /// Where its stdout and stderr went.
    pub logs: Vec<PathBuf>,
}

impl ToolRun {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.seconds.is_some()
    }
}

fn logs_of(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    (
        dir.join(format!("{name}.stdout")),
        dir.join(format!("{name}.stderr")),
    )
}

/// Record a failure in `run` and return it.
fn failed(mut run: ToolRun, e: anyhow::Error) -> ToolRun {
    run.error = Some(format!("{e:#}"));
    run
}

/// The last `{"event":"summary",...}` object of a cutover `--json` stdout, and how many lines
/// were not JSON.
fn cutover_summary(stdout: &Path) -> Result<Option<serde_json::Value>> {
    let f = fs::File::open(stdout).with_context(|| format!("open {}", stdout.display()))?;
    let mut last = None;
    for line in BufReader::new(f).lines() {
        let line = line?;
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if v.get("event").and_then(|e| e.as_str()) == Some("summary") {
            last = Some(v);
        }
    }
    Ok(last)
}

fn cutover_bin(env: &Env) -> Result<PathBuf> {
    env.cutover.clone().map_err(|e| anyhow::anyhow!(e))
}

/// The program to name in cutover's command lines (the binary, or `cutover` when missing).
fn cutover_program(env: &Env) -> PathBuf {
    env.cutover
        .clone()
        .unwrap_or_else(|_| PathBuf::from("cutover"))
}

/// Fill `run` from a finished timed cutover sync.
fn finish_cutover(run: &mut ToolRun, t: &proc::Timed, out: &Path, err: &Path) -> Result<()> {
    run.seconds = Some(t.seconds);
    run.exit = t.exit_code;
    run.max_rss_kb = Some(t.max_rss_kb);
    run.process_peaks = t.peaks.clone();
    run.report = cutover_summary(out)?;
    if !t.success() {
        bail!("cutover sync {}: {}", t.failure(), tail(err, 2000));
    }
    if run.report.is_none() {
        bail!("cutover sync printed no {{\"event\":\"summary\"}} line with --json");
    }
    Ok(())
}

/// TOML basic string.
fn toml_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

/// `cutover sync --json --delete -H -X SRC/ cutover://127.0.0.1:WANEM/bench/` (the options
/// matching peers.sh's `rsync -aHX --delete`), with `cutover serve`
/// (module `bench` = `dst`) behind a wanem relay, timed like peers.sh times rsync: the sync
/// command alone, by wall clock; wire bytes as wanem counted them.
pub fn cutover_remote(env: &Env, src: &Path, dst: &Path, run_dir: &Path, logs: &Path) -> ToolRun {
    let mut run = ToolRun {
        tool: "cutover".into(),
        ..Default::default()
    };
    match cutover_remote_inner(env, src, dst, run_dir, logs, &mut run) {
        Ok(()) => run,
        Err(e) => failed(run, e),
    }
}

fn cutover_remote_inner(
    env: &Env,
    src: &Path,
    dst: &Path,
    run_dir: &Path,
    logs: &Path,
    run: &mut ToolRun,
) -> Result<()> {
    run.command = format!(
        "{} sync --json --delete -H -X {} cutover://127.0.0.1:WANEM_PORT/bench/",
        quote(&cutover_program(env).to_string_lossy()),
        quote(&slash(src))
    );
    let bin = cutover_bin(env)?;
    let config = write_serve_config(run_dir, dst)?;
    let serve_port_file = run_dir.join("serve.port");
    let serve_log = logs.join("cutover-serve.log");
    run.logs.push(serve_log.clone());
    let mut serve = Background::spawn(
        "cutover serve",
        Command::new(&bin)
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--port-file")
            .arg(&serve_port_file),
        &serve_log,
    )?;
    let serve_port = serve.wait_port_file(&serve_port_file, Duration::from_secs(30))?;

    let wanem_port_file = run_dir.join("wanem.port");
    let stats_file = run_dir.join("wanem.json");
    let wanem_log = logs.join("cutover-wanem.log");
    run.logs.push(wanem_log.clone());
    let mut wanem = Background::spawn(
        "wanem",
        Command::new("python3")
            .arg(env.wanem())
            .args(["--listen", "127.0.0.1:0", "--target"])
            .arg(format!("127.0.0.1:{serve_port}"))
            .arg("--port-file")
            .arg(&wanem_port_file)
            .arg("--stats")
            .arg(&stats_file)
            .args(env.link.args()),
        &wanem_log,
    )?;
    let wanem_port = wanem.wait_port_file(&wanem_port_file, Duration::from_secs(30))?;

    let mut cmd = Command::new(&bin);
    cmd.args(["sync", "--json", "--delete", "-H", "-X"]);
    client_trust(&mut cmd, run_dir);
    cmd.arg(slash(src))
        .arg(format!("cutover://127.0.0.1:{wanem_port}/bench/"));
    run.command = describe(&cmd);
    let (out, err) = logs_of(logs, "cutover");
    run.logs.extend([out.clone(), err.clone()]);
    eprintln!("  cutover: {}", run.command);
    let t = proc::run_timed(&mut cmd, &out, &err, env.timeout, false);

    let (_, killed) = wanem.stop(Duration::from_secs(30))?;
    if killed {
        bail!("wanem did not stop on SIGTERM; no wire-byte stats");
    }
    let stats: serde_json::Value = serde_json::from_str(
        &fs::read_to_string(&stats_file)
            .with_context(|| format!("wanem wrote no stats to {}", stats_file.display()))?,
    )
    .context("wanem stats are not JSON")?;
    run.wire_bytes = stats.get("bytes_total").and_then(|v| v.as_u64());
    run.connections = stats.get("connections").and_then(|v| v.as_u64());
    run.server_rss_kb = serve.vm_hwm_kb();
    let (st, killed) = serve.stop(Duration::from_secs(15))?;
    let t = t?;
    finish_cutover(run, &t, &out, &err)?;
    if killed {
        bail!("cutover serve did not stop within 15 s of SIGTERM");
    }
    if !st.success() && st.signal() != Some(libc::SIGTERM) {
        bail!("cutover serve exited with {st}: {}", tail(&serve_log, 1500));
    }
    Ok(())
}

/// Token every bench daemon grants read-write access with.
const BENCH_TOKEN: &str = "cutover-bench-token-0123456789abcdef";

/// `serve.toml` in `run_dir`: module `bench` = `dst`, the bench token (file mode 0600), the
/// key in `run_dir/state`.
fn write_serve_config(run_dir: &Path, dst: &Path) -> Result<PathBuf> {
    let token = run_dir.join("token");
    fs::write(&token, format!("{BENCH_TOKEN}\n"))?;
    fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let config = run_dir.join("serve.toml");
    fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {}\n\n[[module]]\nname = \"bench\"\npath = {}\n[[module.allow]]\ntoken_file = {}\naccess = \"read-write\"\n",
            toml_str(&run_dir.join("state").to_string_lossy()),
            toml_str(&dst.to_string_lossy()),
            toml_str(&token.to_string_lossy()),
        ),
    )?;
    Ok(config)
}

/// The client's token and a known-hosts file of its own (trust on first use).
fn client_trust(cmd: &mut Command, run_dir: &Path) {
    cmd.env("CUTOVER_TOKEN", BENCH_TOKEN)
        .arg("--known-hosts")
        .arg(run_dir.join("known_hosts"));
}

/// `cutover sync --json SRC/ DST/` on one machine.
pub fn cutover_local(env: &Env, src: &Path, dst: &Path, logs: &Path, sample_rss: bool) -> ToolRun {
    let mut run = ToolRun {
        tool: "cutover".into(),
        ..Default::default()
    };
    let res = (|| -> Result<()> {
        let mut cmd = Command::new(cutover_program(env));
        cmd.args(["sync", "--json"]).arg(slash(src)).arg(slash(dst));
        run.command = describe(&cmd);
        cutover_bin(env)?;
        eprintln!("  cutover: {}", run.command);
        let (out, err) = logs_of(logs, "cutover");
        run.logs.extend([out.clone(), err.clone()]);
        let t = proc::run_timed(&mut cmd, &out, &err, env.timeout, sample_rss)?;
        finish_cutover(&mut run, &t, &out, &err)
    })();
    match res {
        Ok(()) => run,
        Err(e) => failed(run, e),
    }
}

/// `peers.sh rsync SRC/ DST/ LINK...`: rsync -aHX --delete over a loopback sshd behind wanem.
/// Seconds and wire bytes are the ones peers.sh reports.
pub fn rsync_remote(env: &Env, src: &Path, dst: &Path, logs: &Path) -> ToolRun {
    let mut cmd = Command::new(env.peers());
    cmd.arg("rsync")
        .arg(slash(src))
        .arg(slash(dst))
        .args(env.link.args());
    let mut run = ToolRun {
        tool: "rsync".into(),
        command: describe(&cmd),
        ..Default::default()
    };
    eprintln!("  rsync: {}", run.command);
    let (out, err) = logs_of(logs, "rsync");
    run.logs.extend([out.clone(), err.clone()]);
    let res = (|| -> Result<()> {
        let t = proc::run_timed(&mut cmd, &out, &err, env.timeout, false)?;
        let text = fs::read_to_string(&out)?;
        let line = text.lines().rev().find(|l| l.trim_start().starts_with('{'));
        let v: Option<serde_json::Value> = line.and_then(|l| serde_json::from_str(l).ok());
        if let Some(v) = &v {
            run.seconds = v.get("seconds").and_then(|x| x.as_f64());
            run.wire_bytes = v.get("wire_bytes").and_then(|x| x.as_u64());
            run.connections = v.get("connections").and_then(|x| x.as_u64());
            run.exit = v
                .get("exit")
                .and_then(|x| x.as_i64())
                .and_then(|x| i32::try_from(x).ok());
        }
        run.report = v;
        if !t.success() {
            bail!("peers.sh {}: {}", t.failure(), tail(&err, 2000));
        }
        match run.exit {
            Some(0) => Ok(()),
            Some(code) => bail!("rsync exit {code}: {}", tail(&err, 2000)),
            None => bail!("peers.sh printed no result line: {}", tail(&out, 500)),
        }
    })();
    match res {
        Ok(()) => run,
        Err(e) => failed(run, e),
    }
}

/// A plain local command (rsync -a, cp -a), timed by wall clock.
pub fn local(env: &Env, tool: &str, cmd: &mut Command, logs: &Path, sample_rss: bool) -> ToolRun {
    let mut run = ToolRun {
        tool: tool.into(),
        command: describe(cmd),
        ..Default::default()
    };
    eprintln!("  {tool}: {}", run.command);
    let (out, err) = logs_of(logs, tool);
    run.logs.extend([out.clone(), err.clone()]);
    let res = (|| -> Result<()> {
        let t = proc::run_timed(cmd, &out, &err, env.timeout, sample_rss)?;
        run.seconds = Some(t.seconds);
        run.exit = t.exit_code;
        run.max_rss_kb = Some(t.max_rss_kb);
        run.process_peaks = t.peaks.clone();
        if !t.success() {
            bail!("{tool} {}: {}", t.failure(), tail(&err, 2000));
        }
        Ok(())
    })();
    match res {
        Ok(()) => run,
        Err(e) => failed(run, e),
    }
}

/// Whether a destination equals its source, by `rsync -anHAX --checksum --itemize-changes`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verify {
    pub command: String,
    /// Lines rsync printed: each is one difference.
    pub differing_lines: Option<u64>,
    /// The first few of them.
    pub sample: Vec<String>,
    pub seconds: Option<f64>,
    pub error: Option<String>,
}

impl Verify {
    pub fn ok(&self) -> bool {
        self.error.is_none() && self.differing_lines == Some(0)
    }
    pub fn skipped(why: &str) -> Self {
        Self {
            error: Some(why.to_string()),
            ..Default::default()
        }
    }
}

pub fn verify(env: &Env, src: &Path, dst: &Path, logs: &Path) -> Verify {
    let mut cmd = Command::new("rsync");
    cmd.args(["-anHAX", "--delete", "--checksum", "--itemize-changes"])
        .arg(slash(src))
        .arg(slash(dst));
    let mut v = Verify {
        command: describe(&cmd),
        ..Default::default()
    };
    let (out, err) = logs_of(logs, "verify");
    let res = (|| -> Result<()> {
        let t = proc::run_timed(&mut cmd, &out, &err, env.timeout, false)?;
        v.seconds = Some(t.seconds);
        if !t.success() {
            bail!("verify {}: {}", t.failure(), tail(&err, 1500));
        }
        let f = fs::File::open(&out)?;
        let mut n = 0u64;
        for line in BufReader::new(f).lines() {
            let line = line?;
            if line.trim().is_empty() {
                continue;
            }
            n += 1;
            if v.sample.len() < 10 {
                v.sample.push(line);
            }
        }
        v.differing_lines = Some(n);
        Ok(())
    })();
    if let Err(e) = res {
        v.error = Some(format!("{e:#}"));
    }
    v
}

/// `path` with one trailing slash (rsync's "contents of").
pub fn slash(p: &Path) -> String {
    let s = p.to_string_lossy();
    format!("{}/", s.trim_end_matches('/'))
}

/// How to repeat a command by hand: its words, shell-quoted.
pub fn shell_words(words: &[String]) -> String {
    words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
}
