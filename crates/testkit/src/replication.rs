//! The replication kill driver (`cutover-faults --faults replication`): for each trial, a
//! fresh pair of real daemons replicating volume "db" (protocol C; `a` primary, dialling;
//! `b` secondary, waiting), qemu-io writing to the primary's export, and a SIGKILL of one
//! daemon at a seeded random moment of one phase: the initial sync, streaming (in step,
//! writes flowing), or a resync (after `disconnect`, writes, `connect`). The killed daemon
//! is started again at once, as a service manager would; the trial waits until the peer is
//! in step again and checks that both backings are identical.
//!
//! Each trial reports what the restart cost: the bytes the primary resynced on the first
//! link after the kill (its log's "N block(s) to resync"), next to what it knew to be out
//! of sync just before the kill and, for a killed primary, the span of its activity log
//! then (hot extents × 4 MiB): after a crash of the primary, the blocks its activity log
//! names are resynced whatever the bitmap on disk says.

use crate::procs::{free_port, Daemon};
use crate::FaultError;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a pair may take to be in step again.
const IN_STEP_LIMIT: Duration = Duration::from_secs(180);
/// The activity log's extents (the volume crate's `EXTENT_SIZE`).
const EXTENT: u64 = 4 << 20;
/// Extents the activity log brings in ahead of a sequential writer (the volume crate's
/// `READ_AHEAD`).
const AL_READ_AHEAD: u64 = 7;
/// How long the writer writes into the bitmap before a resync is started.
const APART: Duration = Duration::from_millis(800);
/// The bitmap is written on an NBD flush at most this often (the volume crate's
/// `DEFAULT_FLUSH_INTERVAL`, and a margin).
const BITMAP_PERSIST: Duration = Duration::from_millis(1100);
/// The streaming phase's window for the kill.
const STREAMING: Duration = Duration::from_secs(2);

pub struct Options {
    /// The `cutover` binary under test.
    pub cutover: PathBuf,
    /// Scratch directory (emptied first).
    pub work: PathBuf,
    pub trials: usize,
    pub seed: u64,
    /// The volume's size in MiB.
    pub volume_mb: u64,
    /// The writer writes in the first this many MiB (0: a quarter of the volume), so that
    /// the activity log spans less than the whole volume.
    pub write_mb: u64,
    /// Data connections of the link.
    pub connections: usize,
    /// The faults, one per trial in turn ([`ALL`] by default).
    pub faults: Vec<(Victim, Phase)>,
}

/// Every victim in every phase.
pub const ALL: [(Victim, Phase); 6] = [
    (Victim::Primary, Phase::InitialSync),
    (Victim::Secondary, Phase::InitialSync),
    (Victim::Primary, Phase::Streaming),
    (Victim::Secondary, Phase::Streaming),
    (Victim::Primary, Phase::Resync),
    (Victim::Secondary, Phase::Resync),
];

/// When the kill comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Phase {
    InitialSync,
    Streaming,
    Resync,
}

/// Which daemon dies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
pub enum Victim {
    Primary,
    Secondary,
}

/// One trial's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Trial {
    pub phase: Phase,
    pub victim: Victim,
    /// Milliseconds into the phase.
    pub kill_at_ms: u64,
    /// The phase was still on at the last look before the kill (for a resync: the
    /// secondary was inconsistent; streaming: connected and consistent).
    pub landed: bool,
    /// The primary's view at the last look before the kill: bytes out of sync, and its
    /// activity log's span.
    pub out_of_sync_before: u64,
    pub al_span_before: u64,
    /// Bytes the first resync after the kill carried (None: none seen), and whether it
    /// was a full one.
    pub resynced: Option<u64>,
    pub full: bool,
    /// Seconds from the kill until the peer was in step again.
    pub in_step_secs: f64,
    pub identical: bool,
    pub failure: Option<String>,
}

impl Trial {
    /// A killed primary resynced no more than it knew out of sync plus its activity
    /// log's span, both as sampled at the last look before the kill (at most 50 ms
    /// before it; a transaction in between can bring in more extents). None where that
    /// does not apply (a secondary killed, a full resync). Blocks a resync cleared in
    /// memory but not yet on disk (the bitmap is written on an NBD flush at most once a
    /// second, else every 5 s) are resynced again after a crash too: the streaming phase
    /// starts with the bitmap written.
    pub fn within_al(&self) -> Option<bool> {
        self.within(self.al_span_before)
    }

    /// A killed primary resynced no more than it knew out of sync plus `al` bytes.
    pub fn within(&self, al: u64) -> Option<bool> {
        let resynced = self.resynced?;
        (self.victim == Victim::Primary && !self.full)
            .then(|| resynced <= self.out_of_sync_before + al)
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub seed: u64,
    pub volume_bytes: u64,
    /// The initial sync of the calibration pair, which sets the kill windows.
    pub initial_sync_secs: f64,
    /// The most the activity log can span with the writer's range: its extents and the
    /// read-ahead of the volume crate's activity log (7 extents past a sequential write).
    pub al_ceiling: u64,
    pub trials: Vec<Trial>,
}

impl Report {
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, t) in self.trials.iter().enumerate() {
            if let Some(why) = &t.failure {
                out.push(format!(
                    "trial {i} ({:?} killed during {:?} at {} ms): {why}",
                    t.victim, t.phase, t.kill_at_ms
                ));
            }
        }
        out
    }

    /// One line per fact, for people.
    pub fn summary(&self) -> String {
        let landed = self.trials.iter().filter(|t| t.landed).count();
        let mb = |b: u64| b as f64 / (1 << 20) as f64;
        let mut lines = vec![format!(
            "seed {}: {} trials on a {:.0} MiB volume (initial sync {:.1} s), {landed} kills landed in their phase, identical {}/{}, failures {}",
            self.seed,
            self.trials.len(),
            mb(self.volume_bytes),
            self.initial_sync_secs,
            self.trials.iter().filter(|t| t.identical).count(),
            self.trials.len(),
            self.failures().len()
        )];
        for victim in [Victim::Primary, Victim::Secondary] {
            for phase in [Phase::InitialSync, Phase::Streaming, Phase::Resync] {
                let of: Vec<&Trial> = self
                    .trials
                    .iter()
                    .filter(|t| t.victim == victim && t.phase == phase)
                    .collect();
                if of.is_empty() {
                    continue;
                }
                let resynced: Vec<u64> = of.iter().filter_map(|t| t.resynced).collect();
                let full = of.iter().filter(|t| t.full).count();
                let over = of.iter().filter(|t| t.within_al() == Some(false)).count();
                let over_ceiling = of
                    .iter()
                    .filter(|t| t.within(self.al_ceiling) == Some(false))
                    .count();
                lines.push(format!(
                    "  {victim:?} killed during {phase:?}: {} trials, resynced after the restart: mean {:.1} MiB, max {:.1} MiB ({full} full); out of sync before: mean {:.1} MiB; AL span before: mean {:.1} MiB; over out-of-sync + sampled AL span: {over}, over out-of-sync + AL ceiling ({:.0} MiB): {over_ceiling}; in step after: mean {:.1} s",
                    of.len(),
                    mb(resynced.iter().sum::<u64>()) / resynced.len().max(1) as f64,
                    mb(resynced.iter().copied().max().unwrap_or(0)),
                    mb(of.iter().map(|t| t.out_of_sync_before).sum::<u64>()) / of.len() as f64,
                    mb(of.iter().map(|t| t.al_span_before).sum::<u64>()) / of.len() as f64,
                    mb(self.al_ceiling),
                    of.iter().map(|t| t.in_step_secs).sum::<f64>() / of.len() as f64,
                ));
            }
        }
        lines.join("\n")
    }
}

/// `cutover ARGS` to the end; its stdout, or why it failed.
fn cutover(bin: &Path, args: &[&str]) -> Result<String, FaultError> {
    let out = Command::new(bin)
        .args(args)
        .env_remove("CUTOVER_LOG")
        .output()
        .map_err(FaultError::io(format!("run {}", bin.display())))?;
    if !out.status.success() {
        return Err(FaultError::Setup(format!(
            "cutover {}: {}: {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One node of a pair: its files, its daemon.
struct Node {
    dir: PathBuf,
    config: PathBuf,
    image: PathBuf,
    port: u16,
    daemon: Option<Daemon>,
}

impl Node {
    /// The node's directory and a sparse image.
    fn new(root: &Path, name: &str, size: u64) -> Result<Node, FaultError> {
        let dir = root.join(name);
        let state = dir.join("state");
        std::fs::create_dir_all(&state).map_err(FaultError::io(state.display().to_string()))?;
        let image = dir.join("disk.img");
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(size))
            .map_err(FaultError::io(image.display().to_string()))?;
        Ok(Node {
            config: dir.join("serve.toml"),
            port: free_port()?,
            dir,
            image,
            daemon: None,
        })
    }

    fn config_text(&self, peer: &str, peer_fp: &str, peer_lines: &str) -> String {
        format!(
            "listen = \"127.0.0.1:{}\"\nstate_dir = {:?}\n[[volume]]\nname = \"db\"\nbacking = {:?}\n\
             [[volume.peer]]\nname = \"{peer}\"\nfingerprint = \"{peer_fp}\"\nprotocol = \"C\"\n{peer_lines}",
            self.port,
            self.dir.join("state"),
            self.image
        )
    }

    fn volume(&self, bin: &Path, args: &[&str]) -> Result<String, FaultError> {
        let config = self.config.display().to_string();
        let mut all = vec!["volume"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--config", &config]);
        cutover(bin, &all)
    }

    fn status(&self, bin: &Path) -> Result<Value, FaultError> {
        let out = self.volume(bin, &["status", "db", "--json"])?;
        let line = out.lines().find(|l| l.starts_with('{')).unwrap_or("{}");
        let v: Value = serde_json::from_str(line)
            .map_err(|e| FaultError::Setup(format!("status JSON: {e}: {line}")))?;
        Ok(v["volumes"][0].clone())
    }

    fn daemon(&mut self) -> Result<&mut Daemon, FaultError> {
        self.daemon
            .as_mut()
            .ok_or_else(|| FaultError::Setup("the daemon is not running".into()))
    }

    fn log(&self) -> String {
        self.daemon.as_ref().map(Daemon::log).unwrap_or_default()
    }

    /// The volume's NBD export.
    fn uri(&self) -> String {
        format!(
            "nbd+unix:///db?socket={}",
            self.dir.join("state").join("db.sock").display()
        )
    }
}

/// Two nodes replicating "db": `a` primary (dials `b`), `b` secondary; both daemons up.
struct Pair {
    bin: PathBuf,
    a: Node,
    b: Node,
}

impl Pair {
    fn start(bin: &Path, root: &Path, size: u64, connections: usize) -> Result<Pair, FaultError> {
        let mut a = Node::new(root, "a", size)?;
        let mut b = Node::new(root, "b", size)?;
        let identity = |n: &Node| -> Result<String, FaultError> {
            let pem = n.dir.join("state").join("identity.pem");
            let fp = cutover(bin, &["identity", "--file", &pem.display().to_string()])?;
            Ok(fp.trim().to_string())
        };
        let (fa, fb) = (identity(&a)?, identity(&b)?);
        let write = |n: &Node, text: String| {
            std::fs::write(&n.config, text).map_err(FaultError::io("write serve.toml"))
        };
        write(&b, b.config_text("a", &fa, ""))?;
        let dials = format!(
            "address = \"127.0.0.1:{}\"\nconnections = {connections}\n",
            b.port
        );
        write(&a, a.config_text("b", &fb, &dials))?;
        for n in [&mut b, &mut a] {
            n.volume(bin, &["create-md", "db"])?;
            n.daemon = Some(Daemon::with_config(bin, &n.dir, &n.config, n.port)?);
        }
        a.volume(bin, &["primary", "db", "--force"])?;
        Ok(Pair {
            bin: bin.to_path_buf(),
            a,
            b,
        })
    }

    /// The primary's peer entry and its whole status.
    fn peer(&self) -> Result<(Value, Value), FaultError> {
        let st = self.a.status(&self.bin)?;
        Ok((st["peers"][0].clone(), st))
    }

    /// Whether `b` is in step with `a` now.
    fn in_step(&self) -> Result<bool, FaultError> {
        let (peer, _) = self.peer()?;
        Ok(peer["connection"] == "connected"
            && peer["replication"] == "source"
            && peer["out_of_sync_bytes"] == 0
            && peer["peer_disk"] == "UpToDate"
            && self.b.status(&self.bin)?["disk"] == "UpToDate")
    }

    /// Have the primary write its bitmap as it is now (an NBD flush more than a second
    /// after the last one does), so that a crash does not resync again the blocks a resync
    /// cleared in memory only.
    fn persist_bitmap(&self) -> Result<(), FaultError> {
        std::thread::sleep(BITMAP_PERSIST);
        let out = Command::new("qemu-io")
            .args(["-f", "raw", &self.a.uri(), "-c", "flush"])
            .output()
            .map_err(FaultError::io("qemu-io (is it installed?)"))?;
        if !out.status.success() {
            return Err(FaultError::Setup(format!(
                "qemu-io flush: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }

    /// Wait until a resync into `b` has started (it is inconsistent).
    fn wait_resyncing(&self) -> Result<(), FaultError> {
        let start = Instant::now();
        while self.b.status(&self.bin)?["disk"] != "Inconsistent" {
            if start.elapsed() > Duration::from_secs(30) {
                return Err(FaultError::Setup(format!(
                    "no resync within 30 s of connect: {}",
                    self.peer()?.0
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Wait until `b` is in step with `a`; how long it took.
    fn wait_in_step(&self, limit: Duration) -> Result<Duration, FaultError> {
        let start = Instant::now();
        while !self.in_step()? {
            if start.elapsed() > limit {
                return Err(FaultError::Setup(format!(
                    "not in step after {} s: {}\n--- a:\n{}\n--- b:\n{}",
                    limit.as_secs(),
                    self.peer()?.0,
                    crate::procs::tail(&self.a.dir.join("serve.log"), 3000),
                    crate::procs::tail(&self.b.dir.join("serve.log"), 3000)
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(start.elapsed())
    }

    /// Both backings hold the same bytes.
    fn identical(&self) -> Result<bool, FaultError> {
        use std::io::Read;
        let open =
            |p: &Path| std::fs::File::open(p).map_err(FaultError::io(p.display().to_string()));
        let (mut fa, mut fb) = (open(&self.a.image)?, open(&self.b.image)?);
        let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
        loop {
            let na = fa.read(&mut ba).map_err(FaultError::io("read a's image"))?;
            fb.read_exact(&mut bb[..na])
                .map_err(FaultError::io("read b's image"))?;
            if ba[..na] != bb[..na] {
                return Ok(false);
            }
            if na == 0 {
                return Ok(true);
            }
        }
    }
}

/// qemu-io writing to the primary's export until stopped: four 1 MiB writes at seeded
/// random offsets below `span` and a flush per run; a failed run (the primary killed) ends
/// it.
struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    thread: JoinHandle<()>,
}

impl Writer {
    fn start(a: &Node, span: u64, seed: u64) -> Writer {
        let uri = a.uri();
        let stop = Arc::new(AtomicBool::new(false));
        let written = Arc::new(AtomicU64::new(0));
        let (flag, count) = (stop.clone(), written.clone());
        let thread = std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed);
            let mib = (span >> 20).max(1);
            while !flag.load(Ordering::Relaxed) {
                let mut c = Command::new("qemu-io");
                c.args(["-f", "raw", &uri]);
                for _ in 0..4 {
                    let at = rng.random_range(0..mib);
                    let pattern: u8 = rng.random();
                    c.arg("-c").arg(format!("write -P {pattern} {at}M 1M"));
                }
                c.args(["-c", "flush"]);
                match c.output() {
                    Ok(o) if o.status.success() => {
                        count.fetch_add(4 << 20, Ordering::Relaxed);
                    }
                    _ => return,
                }
            }
        });
        Writer {
            stop,
            written,
            thread,
        }
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stop it and wait for its last run; the bytes it wrote.
    fn finish(self) -> u64 {
        self.stop();
        let _ = self.thread.join();
        self.written.load(Ordering::Relaxed)
    }
}

/// The first "replicating as source: N block(s) to resync" in `log` after byte `from`:
/// (N, full).
fn first_resync(log: &str, from: usize) -> Option<(u64, bool)> {
    let line = log
        .get(from..)?
        .lines()
        .find(|l| l.contains("replicating as source:"))?;
    let n = line
        .split("replicating as source: ")
        .nth(1)?
        .split(' ')
        .next()?
        .parse()
        .ok()?;
    Some((n, line.contains("(full)")))
}

/// Run the whole driver; `progress` gets one line per trial.
pub fn run(opts: &Options, progress: &mut dyn FnMut(&str)) -> Result<Report, FaultError> {
    let work = &opts.work;
    let _ = std::fs::remove_dir_all(work);
    std::fs::create_dir_all(work).map_err(FaultError::io(work.display().to_string()))?;
    let size = opts.volume_mb << 20;
    // Calibration: how long an initial sync takes here sets the windows of the kills.
    let calibration = Pair::start(
        &opts.cutover,
        &work.join("calibration"),
        size,
        opts.connections,
    )?;
    let initial_sync = calibration.wait_in_step(IN_STEP_LIMIT)?;
    drop(calibration);
    let span = match opts.write_mb {
        0 => size / 4,
        mb => (mb << 20).min(size),
    };
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut trials = Vec::new();
    for i in 0..opts.trials {
        // The faults in turn; the moment is drawn.
        let (victim, phase) = *opts
            .faults
            .get(i % opts.faults.len().max(1))
            .ok_or_else(|| FaultError::Setup("no faults to draw from".into()))?;
        let fraction: f64 = rng.random_range(0.0..0.9);
        let dir = work.join(format!("t{i:03}"));
        let ctx = TrialCtx {
            opts,
            size,
            span,
            initial_sync,
            seed: opts.seed.wrapping_add(i as u64),
        };
        let trial = ctx.trial(&dir, phase, victim, fraction)?;
        progress(&format!(
            "trial {i}: {victim:?} killed during {phase:?} at {} ms{}: resynced {} after the restart (out of sync before {:.1} MiB, AL span {:.1} MiB), in step after {:.1} s, {}",
            trial.kill_at_ms,
            if trial.landed { "" } else { " (phase over)" },
            match trial.resynced {
                Some(b) => format!("{:.1} MiB{}", b as f64 / (1 << 20) as f64, if trial.full { " (full)" } else { "" }),
                None => "nothing seen".into(),
            },
            trial.out_of_sync_before as f64 / (1 << 20) as f64,
            trial.al_span_before as f64 / (1 << 20) as f64,
            trial.in_step_secs,
            match &trial.failure {
                None => "identical".to_string(),
                Some(f) => format!("FAILED: {f}"),
            }
        ));
        // The logs stay for a look; the images go, unless the trial failed.
        if trial.failure.is_none() {
            for n in ["a", "b"] {
                let _ = std::fs::remove_file(dir.join(n).join("disk.img"));
            }
        }
        trials.push(trial);
    }
    Ok(Report {
        seed: opts.seed,
        volume_bytes: size,
        initial_sync_secs: initial_sync.as_secs_f64(),
        al_ceiling: (span.div_ceil(EXTENT) + AL_READ_AHEAD).min(size.div_ceil(EXTENT)) * EXTENT,
        trials,
    })
}

struct TrialCtx<'a> {
    opts: &'a Options,
    size: u64,
    /// Where the writer writes: the first `span` bytes.
    span: u64,
    initial_sync: Duration,
    seed: u64,
}

impl TrialCtx<'_> {
    fn trial(
        &self,
        dir: &Path,
        phase: Phase,
        victim: Victim,
        fraction: f64,
    ) -> Result<Trial, FaultError> {
        let mut pair = Pair::start(&self.opts.cutover, dir, self.size, self.opts.connections)?;
        let mut trial = Trial {
            phase,
            victim,
            kill_at_ms: 0,
            landed: false,
            out_of_sync_before: 0,
            al_span_before: 0,
            resynced: None,
            full: false,
            in_step_secs: 0.0,
            identical: false,
            failure: None,
        };
        let window = match phase {
            Phase::InitialSync => self.initial_sync,
            Phase::Streaming => {
                pair.wait_in_step(IN_STEP_LIMIT)?;
                pair.persist_bitmap()?;
                STREAMING
            }
            Phase::Resync => {
                pair.wait_in_step(IN_STEP_LIMIT)?;
                pair.a.volume(&pair.bin, &["disconnect", "db"])?;
                let apart = Writer::start(&pair.a, self.span, self.seed ^ 1);
                std::thread::sleep(APART);
                apart.finish();
                let (peer, _) = pair.peer()?;
                pair.a.volume(&pair.bin, &["connect", "db"])?;
                pair.wait_resyncing()?;
                // The resync runs at about the initial sync's pace.
                let share =
                    peer["out_of_sync_bytes"].as_u64().unwrap_or(0) as f64 / self.size as f64;
                self.initial_sync.mul_f64(share.max(0.05))
            }
        };
        let writer = Writer::start(&pair.a, self.span, self.seed);
        let at = window.mul_f64(fraction);
        trial.kill_at_ms = at.as_millis() as u64;
        let before = self.look_until(&pair, at, phase)?;
        trial.landed = before.0;
        trial.out_of_sync_before = before.1;
        trial.al_span_before = before.2;
        writer.stop();
        let from = pair.a.log().len();
        let killed = match victim {
            Victim::Primary => &mut pair.a,
            Victim::Secondary => &mut pair.b,
        };
        let kill = Instant::now();
        killed.daemon()?.kill9();
        killed.daemon()?.restart()?;
        writer.finish();
        match self.settle(&pair, from, kill, &mut trial) {
            Ok(()) => {}
            Err(e) => trial.failure = Some(e.to_string()),
        }
        for (name, n) in [("a", &mut pair.a), ("b", &mut pair.b)] {
            let crashed = n.daemon()?.crashed();
            if let Some(status) = crashed {
                trial.failure = Some(format!("daemon {name} died on its own ({status})"));
            }
            if n.log().contains("panicked") {
                trial.failure = Some(format!(
                    "daemon {name} panicked: {}",
                    n.daemon()?.log_tail()
                ));
            }
        }
        Ok(trial)
    }

    /// Look at the primary until `at` has passed; the last look's (phase still on, bytes
    /// out of sync, activity log span).
    fn look_until(
        &self,
        pair: &Pair,
        at: Duration,
        phase: Phase,
    ) -> Result<(bool, u64, u64), FaultError> {
        let start = Instant::now();
        loop {
            let (peer, st) = pair.peer()?;
            // The secondary is inconsistent from the start of a resync into it until it
            // is in step (the primary's `peer_disk` also says so while written blocks
            // wait for the secondary's next flush).
            let resyncing = pair.b.status(&pair.bin)?["disk"] == "Inconsistent";
            let on = match phase {
                Phase::InitialSync | Phase::Resync => resyncing,
                Phase::Streaming => peer["connection"] == "connected" && !resyncing,
            };
            let hot = st["activity_log"]["hot_extents"].as_u64().unwrap_or(0);
            let look = (
                on,
                peer["out_of_sync_bytes"].as_u64().unwrap_or(0),
                hot * EXTENT,
            );
            let elapsed = start.elapsed();
            if elapsed >= at {
                return Ok(look);
            }
            std::thread::sleep((at - elapsed).min(Duration::from_millis(50)));
        }
    }

    /// After the restart: the first resync's size, in step again, identical backings.
    fn settle(
        &self,
        pair: &Pair,
        from: usize,
        kill: Instant,
        trial: &mut Trial,
    ) -> Result<(), FaultError> {
        pair.wait_in_step(IN_STEP_LIMIT)?;
        trial.in_step_secs = kill.elapsed().as_secs_f64();
        let block = pair.peer()?.1["block_size"].as_u64().unwrap_or(16384);
        if let Some((blocks, full)) = first_resync(&pair.a.log(), from) {
            trial.resynced = Some(blocks * block);
            trial.full = full;
        }
        trial.identical = pair.identical()?;
        if !trial.identical {
            return Err(FaultError::Setup("the backings differ once in step".into()));
        }
        Ok(())
    }
}
