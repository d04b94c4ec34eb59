//! The kill driver: sync a mixed tree through a real TLS daemon, SIGKILL the sending or the
//! receiving side at a random moment (seeded), rerun until the sync succeeds, and check that
//! the destination equals the source (rsync `--checksum` as the oracle) and how many bytes
//! the interruption cost.
//!
//! Each trial edits the source first (mkdata's edits, in turn), then syncs it twice: once
//! without faults into a control destination (its wire bytes and duration are the yardstick;
//! the kill moment is drawn from that duration), once with the kill into the faulty
//! destination. Both destinations held the same content before the trial, so the faulty
//! run's extra wire bytes are what the kill cost.

use crate::procs::{Daemon, Finished, Relay, SyncRun, TOKEN};
use crate::FaultError;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// What one sync may take before it counts as hung.
const RUN_LIMIT: Duration = Duration::from_secs(180);
/// Reruns after a kill before the trial counts as failed.
const MAX_RERUNS: usize = 5;

/// Which process dies, or what happens to the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Target {
    /// Push; the client is the sender.
    PushSender,
    /// Push; the daemon is the receiver (and is started again at once, as a service
    /// manager would).
    PushReceiver,
    /// Pull; the client is the receiver.
    PullReceiver,
    /// Pull; the daemon is the sender.
    PullSender,
    /// Push through a relay that resets every connection after a random amount of data.
    PushReset,
    /// Pull through such a relay.
    PullReset,
    /// Push; the relay freezes (no data, no FIN) for longer than the idle timeout.
    PushStall,
    /// Pull; the relay freezes.
    PullStall,
}

impl Target {
    /// SIGKILL of one side.
    pub const KILLS: [Target; 4] = [
        Target::PushSender,
        Target::PushReceiver,
        Target::PullReceiver,
        Target::PullSender,
    ];
    /// Network faults the run itself must ride out by reconnecting.
    pub const NETWORK: [Target; 4] = [
        Target::PushReset,
        Target::PullReset,
        Target::PushStall,
        Target::PullStall,
    ];

    fn push(self) -> bool {
        matches!(
            self,
            Target::PushSender | Target::PushReceiver | Target::PushReset | Target::PushStall
        )
    }

    fn kills_daemon(self) -> bool {
        matches!(self, Target::PushReceiver | Target::PullSender)
    }

    fn network(self) -> bool {
        Target::NETWORK.contains(&self)
    }
}

/// The idle timeout (and connect patience) of runs under network faults: a stall is noticed
/// after this long.
pub const STALL_TIMEOUT_SECS: u64 = 3;
/// How long a stall lasts: past the client's idle timeout, so the session breaks, and past
/// the first reconnect's patience, so that one fails too and backoff is exercised.
const STALL: Duration = Duration::from_secs(STALL_TIMEOUT_SECS * 2 + 1);
/// The least mean amount a reset relay lets through a connection: its smallest cut (half of
/// it) must pass a whole 1 MiB frame, or no session could ever make progress.
const RESET_MIN_MB: f64 = 3.0;
/// A reset relay cuts each connection after about this share of the control run's bytes
/// per connection, so a pass takes a few sessions.
const RESET_SHARE: f64 = 1.0 / 3.0;

/// Source edits between trials (mkdata `edit` modes), in turn.
const EDITS: [&[&str]; 5] = [
    &["--mode", "files", "--pct", "10"],
    &["--mode", "blocks", "--pct", "2"],
    &["--mode", "append", "--kb", "256"],
    &["--mode", "insert", "--count", "20"],
    &["--mode", "touch", "--pct", "5"],
];

pub struct Options {
    /// The `cutover` binary under test.
    pub cutover: PathBuf,
    /// Directory holding mkdata.py and wanem.py.
    pub shared: PathBuf,
    /// Scratch directory (emptied first).
    pub work: PathBuf,
    /// Trials (one fault each).
    pub kills: usize,
    /// The faults drawn from, one per trial.
    pub targets: Vec<Target>,
    pub seed: u64,
    /// mkdata `mixed --scale`.
    pub scale: f64,
    /// One large file of this many MiB joins the tree, so block edits and resumes of a big
    /// file are exercised (mixed at small scales has none).
    pub big_mb: u64,
    pub connections: usize,
}

/// One trial's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Trial {
    pub target: Target,
    pub edit: String,
    /// Milliseconds after the start that the kill was aimed at.
    pub kill_at_ms: u64,
    /// The sync had already finished when the kill came (for resets: no connection was
    /// reset).
    pub missed: bool,
    /// Runs after the killed one until success.
    pub reruns: usize,
    /// Sessions the runs opened again by themselves after one broke.
    pub reconnects: u64,
    pub control_wire: u64,
    pub faulty_wire: u64,
    pub verified: bool,
    pub failure: Option<String>,
}

impl Trial {
    pub fn extra_wire(&self) -> i64 {
        self.faulty_wire as i64 - self.control_wire as i64
    }

    /// Interruptions the faulty run suffered: each may lose what was in flight.
    fn interruptions(&self) -> u64 {
        (self.reruns as u64 + self.reconnects).max(1)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub seed: u64,
    pub source_bytes: u64,
    pub source_files: u64,
    pub trials: Vec<Trial>,
    /// The bound every trial's extra wire bytes must stay within.
    pub extra_bound: u64,
}

impl Report {
    pub fn failures(&self) -> Vec<String> {
        self.trials
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let bound = self.extra_bound * t.interruptions();
                let why = t.failure.clone().or_else(|| {
                    (t.extra_wire() > bound as i64).then(|| {
                        format!(
                            "sent {} bytes more than the control run (bound {bound} for {} interruptions)",
                            t.extra_wire(),
                            t.interruptions()
                        )
                    })
                })?;
                Some(format!(
                    "trial {i} ({:?}, {}, kill at {} ms): {why}",
                    t.target, t.edit, t.kill_at_ms
                ))
            })
            .collect()
    }

    /// Kills that landed while the sync ran, by target.
    pub fn landed(&self) -> BTreeMap<Target, usize> {
        let mut m = BTreeMap::new();
        for t in self.trials.iter().filter(|t| !t.missed) {
            *m.entry(t.target).or_default() += 1;
        }
        m
    }

    /// One line per fact, for people.
    pub fn summary(&self) -> String {
        let landed: usize = self.landed().values().sum();
        let extras: Vec<i64> = self.trials.iter().map(Trial::extra_wire).collect();
        let control: u64 = self.trials.iter().map(|t| t.control_wire).sum();
        let faulty: u64 = self.trials.iter().map(|t| t.faulty_wire).sum();
        let reruns: usize = self.trials.iter().map(|t| t.reruns).sum();
        let reconnects: u64 = self.trials.iter().map(|t| t.reconnects).sum();
        format!(
            "seed {}: {} trials on {} files / {:.1} MB, {} faults landed ({:?}), {} reruns, {} reconnects; verified {}/{}; wire {:.1} MB with faults vs {:.1} MB without; extra per trial: max {:.2} MB, mean {:.2} MB (bound {:.0} MB per interruption); failures: {}",
            self.seed,
            self.trials.len(),
            self.source_files,
            self.source_bytes as f64 / 1e6,
            landed,
            self.landed(),
            reruns,
            reconnects,
            self.trials.iter().filter(|t| t.verified).count(),
            self.trials.len(),
            faulty as f64 / 1e6,
            control as f64 / 1e6,
            extras.iter().copied().max().unwrap_or(0) as f64 / 1e6,
            extras.iter().sum::<i64>() as f64 / extras.len().max(1) as f64 / 1e6,
            self.extra_bound as f64 / 1e6,
            self.failures().len()
        )
    }
}

/// The extra wire bytes one kill may cost: what was in flight is lost. Per data connection
/// that is the 1 MiB frame being written, what the relay holds, and what waits unread in the
/// receiver's socket buffer (loopback autotunes it to a few MiB), all discarded when the
/// session ends; plus the control connection's share. So (connections + 1) × 4 MiB; measured
/// (BENCH.md, Reliability): at most 12.8 MB in 200 kills at -j 4, 0.14 MB on average.
pub fn extra_bound(connections: usize) -> u64 {
    (connections as u64 + 1) * (4 << 20)
}

struct Layout {
    src: PathBuf,
    module: PathBuf,
    /// Where pull destinations go (outside the module).
    pulled: PathBuf,
    logs: PathBuf,
}

impl Layout {
    /// (control, faulty) destinations of a direction, as sync arguments.
    fn dests(&self, push: bool, daemon_url: &str) -> (String, String) {
        if push {
            (
                format!("{daemon_url}/m/push-control/"),
                format!("{daemon_url}/m/push-faulty/"),
            )
        } else {
            let d = |n: &str| format!("{}/", self.pulled.join(n).display());
            (d("pull-control"), d("pull-faulty"))
        }
    }

    /// The local path of a destination argument (for the oracle).
    fn local(&self, dest: &str) -> PathBuf {
        match dest.split_once("/m/") {
            Some((url, rel)) if url.starts_with("cutover://") => self.module.join(rel),
            _ => PathBuf::from(dest),
        }
    }
}

fn run_cmd(cmd: &mut Command, what: &str) -> Result<String, FaultError> {
    let out = cmd.output().map_err(FaultError::io(what.to_string()))?;
    if !out.status.success() {
        return Err(FaultError::Setup(format!(
            "{what}: {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// rsync's view of what differs (empty when the trees are equal in content and metadata).
fn oracle(src: &Path, dst: &Path) -> Result<String, FaultError> {
    run_cmd(
        Command::new("rsync")
            .args(["-anHAX", "--delete", "--checksum", "--itemize-changes"])
            .arg(format!("{}/", src.display()))
            .arg(format!("{}/", dst.display())),
        "rsync oracle",
    )
}

fn tree_size(dir: &Path) -> (u64, u64) {
    let mut files = 0;
    let mut bytes = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => {
                    files += 1;
                    bytes += m.len();
                }
                Err(_) => {}
            }
        }
    }
    (files, bytes)
}

/// Run the whole driver; `progress` gets one line per trial.
pub fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Report, FaultError> {
    let work = &opts.work;
    let _ = std::fs::remove_dir_all(work);
    let layout = Layout {
        module: work.join("module"),
        src: work.join("module").join("src"),
        pulled: work.to_path_buf(),
        logs: work.join("logs"),
    };
    for d in [&layout.module, &layout.logs] {
        std::fs::create_dir_all(d).map_err(FaultError::io(d.display().to_string()))?;
    }
    let mkdata = opts.shared.join("mkdata.py");
    let seed = opts.seed.to_string();
    run_cmd(
        Command::new("python3")
            .arg(&mkdata)
            .args(["mixed"])
            .arg(&layout.src)
            .args(["--scale", &opts.scale.to_string(), "--seed", &seed]),
        "mkdata mixed",
    )?;
    if opts.big_mb > 0 {
        run_cmd(
            Command::new("python3")
                .arg(&mkdata)
                .arg("big")
                .arg(layout.src.join("large"))
                .args([
                    "--count",
                    "1",
                    "--mb",
                    &opts.big_mb.to_string(),
                    "--seed",
                    &seed,
                ]),
            "mkdata big",
        )?;
    }
    let (source_files, source_bytes) = tree_size(&layout.src);
    let mut daemon = Daemon::start(&opts.cutover, &work.join("daemon"), &layout.module)?;
    let known_hosts = work.join("known_hosts");
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut trials = Vec::new();
    for i in 0..opts.kills {
        let target = *opts
            .targets
            .get(rng.random_range(0..opts.targets.len().max(1)))
            .ok_or_else(|| FaultError::Setup("no fault kinds to draw from".into()))?;
        let edit = if i == 0 {
            &[][..]
        } else {
            EDITS[i % EDITS.len()]
        };
        if !edit.is_empty() {
            run_cmd(
                Command::new("python3")
                    .arg(&mkdata)
                    .arg("edit")
                    .arg(&layout.src)
                    .args(edit)
                    .args(["--seed", &(opts.seed + i as u64).to_string()]),
                "mkdata edit",
            )?;
        }
        let ctx = TrialCtx {
            opts,
            layout: &layout,
            known_hosts: &known_hosts,
            log_prefix: layout.logs.join(format!("t{i:03}")),
        };
        // Within the first 90% of the control run's time: a warm rerun can be faster.
        let fraction: f64 = rng.random_range(0.0..0.9);
        let edit = if edit.is_empty() {
            "initial copy".to_string()
        } else {
            edit.join(" ")
        };
        let trial = ctx.trial(&mut daemon, target, edit, fraction)?;
        progress(&format!(
            "trial {i}: {:?} at {} ms{}, {} reconnects, {} reruns, extra wire {:.2} MB, {}",
            trial.target,
            trial.kill_at_ms,
            if trial.missed {
                " (after it ended)"
            } else {
                ""
            },
            trial.reconnects,
            trial.reruns,
            trial.extra_wire() as f64 / 1e6,
            match &trial.failure {
                None => "verified".to_string(),
                Some(f) => format!("FAILED: {f}"),
            }
        ));
        trials.push(trial);
    }
    Ok(Report {
        seed: opts.seed,
        source_bytes,
        source_files,
        trials,
        extra_bound: extra_bound(opts.connections),
    })
}

struct TrialCtx<'a> {
    opts: &'a Options,
    layout: &'a Layout,
    known_hosts: &'a Path,
    log_prefix: PathBuf,
}

impl TrialCtx<'_> {
    fn sync_cmd(&self, relay: u16, target: Target, dest: &str) -> Command {
        let push = target.push();
        let url = format!("cutover://127.0.0.1:{relay}");
        let src = if push {
            format!("{}/", self.layout.src.display())
        } else {
            format!("{url}/m/src/")
        };
        let dest = dest.replace("cutover://RELAY", &url);
        let mut cmd = Command::new(&self.opts.cutover);
        cmd.env("CUTOVER_TOKEN", TOKEN)
            .env_remove("CUTOVER_LOG")
            .args(["sync", "--json", "-v", "--delete", "-H", "-X", "-j"])
            .arg(self.opts.connections.to_string())
            .arg("--known-hosts")
            .arg(self.known_hosts)
            .args(
                target
                    .network()
                    .then(|| format!("--timeout={STALL_TIMEOUT_SECS}")),
            )
            .arg(src)
            .arg(dest);
        cmd
    }

    fn log(&self, what: &str) -> PathBuf {
        let mut p = self.log_prefix.clone().into_os_string();
        p.push(format!("-{what}.err"));
        PathBuf::from(p)
    }

    fn trial(
        &self,
        daemon: &mut Daemon,
        target: Target,
        edit: String,
        fraction: f64,
    ) -> Result<Trial, FaultError> {
        let wanem = self.opts.shared.join("wanem.py");
        let push = target.push();
        let (control, faulty) = self.layout.dests(push, "cutover://RELAY");
        let mut trial = Trial {
            target,
            edit,
            kill_at_ms: 0,
            missed: false,
            reruns: 0,
            reconnects: 0,
            control_wire: 0,
            faulty_wire: 0,
            verified: false,
            failure: None,
        };
        let reset = matches!(target, Target::PushReset | Target::PullReset);
        if reset {
            // An edit moves too little for a relay that must pass whole frames to cut in the
            // middle of it: copy the whole tree afresh instead.
            for d in [&control, &faulty] {
                let dir = self.layout.local(d);
                if dir.exists() {
                    std::fs::remove_dir_all(&dir)
                        .map_err(FaultError::io(dir.display().to_string()))?;
                }
            }
        }
        // The yardstick: the same sync without a fault.
        let relay = Relay::start(&wanem, &self.layout.logs, daemon.port)?;
        let clean = SyncRun::spawn(
            self.sync_cmd(relay.port, target, &control),
            &self.log("control"),
        )?
        .wait(RUN_LIMIT)?;
        trial.control_wire = relay.finish()?;
        if !clean.ok() {
            trial.failure = Some(format!("the control run failed: {}", clean.stderr.trim()));
            return Ok(trial);
        }
        let at = Duration::from_secs_f64(clean.seconds * fraction);
        trial.kill_at_ms = at.as_millis() as u64;

        let reset_mb = reset.then(|| {
            let per_connection = trial.control_wire as f64 / (self.opts.connections + 1) as f64;
            (per_connection * RESET_SHARE / 1e6).max(RESET_MIN_MB)
        });
        let relay = Relay::start_with(&wanem, &self.layout.logs, daemon.port, reset_mb)?;
        let mut run = SyncRun::spawn(
            self.sync_cmd(relay.port, target, &faulty),
            &self.log("faulty"),
        )?;
        match target {
            Target::PushReset | Target::PullReset => {}
            _ if !run.running_at(at) => trial.missed = true,
            Target::PushStall | Target::PullStall => {
                relay.stall();
                std::thread::sleep(STALL);
                relay.resume();
            }
            // A service manager starts a killed daemon again; the client reconnects to it.
            _ if target.kills_daemon() => {
                daemon.kill9();
                daemon.restart()?;
            }
            _ => run.kill9(),
        }
        let first = match run.wait(RUN_LIMIT) {
            Ok(k) => k,
            Err(e) => {
                trial.failure = Some(format!("the faulty run: {e}"));
                let _ = relay.finish();
                return Ok(trial);
            }
        };
        trial.reconnects += first.reconnects;
        if reset_mb.is_some() {
            trial.missed = first.reconnects == 0;
        }
        // A killed client needs a rerun, and so does a run whose daemon died before the
        // session opened (a peer never reached is not retried); network faults the run must
        // ride out itself.
        let killed = !trial.missed && !target.network();
        if !killed && !first.ok() {
            let why = if trial.missed {
                "failed without a fault"
            } else {
                "did not ride out the fault"
            };
            trial.failure = Some(format!("{why}: {}", first.stderr.trim()));
            let _ = relay.finish();
            return Ok(trial);
        }
        // A kill that came after the end leaves a finished run; else rerun until success.
        let mut last: Option<Finished> = Some(first).filter(Finished::ok);
        while last.as_ref().is_none_or(|f| !f.ok()) && trial.reruns < MAX_RERUNS {
            // As a user would: a destination still locked by the killed run's session (the
            // daemon has not seen its client go yet) is tried again after a moment, longer
            // each time, not five times in the same instant.
            if last
                .as_ref()
                .is_some_and(|f| f.stderr.contains("another cutover sync is writing"))
            {
                std::thread::sleep(Duration::from_millis(500) * (trial.reruns as u32 + 1));
            }
            trial.reruns += 1;
            let log = self.log(&format!("rerun{}", trial.reruns));
            let rerun = SyncRun::spawn(self.sync_cmd(relay.port, target, &faulty), &log)?;
            match rerun.wait(RUN_LIMIT) {
                Ok(f) => {
                    trial.reconnects += f.reconnects;
                    last = Some(f)
                }
                Err(e) => {
                    trial.failure = Some(format!("rerun {}: {e}", trial.reruns));
                    break;
                }
            }
        }
        trial.faulty_wire = relay.finish()?;
        if let Some(status) = daemon.crashed() {
            trial.failure = Some(format!(
                "the daemon died on its own ({status}): {}",
                daemon.log_tail()
            ));
            daemon.restart()?;
            return Ok(trial);
        }
        if trial.failure.is_some() {
            return Ok(trial);
        }
        if let Some(f) = last.as_ref().filter(|f| !f.ok()) {
            trial.failure = Some(format!(
                "no success after {MAX_RERUNS} reruns: {}",
                f.stderr.trim()
            ));
            return Ok(trial);
        }
        for dest in [&control, &faulty] {
            let diff = oracle(&self.layout.src, &self.layout.local(dest))?;
            if !diff.is_empty() {
                trial.failure = Some(format!(
                    "{dest} differs from the source after success:\n{diff}"
                ));
                return Ok(trial);
            }
        }
        trial.verified = true;
        Ok(trial)
    }
}
