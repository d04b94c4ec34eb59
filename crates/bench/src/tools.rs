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
    /// The row this run was measured in, when another row reuses it (W1s reuses W1's rsync).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub measured_in: Option<String>,
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

pub fn cutover_bin(env: &Env) -> Result<PathBuf> {
    env.cutover.clone().map_err(|e| anyhow::anyhow!(e))
}

/// The program to name in cutover's command lines (the binary, or `cutover` when missing).
pub fn cutover_program(env: &Env) -> PathBuf {
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

/// How the bench daemon talks to its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// TLS 1.3, the daemon's only mode in production.
    Tls,
    /// `insecure_plaintext = true` in its config; clients pass `--insecure-plaintext`.
    Plaintext,
}

/// Token every bench daemon grants read-write access with.
const BENCH_TOKEN: &str = "cutover-bench-token-0123456789abcdef";

/// A `cutover serve` on 127.0.0.1 whose module `bench` is one directory, with its config,
/// token, key and known-hosts file in a directory of its own. Dropping it stops it.
pub struct Daemon {
    process: Background,
    pub port: u16,
    dir: PathBuf,
    transport: Transport,
    log: PathBuf,
}

impl Daemon {
    /// Write `dir/serve.toml` (module `bench` = `module_root`) and start the daemon on a free
    /// loopback port.
    pub fn start(
        bin: &Path,
        dir: &Path,
        module_root: &Path,
        transport: Transport,
        log: &Path,
    ) -> Result<Daemon> {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let config = write_serve_config(dir, module_root, transport)?;
        let port_file = dir.join("serve.port");
        // A port left by an earlier daemon in the same directory must not be taken for ours.
        let _ = fs::remove_file(&port_file);
        let mut process = Background::spawn(
            "cutover serve",
            Command::new(bin)
                .arg("serve")
                .arg("--config")
                .arg(&config)
                .arg("--port-file")
                .arg(&port_file),
            log,
        )?;
        let port = process.wait_port_file(&port_file, Duration::from_secs(30))?;
        Ok(Daemon {
            process,
            port,
            dir: dir.to_path_buf(),
            transport,
            log: log.to_path_buf(),
        })
    }

    /// The client's token and a known-hosts file of its own (trust on first use), and
    /// `--insecure-plaintext` when the daemon speaks plaintext.
    pub fn client_trust(&self, cmd: &mut Command) {
        cmd.env("CUTOVER_TOKEN", BENCH_TOKEN)
            .arg("--known-hosts")
            .arg(self.dir.join("known_hosts"));
        if self.transport == Transport::Plaintext {
            cmd.arg("--insecure-plaintext");
        }
    }

    /// Peak RSS so far.
    pub fn vm_hwm_kb(&self) -> Option<u64> {
        self.process.vm_hwm_kb()
    }

    pub fn pid(&self) -> Option<i32> {
        self.process.pid()
    }

    /// SIGTERM; an error if it had to be killed or exited with a failure of its own.
    pub fn stop(mut self) -> Result<()> {
        let (status, killed) = self.process.stop(Duration::from_secs(15))?;
        if killed {
            bail!("cutover serve did not stop within 15 s of SIGTERM");
        }
        if !status.success() && status.signal() != Some(libc::SIGTERM) {
            bail!(
                "cutover serve exited with {status}: {}",
                tail(&self.log, 1500)
            );
        }
        Ok(())
    }
}

/// `serve.toml` in `dir`: module `bench` = `module_root`, the bench token (file mode 0600),
/// the key in `dir/state`, and `insecure_plaintext` for [`Transport::Plaintext`].
fn write_serve_config(dir: &Path, module_root: &Path, transport: Transport) -> Result<PathBuf> {
    let token = dir.join("token");
    fs::write(&token, format!("{BENCH_TOKEN}\n"))?;
    fs::set_permissions(&token, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let config = dir.join("serve.toml");
    fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {}\ninsecure_plaintext = {}\n\n[[module]]\nname = \"bench\"\npath = {}\n[[module.allow]]\ntoken_file = {}\naccess = \"read-write\"\n",
            toml_str(&dir.join("state").to_string_lossy()),
            transport == Transport::Plaintext,
            toml_str(&module_root.to_string_lossy()),
            toml_str(&token.to_string_lossy()),
        ),
    )?;
    Ok(config)
}

/// A wanem relay on a free loopback port in front of `127.0.0.1:target_port`, with the link's
/// options; it writes what it carried to `dir/NAME.json` when stopped.
pub struct Wanem {
    process: Background,
    pub port: u16,
    stats_file: PathBuf,
}

/// What wanem counted: bytes both ways, each way (up: from the dialling side to the target),
/// and TCP connections.
#[derive(Debug, Clone, Copy, Default)]
pub struct WireCount {
    pub bytes_total: Option<u64>,
    pub bytes_up: Option<u64>,
    pub bytes_down: Option<u64>,
    pub connections: Option<u64>,
}

impl WireCount {
    pub fn fill(self, run: &mut ToolRun) {
        run.wire_bytes = self.bytes_total;
        run.connections = self.connections;
    }
}

impl Wanem {
    pub fn start(env: &Env, target_port: u16, dir: &Path, name: &str, log: &Path) -> Result<Wanem> {
        Wanem::start_at(env, 0, target_port, dir, name, log)
    }

    /// As [`Wanem::start`], listening on `listen_port` (0: a free one): a relay replaced by
    /// a new one on the same port, so a daemon dialling it need not be told.
    pub fn start_at(
        env: &Env,
        listen_port: u16,
        target_port: u16,
        dir: &Path,
        name: &str,
        log: &Path,
    ) -> Result<Wanem> {
        let port_file = dir.join(format!("{name}.port"));
        let stats_file = dir.join(format!("{name}.json"));
        let _ = fs::remove_file(&port_file);
        let mut process = Background::spawn(
            "wanem",
            Command::new("python3")
                .arg(env.wanem())
                .arg("--listen")
                .arg(format!("127.0.0.1:{listen_port}"))
                .arg("--target")
                .arg(format!("127.0.0.1:{target_port}"))
                .arg("--port-file")
                .arg(&port_file)
                .arg("--stats")
                .arg(&stats_file)
                .args(env.link.args()),
            log,
        )?;
        let port = process.wait_port_file(&port_file, Duration::from_secs(30))?;
        Ok(Wanem {
            process,
            port,
            stats_file,
        })
    }

    pub fn pid(&self) -> Option<i32> {
        self.process.pid()
    }

    /// Stop it (it writes its counts on SIGTERM) and read what it counted.
    pub fn finish(mut self) -> Result<WireCount> {
        let (_, killed) = self.process.stop(Duration::from_secs(30))?;
        if killed {
            bail!("wanem did not stop on SIGTERM; no wire-byte stats");
        }
        let stats: serde_json::Value =
            serde_json::from_str(&fs::read_to_string(&self.stats_file).with_context(|| {
                format!("wanem wrote no stats to {}", self.stats_file.display())
            })?)
            .context("wanem stats are not JSON")?;
        Ok(WireCount {
            bytes_total: stats.get("bytes_total").and_then(|v| v.as_u64()),
            bytes_up: stats.get("bytes_up").and_then(|v| v.as_u64()),
            bytes_down: stats.get("bytes_down").and_then(|v| v.as_u64()),
            connections: stats.get("connections").and_then(|v| v.as_u64()),
        })
    }
}

/// The private loopback sshd of `peers.sh sshd` (its own host and client keys in `state`, no
/// system config touched), stopped by the pid it wrote when dropped.
struct Sshd {
    port: u16,
    pid: i32,
    client_key: PathBuf,
}

impl Sshd {
    fn start(env: &Env, state: &Path, log: &Path) -> Result<Sshd> {
        let mut cmd = Command::new(env.peers());
        cmd.arg("sshd").env("PEERS_STATE", state);
        let stderr = fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
        let out = cmd
            .stdin(std::process::Stdio::null())
            .stderr(stderr)
            .output()
            .with_context(|| format!("cannot run {}", describe(&cmd)))?;
        if !out.status.success() {
            bail!(
                "{} failed ({}): {}",
                describe(&cmd),
                out.status,
                tail(log, 1500)
            );
        }
        let printed = String::from_utf8_lossy(&out.stdout);
        let port = printed
            .trim()
            .parse::<u16>()
            .with_context(|| format!("peers.sh sshd printed {printed:?}, not a port"))?;
        // sshd forks into the background before it writes its pid file, and writes it once its
        // socket is bound: waiting for the file waits for a listening sshd.
        let pid_file = state.join("sshd.pid");
        let start = std::time::Instant::now();
        let pid = loop {
            let pid = fs::read_to_string(&pid_file)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            if let Some(pid) = pid {
                break pid;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!(
                    "sshd wrote no pid to {} within 10 s: {}",
                    pid_file.display(),
                    tail(&state.join("sshd.log"), 1500)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Sshd {
            port,
            pid,
            client_key: state.join("client_key"),
        })
    }

    /// The ssh command peers.sh gives rsync, pointed at `port` (the relay in front of sshd).
    fn rsh(&self, port: u16) -> String {
        format!(
            "ssh -p {port} -i {} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR",
            quote(&self.client_key.to_string_lossy())
        )
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // SAFETY: kill has no memory effects; the pid is the sshd this bench started.
        unsafe {
            libc::kill(self.pid, libc::SIGTERM);
        }
    }
}

/// How cutover reaches the far side of the emulated link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WanRoute {
    /// `cutover://` to a `cutover serve` (TLS) behind the relay.
    Daemon,
    /// `root@127.0.0.1:DST/` over ssh to peers.sh's sshd behind the relay.
    Ssh,
}

/// What listens behind the relay.
enum FarSide {
    Daemon(Daemon),
    Sshd(Sshd),
}

/// `cutover sync --json --delete -H -X SRC/ DST` across a wanem relay (the options matching
/// peers.sh's `rsync -aHX --delete`), timed like peers.sh times rsync: the sync command alone,
/// by wall clock; wire bytes as wanem counted them.
///
/// - [`WanRoute::Daemon`]: DST is `cutover://127.0.0.1:RELAY/bench/`, a `cutover serve` whose
///   module `bench` is `dst`.
/// - [`WanRoute::Ssh`]: DST is `root@127.0.0.1:DST/` with `-e 'ssh -p RELAY …'` and
///   `--remote-cutover BIN`: every connection is one `ssh … cutover serve --stdio` to
///   peers.sh's loopback sshd, with the ssh options peers.sh gives rsync, so cutover and rsync
///   cross the same emulated link the same way.
pub fn cutover_wan(
    env: &Env,
    route: WanRoute,
    src: &Path,
    dst: &Path,
    run_dir: &Path,
    logs: &Path,
) -> ToolRun {
    let mut run = ToolRun {
        tool: "cutover".into(),
        ..Default::default()
    };
    match cutover_wan_inner(env, route, src, dst, run_dir, logs, &mut run) {
        Ok(()) => run,
        Err(e) => failed(run, e),
    }
}

fn cutover_wan_inner(
    env: &Env,
    route: WanRoute,
    src: &Path,
    dst: &Path,
    run_dir: &Path,
    logs: &Path,
    run: &mut ToolRun,
) -> Result<()> {
    // The command's shape, for the report when nothing could be started.
    let program = quote(&cutover_program(env).to_string_lossy());
    run.command = match route {
        WanRoute::Daemon => format!(
            "{program} sync --json --delete -H -X {} cutover://127.0.0.1:WANEM_PORT/bench/",
            quote(&slash(src))
        ),
        WanRoute::Ssh => format!(
            "{program} sync --json --delete -H -X -e 'ssh -p WANEM_PORT …' {} root@127.0.0.1:{}",
            quote(&slash(src)),
            quote(&slash(dst))
        ),
    };
    let bin = cutover_bin(env)?;
    let far = match route {
        WanRoute::Daemon => {
            let log = logs.join("cutover-serve.log");
            run.logs.push(log.clone());
            FarSide::Daemon(Daemon::start(&bin, run_dir, dst, Transport::Tls, &log)?)
        }
        WanRoute::Ssh => {
            let log = logs.join("sshd-start.log");
            run.logs.push(log.clone());
            // State of its own: peers.sh's default (/tmp/peers-ssh) holds one sshd's pid at a time.
            FarSide::Sshd(Sshd::start(env, &run_dir.join("ssh"), &log)?)
        }
    };
    let far_port = match &far {
        FarSide::Daemon(d) => d.port,
        FarSide::Sshd(s) => s.port,
    };
    let wanem_log = logs.join("cutover-wanem.log");
    run.logs.push(wanem_log.clone());
    let wanem = Wanem::start(env, far_port, run_dir, "wanem", &wanem_log)?;

    let mut cmd = Command::new(&bin);
    cmd.args(["sync", "--json", "--delete", "-H", "-X"]);
    let destination = match &far {
        FarSide::Daemon(d) => {
            d.client_trust(&mut cmd);
            format!("cutover://127.0.0.1:{}/bench/", wanem.port)
        }
        FarSide::Sshd(s) => {
            cmd.arg("-e")
                .arg(s.rsh(wanem.port))
                .arg("--remote-cutover")
                .arg(&bin);
            format!("root@127.0.0.1:{}", slash(dst))
        }
    };
    cmd.arg(slash(src)).arg(destination);
    run.command = describe(&cmd);
    let (out, err) = logs_of(logs, "cutover");
    run.logs.extend([out.clone(), err.clone()]);
    eprintln!("  cutover: {}", run.command);
    let t = proc::run_timed(&mut cmd, &out, &err, env.timeout, false);

    wanem.finish()?.fill(run);
    let stopped = match far {
        FarSide::Daemon(d) => {
            run.server_rss_kb = d.vm_hwm_kb();
            d.stop()
        }
        // Each ssh login's sshd and `cutover serve --stdio` ended with the sync; only the
        // listener is left, and dropping it stops it.
        FarSide::Sshd(s) => {
            drop(s);
            Ok(())
        }
    };
    // A failed sync explains more than a daemon that would not stop, so it is reported first.
    finish_cutover(run, &t?, &out, &err)?;
    stopped
}

/// `cutover sync --json -j N SRC/ cutover://127.0.0.1:PORT/bench/` straight to `daemon` (no
/// relay), timed by wall clock; `tool` names the run in the report, `log_name` its logs.
pub fn cutover_to_daemon(
    env: &Env,
    tool: &str,
    daemon: &Daemon,
    connections: usize,
    src: &Path,
    logs: &Path,
    log_name: &str,
) -> ToolRun {
    let mut cmd = Command::new(cutover_program(env));
    cmd.args(["sync", "--json", "-j"])
        .arg(connections.to_string());
    daemon.client_trust(&mut cmd);
    cmd.arg(slash(src))
        .arg(format!("cutover://127.0.0.1:{}/bench/", daemon.port));
    cutover_timed(env, tool, &mut cmd, logs, log_name, false)
}

/// `cutover sync --json SRC/ DST/` on one machine.
pub fn cutover_local(env: &Env, src: &Path, dst: &Path, logs: &Path, sample_rss: bool) -> ToolRun {
    let mut cmd = Command::new(cutover_program(env));
    cmd.args(["sync", "--json"]).arg(slash(src)).arg(slash(dst));
    cutover_timed(env, "cutover", &mut cmd, logs, "cutover", sample_rss)
}

/// `cutover sync --json EXTRA… SRC/ DST/` on this machine, logged as `log_name` and shown as
/// `tool`.
pub fn cutover_local_with(
    env: &Env,
    tool: &str,
    extra: &[&std::ffi::OsStr],
    src: &Path,
    dst: &Path,
    logs: &Path,
    log_name: &str,
) -> ToolRun {
    let mut cmd = Command::new(cutover_program(env));
    cmd.args(["sync", "--json"])
        .args(extra)
        .arg(slash(src))
        .arg(slash(dst));
    cutover_timed(env, tool, &mut cmd, logs, log_name, false)
}

/// Run a `cutover sync --json` command line, timed by wall clock, its output in
/// `logs/LOG_NAME.stdout` and `.stderr`; a missing cutover binary is this run's error.
pub fn cutover_timed(
    env: &Env,
    tool: &str,
    cmd: &mut Command,
    logs: &Path,
    log_name: &str,
    sample_rss: bool,
) -> ToolRun {
    let mut run = ToolRun {
        tool: tool.into(),
        command: describe(cmd),
        ..Default::default()
    };
    let res = (|| -> Result<()> {
        cutover_bin(env)?;
        eprintln!("  {tool}: {}", run.command);
        let (out, err) = logs_of(logs, log_name);
        run.logs.extend([out.clone(), err.clone()]);
        let t = proc::run_timed(cmd, &out, &err, env.timeout, sample_rss)?;
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

/// Verify `dst` against `src`, saying on stderr what (`what`) and with what result.
pub fn verify(env: &Env, what: &str, src: &Path, dst: &Path, logs: &Path) -> Verify {
    eprintln!("  verifying {what}");
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
    match (&v.error, v.differing_lines) {
        (Some(e), _) => eprintln!("  -> verify failed: {e}"),
        (None, Some(0)) => eprintln!("  -> verified"),
        (None, n) => eprintln!("  -> {} differing lines", n.unwrap_or(0)),
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
