//! `cutover sync`: builds the session for the endpoints given (in-memory for local-to-local,
//! TCP to a daemon otherwise), runs the engine's sender or receiver, and reports. Its
//! command line, and the [`SyncJob`] it becomes (as a plan task does), are in `sync/args.rs`.

use crate::endpoint::Endpoint;
use crate::exit;
use crate::output::Reporter;
use crate::print::errln;
use crate::rsync::RsyncArgs;
use crate::security::{check_plaintext_destination, client_trust, SecurityArgs};
use crate::volume_pass;
use engine::{
    ChangedBlocks, Destination, Event, Events, NoEvents, PathList, Session, Source, Stats, Summary,
};
use net::client::{open_session, ClientError, Connections, Delivered, Remote};
use net::remote_install::Installed;
use net::ssh::SshCommand;
use net::{memory_pair, RateLimiter};
use proto::WireCounter;
use proto::{FilterRule, NewSession, Role, SyncOptions, PROTOCOL_VERSION};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

mod args;
pub use args::*;

/// `--retry-for` unless given: long enough for a daemon restart or a routing flap, short
/// enough that an unattended run reports a dead peer the same hour.
pub const DEFAULT_RETRY_FOR: u64 = 300;
/// The first wait before a broken session is reopened; each further try doubles it.
const RETRY_FIRST_WAIT: Duration = Duration::from_secs(1);
/// The longest wait between two tries.
const RETRY_MAX_WAIT: Duration = Duration::from_secs(30);

/// Data connections of a local (in-process) sync in auto mode: enough to overlap reads and
/// writes on two cores, more only adds task switches.
const LOCAL_AUTO: usize = 4;

pub async fn run(args: SyncArgs) -> u8 {
    let reporter = Arc::new(
        Reporter::new(
            args.json,
            args.verbose || args.rsync.itemize() || args.dry_run,
            args.quiet,
        )
        .dry_run(args.dry_run),
    );
    let job = args.job();
    let stats = Arc::new(Stats::default());
    let started = Instant::now();
    let progress = reporter.start_progress(stats.clone());
    let work = run_job(&job, reporter.clone(), stats.clone());
    let outcome = tokio::select! {
        r = work => r,
        _ = tokio::signal::ctrl_c() => {
            progress.finish();
            errln!("cutover: interrupted; partial files are kept, run the same command again to resume");
            return exit::INTERRUPTED;
        }
    };
    progress.finish();
    match outcome {
        Ok((summary, wire)) => reporter.summary(&summary, wire, started.elapsed()),
        Err(message) => reporter.fatal(&message),
    }
}

/// Run one sync to the end: the single code path of `cutover sync` and of plan tasks.
/// Returns the engine's summary and the bytes on the wire (0 for local-to-local); an `Err`
/// is a one-line reason the pass could not run or ended early.
pub async fn run_job(
    job: &SyncJob,
    events: Arc<dyn Events>,
    stats: Arc<Stats>,
) -> Result<(Summary, u64), String> {
    if volume_pass::name_of(&job.src).is_some() {
        return volume_pass::run(job, events, stats).await;
    }
    run_resolved(job, events, stats).await
}

/// A job whose source is a local path or a remote endpoint (a `volume:NAME` source is
/// resolved to its backing by `volume_pass` first).
pub(crate) async fn run_resolved(
    job: &SyncJob,
    events: Arc<dyn Events>,
    stats: Arc<Stats>,
) -> Result<(Summary, u64), String> {
    let src = Endpoint::parse(&job.src).map_err(|e| format!("source {e}"))?;
    let dst = Endpoint::parse(&job.dst).map_err(|e| format!("destination {e}"))?;
    if job.options.max_delete.is_some() && !job.options.delete {
        return Err("--max-delete only makes sense with --delete".into());
    }
    if job.options.files_from_strict && job.files_from.is_none() {
        return Err("--files-from-strict only makes sense with --files-from".into());
    }
    if let (Some(_), Endpoint::Local { path, .. }) = (&job.files_from, &src) {
        if path.exists() && !path.is_dir() {
            return Err(format!(
                "{}: --files-from needs a directory as the source (the list's paths are relative to it)",
                path.display()
            ));
        }
    }
    // Read (and sort) the list once, before any connection: a bad line fails at once, and
    // every retried session streams the same list, standard input included.
    let paths = match &job.files_from {
        Some(FilesFrom { list, from0 }) => {
            let (list, from0) = (list.clone(), *from0);
            let read = tokio::task::spawn_blocking(move || PathList::read(&list, from0)).await;
            match read {
                Ok(Ok(l)) => Some(Arc::new(l)),
                Ok(Err(e)) => return Err(e.to_string()),
                Err(e) => return Err(format!("--files-from: {e}")),
            }
        }
        None => None,
    };
    let opts = SyncOptions {
        owners: rustix::process::geteuid().is_root(),
        // With a list, paths are relative to SRC whether it ends with a slash or not (rsync).
        copy_dir_itself: !src.trailing_slash() && paths.is_none(),
        files_from: paths.is_some(),
        changed_blocks: job.changed.is_some(),
        ..job.options.clone()
    };
    let limiter = match opts.bwlimit {
        Some(rate) => match RateLimiter::new(rate) {
            Some(l) => Some(Arc::new(l)),
            None => return Err("--bwlimit: rate out of range".into()),
        },
        None => None,
    };
    let remote = !matches!(
        (&src, &dst),
        (Endpoint::Local { .. }, Endpoint::Local { .. })
    );
    let retry_for = Duration::from_secs(if remote { job.retry_for } else { 0 });
    let mut retry = Retry::new(retry_for);
    let mut wire_before = 0;
    let mut ever_reached = false;
    loop {
        let outcome = sync(
            &src,
            &dst,
            &opts,
            job,
            paths.clone(),
            limiter.clone(),
            events.clone(),
            &stats,
        )
        .await;
        let failure = match outcome {
            // After a reconnect, a destination still locked is most likely held by the
            // broken session, which the peer has not noticed is gone yet.
            Ok((summary, wire)) if retry.attempts > 0 && summary_is_busy(&summary) => Failure {
                message: format!(
                    "the destination is still locked ({})",
                    engine::BUSY_DESTINATION
                ),
                transport: true,
                reached: true,
                wire,
            },
            Ok((mut summary, wire)) => {
                summary.reconnects = retry.attempts;
                return Ok((summary, wire_before + wire));
            }
            Err(f) => f,
        };
        wire_before += failure.wire;
        ever_reached |= failure.reached;
        // A peer that was never reached is a wrong address or a daemon that is not running,
        // better said at once than after minutes. One that answered and then broke or stalled
        // (even in the middle of the first handshake) is tried again.
        if !failure.transport || retry_for.is_zero() || !ever_reached {
            return Err(failure.message);
        }
        let made_progress = progress_mark(&stats) > 0;
        let Some(wait) = retry.next(made_progress) else {
            return Err(format!(
                "{}; gave up after {} tries and {} s without progress (--retry-for {})",
                failure.message,
                retry.attempts + 1,
                retry.since_progress().as_secs(),
                retry_for.as_secs()
            ));
        };
        events.event(Event::Retry {
            attempt: retry.attempts,
            wait,
            reason: failure.message,
        });
        tokio::time::sleep(wait).await;
        stats.reset();
    }
}

/// Whether a pass was refused by the destination lock (every entry then fails with it).
fn summary_is_busy(summary: &Summary) -> bool {
    summary
        .errors
        .iter()
        .any(|e| e.contains(engine::BUSY_DESTINATION))
}

/// Work a session got done, however it ended: a session that broke after moving data
/// resets the retry clock.
fn progress_mark(stats: &Stats) -> u64 {
    Stats::get(&stats.literal_bytes)
        + Stats::get(&stats.copied_bytes)
        + Stats::get(&stats.files_done)
        + Stats::get(&stats.peer_received)
}

/// Exponential backoff between tries, bounded by the time since the last progress.
struct Retry {
    budget: Duration,
    attempts: u32,
    wait: Duration,
    last_progress: Instant,
}

impl Retry {
    fn new(budget: Duration) -> Self {
        Retry {
            budget,
            attempts: 0,
            wait: RETRY_FIRST_WAIT,
            last_progress: Instant::now(),
        }
    }

    fn since_progress(&self) -> Duration {
        self.last_progress.elapsed()
    }

    /// The wait before the next try, or None when the budget is spent. A session that made
    /// progress starts the backoff and the budget afresh.
    fn next(&mut self, made_progress: bool) -> Option<Duration> {
        if made_progress {
            self.wait = RETRY_FIRST_WAIT;
            self.last_progress = Instant::now();
        }
        let left = self.budget.checked_sub(self.since_progress())?;
        if left.is_zero() {
            return None;
        }
        let wait = self.wait.min(left);
        self.wait = (self.wait * 2).min(RETRY_MAX_WAIT);
        self.attempts += 1;
        Some(wait)
    }
}

/// Why a session could not run or ended early.
struct Failure {
    /// One line for the user.
    message: String,
    /// A broken or stalled connection, or a peer that went away: opening the session
    /// again may succeed, and it resumes from the partial files.
    transport: bool,
    /// The peer was reached (a connection was made) before it failed: a refused or
    /// unroutable first connection is a wrong address, not a break.
    reached: bool,
    /// Bytes this session put on the wire before it failed.
    wire: u64,
}

impl Failure {
    fn fatal(message: impl Into<String>) -> Self {
        Failure {
            message: message.into(),
            transport: false,
            reached: false,
            wire: 0,
        }
    }

    fn engine(e: engine::EngineError, wire: &WireCounter) -> Self {
        Failure {
            transport: e.is_transport(),
            message: e.to_string(),
            reached: true,
            wire: wire.total(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn sync(
    src: &Endpoint,
    dst: &Endpoint,
    opts: &SyncOptions,
    args: &SyncJob,
    paths: Option<Arc<PathList>>,
    limiter: Option<Arc<RateLimiter>>,
    reporter: Arc<dyn Events>,
    stats: &Arc<Stats>,
) -> Result<(Summary, u64), Failure> {
    let opts = opts.clone();
    let stats = stats.clone();
    match (src, dst) {
        (
            Endpoint::Local { path: s, .. },
            Endpoint::Local {
                path: d,
                trailing_slash,
            },
        ) => {
            if !s.exists() && std::fs::symlink_metadata(s).is_err() {
                return Err(Failure::fatal(format!(
                    "{}: source does not exist",
                    s.display()
                )));
            }
            let n = match args.connections {
                Connections::Fixed(n) => n,
                Connections::Auto => LOCAL_AUTO,
            };
            let (client_ctrl, server_ctrl) = memory_pair();
            let (ctx, crx) = mpsc::channel(n);
            let (stx, srx) = mpsc::channel(n);
            for _ in 0..n {
                let (a, b) = memory_pair();
                let _ = ctx.send(a).await;
                let _ = stx.send(b).await;
            }
            drop((ctx, stx));
            let receiver = engine::run_receiver(
                Session {
                    control: server_ctrl,
                    data: srx,
                    limiter: None,
                    idle_timeout: None,
                    public_name: None,
                },
                Destination::local(d.clone(), *trailing_slash),
                opts.clone(),
                Arc::new(NoEvents),
                Arc::new(Stats::default()),
            );
            let sender = engine::run_sender(
                Session {
                    control: client_ctrl,
                    data: crx,
                    limiter,
                    idle_timeout: None,
                    public_name: None,
                },
                Source {
                    paths,
                    changed: args.changed.clone(),
                    ..Source::local(s.clone())
                },
                opts,
                reporter,
                stats,
            );
            let (r, s) = tokio::join!(receiver, sender);
            // The receiver's own error says more than the sender's "peer failed", unless the
            // receiver's is only the sender's, passed on.
            match (s, r) {
                (Ok(sum), Ok(_)) => Ok((sum, 0)),
                (Err(e), Err(engine::EngineError::Peer(_))) => Err(Failure::fatal(e.to_string())),
                (_, Err(e)) => Err(Failure::fatal(e.to_string())),
                (Err(e), _) => Err(Failure::fatal(e.to_string())),
            }
        }
        (Endpoint::Local { path: s, .. }, remote) => {
            if std::fs::symlink_metadata(s).is_err() {
                return Err(Failure::fatal(format!(
                    "{}: source does not exist",
                    s.display()
                )));
            }
            let st = stats.clone();
            let delivered: Delivered = Arc::new(move || Stats::get(&st.peer_received));
            let (session, wire) =
                remote_session(remote, Role::Receiver, &opts, args, delivered, limiter).await?;
            let source = Source {
                paths,
                changed: args.changed.clone(),
                ..Source::local(s.clone())
            };
            let summary = engine::run_sender(session, source, opts, reporter, stats)
                .await
                .map_err(|e| Failure::engine(e, &wire))?;
            Ok((summary, wire.total()))
        }
        (
            remote,
            Endpoint::Local {
                path: d,
                trailing_slash,
            },
        ) => {
            // In a pull this side receives, so its own count is what was delivered.
            let st = stats.clone();
            let delivered: Delivered = Arc::new(move || Stats::get(&st.literal_bytes));
            let (session, wire) =
                remote_session(remote, Role::Sender, &opts, args, delivered, limiter).await?;
            let summary = engine::run_receiver(
                session,
                Destination {
                    paths,
                    ..Destination::local(d.clone(), *trailing_slash)
                },
                opts,
                reporter,
                stats,
            )
            .await
            .map_err(|e| Failure::engine(e, &wire))?;
            Ok((summary, wire.total()))
        }
        _ => Err(Failure::fatal(
            "both SRC and DST are remote; one side must be a local path",
        )),
    }
}

fn new_session(module: String, path: String, server_role: Role, opts: &SyncOptions) -> NewSession {
    NewSession {
        version: PROTOCOL_VERSION,
        module,
        path,
        server_role,
        options: opts.clone(),
        token_proof: None,
    }
}

/// Open a session on a daemon or over ssh: control plus data connections (growing in auto
/// mode). The remote side plays `server_role`.
async fn remote_session(
    remote: &Endpoint,
    server_role: Role,
    opts: &SyncOptions,
    args: &SyncJob,
    delivered: Delivered,
    limiter: Option<Arc<RateLimiter>>,
) -> Result<(Session, Arc<WireCounter>), Failure> {
    let patience = (args.timeout > 0).then(|| Duration::from_secs(args.timeout));
    let unopened = |e: ClientError, message: String| Failure {
        transport: e.is_transport(),
        reached: !matches!(e, ClientError::Connect { .. }),
        message,
        wire: 0,
    };
    let dialed = match remote {
        Endpoint::Daemon { addr, module, path } => {
            let new = new_session(module.clone(), path.clone(), server_role, opts);
            if args.security.insecure_plaintext {
                check_plaintext_destination(addr)
                    .await
                    .map_err(Failure::fatal)?;
            }
            let trust = client_trust(&args.security, addr).map_err(Failure::fatal)?;
            let remote = Remote::Daemon {
                addr,
                security: &trust.security,
            };
            let dialed =
                match open_session(remote, new, args.connections, delivered, patience).await {
                    Ok(d) => d,
                    Err(e) => {
                        let message = trust.explain(&e);
                        return Err(unopened(e, message));
                    }
                };
            trust
                .remember(addr, dialed.server_fingerprint)
                .map_err(Failure::fatal)?;
            dialed
        }
        Endpoint::Ssh { dest, path } => {
            let new = new_session(String::new(), path.clone(), server_role, opts);
            let mut command =
                SshCommand::new(&args.rsh, &args.remote_cutover).map_err(Failure::fatal)?;
            command.install = args.remote_install;
            let remote = Remote::Ssh {
                dest,
                command: &command,
            };
            match open_session(remote, new, args.connections, delivered, patience).await {
                Ok(d) => {
                    if let Some(Installed {
                        path,
                        uploaded: Some(bytes),
                    }) = &d.installed
                    {
                        let mb = (bytes + 500_000) / 1_000_000;
                        eprintln!(
                            "cutover: installed this cutover on {dest} at {path} ({} MB, once)",
                            mb.max(1)
                        );
                    }
                    d
                }
                Err(e) => {
                    let message = e.to_string();
                    return Err(unopened(e, message));
                }
            }
        }
        Endpoint::Local { .. } => {
            return Err(Failure::fatal("internal: a local endpoint is not remote"))
        }
    };
    let session = Session {
        control: dialed.control,
        data: dialed.data,
        limiter,
        idle_timeout: patience,
        public_name: None,
    };
    Ok((session, dialed.wire))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The plan runner's way in: a `SyncJob` built without any command line, its list in a
    /// file (a command's output), run by `run_job`.
    #[tokio::test(flavor = "multi_thread")]
    async fn run_job_honours_files_from_without_any_command_line() {
        let t = tempfile::tempdir().unwrap();
        let src = t.path().join("src");
        for f in ["keep/a", "keep/deep/b", "skip/c", "top"] {
            std::fs::create_dir_all(src.join(f).parent().unwrap()).unwrap();
            std::fs::write(src.join(f), f).unwrap();
        }
        let list = t.path().join("changed.txt");
        std::fs::write(&list, "top\nkeep\nnot/there\n").unwrap();
        let dst = t.path().join("dst");
        let job = SyncJob {
            src: format!("{}/", src.display()),
            dst: dst.display().to_string(),
            connections: Connections::Fixed(2),
            options: SyncOptions::default(),
            timeout: 120,
            retry_for: 0,
            security: SecurityArgs::default(),
            rsh: "ssh".into(),
            remote_cutover: DEFAULT_REMOTE_CUTOVER.into(),
            remote_install: false,
            files_from: Some(FilesFrom { list, from0: false }),
            changed: None,
            volume_config: None,
        };
        let (summary, _) = run_job(&job, Arc::new(NoEvents), Arc::new(Stats::default()))
            .await
            .unwrap();
        assert_eq!(summary.files_sent, 3);
        assert_eq!(summary.files_from_missing, 1);
        // The root, keep, keep/a, keep/deep, keep/deep/b, top.
        assert_eq!(summary.entries_scanned, 6);
        assert!(dst.join("keep/deep/b").is_file() && dst.join("top").is_file());
        assert!(!dst.join("skip").exists());
    }

    #[test]
    fn retry_waits_double_up_to_the_cap_and_restart_after_progress() {
        let mut r = Retry::new(Duration::from_secs(3600));
        let waits: Vec<u64> = (0..7)
            .map(|_| r.next(false).expect("within budget").as_secs())
            .collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(r.attempts, 7);
        assert_eq!(r.next(true), Some(RETRY_FIRST_WAIT));
    }

    #[test]
    fn retry_gives_up_once_the_budget_passes_without_progress() {
        let mut r = Retry::new(Duration::from_millis(30));
        assert!(r
            .next(false)
            .is_some_and(|w| w <= Duration::from_millis(30)));
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(r.next(false), None);
        // Progress starts the budget again.
        assert!(r.next(true).is_some());
    }
}
