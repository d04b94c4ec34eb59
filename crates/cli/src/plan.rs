//! `cutover plan check|dry-run|presync|cutover|status|rerun`: the arguments, the [`TaskRunner`] that
//! turns a plan task into a [`SyncJob`] and runs it through `sync::run_job` (the code path
//! of `cutover sync`), Ctrl-C/SIGTERM handling, and what the user reads (status table,
//! `--json`) with the exit codes that go with it.

use crate::endpoint::Endpoint;
use crate::exit;
use crate::names;
use crate::print::{errln, outln};
use crate::security::SecurityArgs;
use crate::sync::{parse_rate, run_job, FilesFrom, SyncJob};
use ::plan::run::{human_bytes, PresyncReport, Status, Verdict};
use ::plan::{
    BoxFuture, Echo, KeyError, Kind, Mismatch, PassContext, PassStats, Plan, SourceSide, TaskLog,
    TaskRunner, TaskSpec,
};
use engine::{Action, Event, Events, Stats};
use net::client::Connections;
use proto::{FilterRule, SyncOptions};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// `presync --until-under` did not reach its window within `--max-passes`.
pub const NOT_READY: u8 = 6;

#[derive(clap::Subcommand, Debug)]
pub enum PlanCommand {
    /// Validate a plan file (keys, names, dependencies, endpoints); changes nothing.
    Check { plan: PathBuf },
    /// Show what every task would change, in dependency order; changes nothing.
    DryRun { plan: PathBuf },
    /// Run passes of every task while the service is live and predict the final pass.
    Presync {
        plan: PathBuf,
        /// Repeat passes until the final pass is predicted to take less than this (e.g. 10m);
        /// default: the plan's target_downtime, if any.
        #[arg(long, value_name = "DURATION", value_parser = ::plan::parse_duration)]
        until_under: Option<Duration>,
        /// At most N passes (default: 10 with a window, else 1).
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        max_passes: Option<u32>,
    },
    /// Run the pre_final hooks, the final pass of every task and the post_final hooks;
    /// report the downtime against the prediction.
    Cutover {
        plan: PathBuf,
        /// Run even though the plan changed since the last run (presync).
        #[arg(long)]
        force: bool,
    },
    /// Show each task's phase, progress, last success and last error (works during a run).
    Status {
        plan: PathBuf,
        /// One JSON object on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Run again only the tasks whose last pass failed, was blocked or was interrupted.
    Rerun {
        /// Re-run the failed tasks (the only mode there is; required so the command says it).
        #[arg(long, required = true)]
        failed: bool,
        /// Run even though the plan changed since the last run.
        #[arg(long)]
        force: bool,
        plan: PathBuf,
    },
}

pub async fn run(cmd: PlanCommand) -> u8 {
    let path = match &cmd {
        PlanCommand::Check { plan }
        | PlanCommand::DryRun { plan }
        | PlanCommand::Presync { plan, .. }
        | PlanCommand::Cutover { plan, .. }
        | PlanCommand::Status { plan, .. }
        | PlanCommand::Rerun { plan, .. } => plan.clone(),
    };
    let plan = match Plan::load(&path) {
        Ok(p) => p,
        Err(e) => return fail(&e),
    };
    let runner: Arc<dyn TaskRunner> = Arc::new(CliRunner);
    let echo: Echo = Arc::new(|line: &str| outln!("{line}"));
    match cmd {
        PlanCommand::Check { .. } => {
            if let Err(e) = ::plan::run::check(&plan, runner.as_ref()) {
                return fail(&e);
            }
            let missing = check_local_paths(&plan);
            if !missing.is_empty() {
                for e in &missing {
                    errln!("cutover plan: {e}");
                }
                return exit::FATAL;
            }
            outln!(
                "{}: ok: {} tasks, at most {} at once; state in {}",
                path.display(),
                plan.tasks.len(),
                plan.parallel,
                plan.state_dir.display()
            );
            print_order(&plan);
            exit::OK
        }
        PlanCommand::DryRun { .. } => {
            print_order(&plan);
            match ::plan::run::dry_run(&plan, runner, echo, stop_on_signal()).await {
                Ok(r) if r.interrupted => exit::INTERRUPTED,
                Ok(r) if r.ok() => exit::OK,
                Ok(_) => exit::PARTIAL,
                Err(e) => fail(&e),
            }
        }
        PlanCommand::Presync {
            until_under,
            max_passes,
            ..
        } => {
            let r = ::plan::run::presync(
                &plan,
                runner,
                echo,
                until_under,
                max_passes,
                stop_on_signal(),
            )
            .await;
            match r {
                Ok(r) => presync_code(&r),
                Err(e) => fail(&e),
            }
        }
        PlanCommand::Cutover { force, .. } => {
            match ::plan::run::cutover(&plan, runner, echo, force, stop_on_signal()).await {
                Ok(r) if r.interrupted => exit::INTERRUPTED,
                Ok(r) if r.ok => exit::OK,
                Ok(_) => exit::PARTIAL,
                Err(e) => fail(&e),
            }
        }
        PlanCommand::Status { json, .. } => match ::plan::run::status(&plan) {
            Ok(s) => {
                if json {
                    outln!("{}", status_json(&plan, &s));
                } else {
                    print_status(&plan, &s);
                }
                exit::OK
            }
            Err(e) => fail(&e),
        },
        PlanCommand::Rerun { force, .. } => {
            match ::plan::run::rerun_failed(&plan, runner, echo, force, stop_on_signal()).await {
                Ok((r, _)) if r.interrupted => exit::INTERRUPTED,
                Ok((r, _)) if r.ok() => exit::OK,
                Ok(_) => exit::PARTIAL,
                Err(e) => fail(&e),
            }
        }
    }
}

fn fail(e: &dyn std::fmt::Display) -> u8 {
    errln!("cutover plan: {e}");
    exit::FATAL
}

fn presync_code(r: &PresyncReport) -> u8 {
    match r.verdict {
        Verdict::Ready | Verdict::Done => exit::OK,
        Verdict::NotReady => NOT_READY,
        Verdict::Failed => exit::PARTIAL,
        Verdict::Interrupted => exit::INTERRUPTED,
    }
}

/// A channel that turns true on the first SIGINT or SIGTERM: the runner then stops every
/// task and records them as interrupted.
fn stop_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        errln!("cutover plan: stopping every task; run the same command again to resume");
        let _ = tx.send(true);
        // Keep the sender alive: a dropped sender reads as "never stop".
        std::future::pending::<()>().await;
    });
    rx
}

fn print_order(plan: &Plan) {
    let levels = ::plan::graph::levels(&plan.tasks);
    let depth = levels.iter().copied().max().unwrap_or(0);
    for l in 0..=depth {
        let names: Vec<&str> = plan
            .tasks
            .iter()
            .zip(&levels)
            .filter(|(_, &tl)| tl == l)
            .map(|(t, _)| t.name.as_str())
            .collect();
        outln!("  step {}: {}", l + 1, names.join(", "));
    }
}

/// `plan check`'s look at the local paths of every task, read-only (nothing is created): a
/// local source must exist, and a local destination's parent directory must be one (as
/// `cutover sync` needs). A path at or beneath the local destination of a task it depends
/// on (directly or not) is not looked at: that task makes it. Relative paths are taken from
/// the plan's directory, and the errors show where that put them.
fn check_local_paths(plan: &Plan) -> Vec<::plan::PlanError> {
    let local = |endpoint: &str| match Endpoint::parse(endpoint) {
        Ok(Endpoint::Local { .. }) => Some(PathBuf::from(resolve(endpoint, &plan.base_dir))),
        _ => None,
    };
    let mut errors = Vec::new();
    for (i, t) in plan.tasks.iter().enumerate() {
        let made: Vec<PathBuf> = all_dependencies(plan, i)
            .into_iter()
            .filter_map(|d| local(&plan.tasks[d].destination))
            .collect();
        let made_before = |p: &Path| made.iter().any(|m| p.starts_with(m));
        let mut problem = |key, message| {
            errors.push(plan.error_at_task_key(i, KeyError { key, message }));
        };
        if let Some(src) = t.source.as_deref().and_then(local) {
            if !made_before(&src) {
                match std::fs::metadata(&src) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        problem("source", format!("{} does not exist", src.display()))
                    }
                    Err(e) => problem("source", format!("{}: {e}", src.display())),
                }
            }
        }
        let Some(dst) = local(&t.destination) else {
            continue;
        };
        let Some(parent) = dst.parent().filter(|p| !made_before(p)) else {
            continue;
        };
        match std::fs::metadata(parent) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => problem(
                "destination",
                format!("{}: {} is not a directory", dst.display(), parent.display()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => problem(
                "destination",
                format!(
                    "{}: its parent directory {} does not exist; create it first",
                    dst.display(),
                    parent.display()
                ),
            ),
            Err(e) => problem(
                "destination",
                format!("{}: {}: {e}", dst.display(), parent.display()),
            ),
        }
    }
    errors
}

/// Every task that task `i` depends on, directly or through others.
fn all_dependencies(plan: &Plan, i: usize) -> Vec<usize> {
    let mut seen = vec![false; plan.tasks.len()];
    let mut todo = ::plan::graph::dependencies(&plan.tasks, i);
    while let Some(d) = todo.pop() {
        if !std::mem::replace(&mut seen[d], true) {
            todo.extend(::plan::graph::dependencies(&plan.tasks, d));
        }
    }
    (0..plan.tasks.len()).filter(|&d| seen[d]).collect()
}

/// Runs plan tasks through the same function as `cutover sync`.
struct CliRunner;

/// A task's local paths are taken from the plan file's directory, made absolute so that a
/// colon in it can never make the path read as an ssh endpoint.
fn resolve(endpoint: &str, base_dir: &Path) -> String {
    match Endpoint::parse(endpoint) {
        Ok(Endpoint::Local {
            path,
            trailing_slash,
        }) if path.is_relative() => {
            let base = if base_dir.is_absolute() {
                base_dir.to_path_buf()
            } else {
                std::env::current_dir()
                    .unwrap_or_else(|_| PathBuf::from("/"))
                    .join(base_dir)
            };
            let mut s = base.join(path).to_string_lossy().into_owned();
            if trailing_slash && !s.ends_with('/') {
                s.push('/');
            }
            s
        }
        _ => endpoint.to_string(),
    }
}

/// The `cutover sync` a task stands for; a command task syncs its spool file.
pub fn job_for(
    t: &TaskSpec,
    base_dir: &Path,
    dry_run: bool,
    spool: &Path,
) -> Result<SyncJob, String> {
    let bwlimit = t
        .bwlimit
        .as_deref()
        .map(parse_rate)
        .transpose()
        .map_err(|e| format!("bwlimit: {e}"))?;
    let server_fingerprint = t
        .server_fingerprint
        .as_deref()
        .map(net::tls::Fingerprint::parse)
        .transpose()
        .map_err(|e| format!("server_fingerprint: {e}"))?;
    // rsync semantics, as `cutover sync` applies them: includes first, so they win over
    // excludes of the same path.
    let filters = t
        .includes
        .iter()
        .map(|p| FilterRule::Include(p.clone()))
        .chain(t.excludes.iter().map(|p| FilterRule::Exclude(p.clone())))
        .collect();
    Ok(SyncJob {
        src: match &t.source {
            Some(s) => resolve(s, base_dir),
            None => spool.to_string_lossy().into_owned(),
        },
        dst: resolve(&t.destination, base_dir),
        connections: match t.connections {
            None | Some(::plan::Connections::Auto) => Connections::Auto,
            Some(::plan::Connections::Fixed(n)) => Connections::Fixed(n as usize),
        },
        options: SyncOptions {
            delete: t.delete,
            max_delete: t.max_delete,
            dry_run,
            whole_file: t.whole_file,
            checksum: t.checksum,
            // A volume is written in place by positional delta, never renamed.
            inplace: t.kind == Kind::Volume,
            fsync: t.fsync,
            hard_links: t.hard_links,
            xattrs: t.xattrs,
            compress: t.compress,
            filters,
            bwlimit,
            ..SyncOptions::default()
        },
        timeout: 120,
        retry_for: crate::sync::DEFAULT_RETRY_FOR,
        security: SecurityArgs {
            server_fingerprint,
            token_file: t.token_file.as_ref().map(|f| base_dir.join(f)),
            ..SecurityArgs::default()
        },
        rsh: rsh_of(t),
        remote_cutover: t
            .remote_cutover
            .clone()
            .unwrap_or_else(|| crate::sync::DEFAULT_REMOTE_CUTOVER.into()),
        remote_install: t.remote_cutover.is_none(),
        files_from: None,
    })
}

/// A task's ssh command: its `rsh`, else `$CUTOVER_RSH`, else `ssh` (as `cutover sync -e`).
fn rsh_of(t: &TaskSpec) -> String {
    t.rsh
        .clone()
        .or_else(|| std::env::var("CUTOVER_RSH").ok())
        .unwrap_or_else(|| "ssh".into())
}

/// The command line that runs `command` on an ssh destination's host with the transferred
/// file on its stdin: `sh -c COMMAND < FILE` for the remote shell, where FILE is `path`, or
/// the spool file's name in it when `path` is a directory there (as `cutover sync` lands it).
fn remote_feed_command(command: &str, path: &str, spool_name: &str) -> Result<String, String> {
    let q = |s: &str| {
        shlex::try_quote(s).map(|q| q.into_owned()).map_err(|e| {
            format!("destination_command: cannot quote {s:?} for the remote shell: {e}")
        })
    };
    let path = if path.is_empty() { "." } else { path };
    let into_dir = format!("{}/{spool_name}", path.trim_end_matches('/'));
    Ok(if path.ends_with('/') || path == "." {
        format!("sh -c {} < {}", q(command)?, q(&into_dir)?)
    } else {
        // Decided there: only the remote knows whether the path is a directory.
        format!(
            "f={}; if [ -d \"$f\" ]; then f={}; fi; sh -c {} < \"$f\"",
            q(path)?,
            q(&into_dir)?,
            q(command)?
        )
    })
}

/// Where a single file synced to the local destination `dst` lands: `dst` itself, or in it
/// when it is a directory (written with a trailing slash or existing), as `cutover sync` does.
fn landed(dst: &str, file: &Path) -> PathBuf {
    let d = PathBuf::from(dst);
    match file.file_name() {
        Some(name) if dst.ends_with('/') || d.is_dir() => d.join(name),
        _ => d,
    }
}

/// Engine events of a plan task go to its log file. A dry run's engine sends nothing, so
/// its summary counts nothing: what it would change is counted here from the itemised list.
struct TaskEvents {
    log: TaskLog,
    dry_run: bool,
    would: std::sync::Mutex<(u64, u64, u64)>,
    /// With `collect_sent`: the paths sent or created (what `verify_mode = "transferred"`
    /// checks).
    sent: Option<std::sync::Mutex<Vec<String>>>,
}

impl Events for TaskEvents {
    fn event(&self, ev: Event) {
        match ev {
            Event::Item { path, action, size } => {
                let would = if self.dry_run { "would " } else { "" };
                if let (Some(sent), Action::Send | Action::Delta | Action::Create) =
                    (&self.sent, action)
                {
                    sent.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(names::escape(path.as_bytes()));
                }
                if self.dry_run {
                    let mut w = self.would.lock().unwrap_or_else(|p| p.into_inner());
                    match action.as_str() {
                        "send" | "delta" => {
                            w.0 += 1;
                            w.1 += size;
                        }
                        "meta" => w.0 += 1,
                        "delete" => w.2 += 1,
                        _ => {}
                    }
                }
                let path = names::escape(path.as_bytes());
                self.log
                    .line(&format!("{would}{} {path} ({size} bytes)", action.as_str()));
            }
            Event::FileDone { .. } => {}
            Event::Changed { path, reason } => self.log.line(&format!(
                "changed while read: {}: {reason}",
                names::escape(path.as_bytes())
            )),
            Event::Error { message } => self.log.line(&format!("error: {message}")),
            Event::Retry {
                attempt,
                wait,
                reason,
            } => self.log.line(&format!(
                "retry {attempt} in {:.0} s: {reason}",
                wait.as_secs_f64().ceil()
            )),
        }
    }
}

/// The engine's events during `verify_mode`'s comparison (a dry run with checksum): every
/// entry it lists is a difference between the two sides.
struct CheckEvents {
    log: TaskLog,
    found: std::sync::Mutex<Vec<Mismatch>>,
}

impl Events for CheckEvents {
    fn event(&self, ev: Event) {
        match ev {
            Event::Item { path, action, .. } => {
                let path = names::escape(path.as_bytes());
                let reason = match action {
                    Action::Delta => "content differs",
                    Action::Send => "missing on the destination, or of another size",
                    Action::Create => {
                        "missing or different on the destination (a directory, link or special file)"
                    }
                    Action::Delete => "only on the destination (the task has delete = true)",
                    Action::Meta => {
                        // Same content: not a mismatch of what verify_mode compares.
                        self.log
                            .line(&format!("verify: same content, other metadata: {path}"));
                        return;
                    }
                };
                self.found
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Mismatch {
                        path,
                        reason: reason.into(),
                    });
            }
            Event::Error { message } => self.log.line(&format!("verify: error: {message}")),
            Event::Changed { path, reason } => self.log.line(&format!(
                "verify: changed while read: {}: {reason}",
                names::escape(path.as_bytes())
            )),
            Event::FileDone { .. } => {}
            // The comparison starts over in a new session, which lists every difference again.
            Event::Retry {
                attempt,
                wait,
                reason,
            } => {
                self.found.lock().unwrap_or_else(|p| p.into_inner()).clear();
                self.log.line(&format!(
                    "verify: retry {attempt} in {:.0} s: {reason}",
                    wait.as_secs_f64().ceil()
                ));
            }
        }
    }
}

/// Aborts the progress ticker when the pass ends or is dropped (Ctrl-C).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl TaskRunner for CliRunner {
    fn check(&self, t: &TaskSpec) -> Result<(), KeyError> {
        let mut remote = 0;
        for (key, v) in [
            ("source", &t.source),
            ("destination", &Some(t.destination.clone())),
        ] {
            match v.as_deref().map(Endpoint::parse) {
                None | Some(Ok(Endpoint::Local { .. })) => {}
                Some(Ok(_)) => remote += 1,
                Some(Err(message)) => return Err(KeyError { key, message }),
            }
        }
        if t.destination_command.is_some() {
            if let Ok(Endpoint::Daemon { addr, .. }) = Endpoint::parse(&t.destination) {
                return Err(KeyError {
                    key: "destination_command",
                    message: format!("cannot run on the daemon destination {addr}: a daemon never runs commands; write the destination as [user@]host:PATH (ssh) so it runs there, or run it on that host in a post_final hook"),
                });
            }
        }
        if t.paths_from.is_some() {
            if let Some(Ok(Endpoint::Daemon { addr, .. })) =
                t.source.as_deref().map(Endpoint::parse)
            {
                return Err(KeyError {
                    key: "paths_from",
                    message: format!("cannot run on the daemon source {addr}: a daemon never runs commands; write the source as [user@]host:PATH (ssh) so it runs there"),
                });
            }
        }
        if let Some(rsh) = &t.rsh {
            if shlex::split(rsh).is_none_or(|a| a.is_empty()) {
                return Err(KeyError {
                    key: "rsh",
                    message: format!("{rsh:?} is not a command line (unbalanced quotes?)"),
                });
            }
        }
        if remote == 2 {
            return Err(KeyError {
                key: "destination",
                message: "source and destination are both remote; one side must be a local path"
                    .into(),
            });
        }
        job_for(t, Path::new("/"), false, Path::new("/spool"))
            .map(drop)
            .map_err(|m| {
                let key = if m.starts_with("bwlimit") {
                    "bwlimit"
                } else {
                    "server_fingerprint"
                };
                let message = m.split_once(": ").map(|x| x.1).unwrap_or(&m).to_string();
                KeyError { key, message }
            })
    }

    fn source_side(&self, t: &TaskSpec, base_dir: &Path) -> Result<SourceSide, String> {
        let source = t
            .source
            .as_deref()
            .ok_or("the task has no source (a command task lists nothing)")?;
        match Endpoint::parse(&resolve(source, base_dir))? {
            Endpoint::Local { path, .. } => Ok(SourceSide::Local(path)),
            Endpoint::Ssh { dest, path } => {
                let rsh = rsh_of(t);
                let mut argv = shlex::split(&rsh)
                    .filter(|a| !a.is_empty())
                    .ok_or_else(|| format!("rsh {rsh:?}: not a command line"))?;
                argv.push(dest);
                Ok(SourceSide::Remote {
                    argv,
                    path: if path.is_empty() { ".".into() } else { path },
                })
            }
            // `check` refuses it before any pass.
            Endpoint::Daemon { addr, .. } => Err(format!(
                "cannot run on the daemon source {addr}: a daemon never runs commands"
            )),
        }
    }

    fn verify(
        &self,
        t: TaskSpec,
        ctx: PassContext,
        only: Option<Vec<String>>,
    ) -> BoxFuture<Result<Vec<Mismatch>, String>> {
        verify_task(t, ctx, only)
    }

    fn run_pass(&self, t: TaskSpec, ctx: PassContext) -> BoxFuture<Result<PassStats, String>> {
        Box::pin(async move {
            let mut job = job_for(&t, &ctx.base_dir, ctx.dry_run, &ctx.spool)?;
            job.files_from = ctx.files_from.as_ref().map(|list| FilesFrom {
                list: list.clone(),
                from0: false,
            });
            if let Some(f) = &job.files_from {
                ctx.log.line(&format!(
                    "sync of the paths listed in {} (files_from)",
                    f.list.display()
                ));
            }
            if let Some(command) = &t.command {
                if ctx.dry_run {
                    // A dry run changes nothing, and a dump can be heavy: say what would run.
                    ctx.log.line(&format!(
                        "would run {command:?}, spool it to {} and sync it to {}",
                        ctx.spool.display(),
                        job.dst
                    ));
                    return Ok(PassStats::default());
                }
                ::plan::spool::spool(command, &ctx.base_dir, &ctx.env, &ctx.spool, &ctx.log)
                    .await?;
            }
            let stats = Arc::new(Stats::default());
            let events = Arc::new(TaskEvents {
                log: ctx.log.clone(),
                dry_run: ctx.dry_run,
                would: Default::default(),
                sent: ctx.collect_sent.then(Default::default),
            });
            let st = stats.clone();
            let sink = ctx.progress.clone();
            let _ticker = AbortOnDrop(tokio::spawn(async move {
                loop {
                    sink.update(state::Progress {
                        files_done: Stats::get(&st.files_done),
                        files_total: Stats::get(&st.files_to_send),
                        bytes_done: Stats::get(&st.bytes_done),
                        bytes_total: Stats::get(&st.bytes_to_send),
                    });
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }));
            let (mut s, wire) = run_job(&job, events.clone(), stats).await?;
            if let (Some(cmd), "final", true) = (
                &t.destination_command,
                ctx.kind.as_str(),
                s.errors.is_empty(),
            ) {
                match Endpoint::parse(&job.dst) {
                    Ok(Endpoint::Ssh { dest, path }) => {
                        let name = ctx
                            .spool
                            .file_name()
                            .map(|n| n.to_string_lossy().into_owned())
                            .unwrap_or_default();
                        let remote = remote_feed_command(cmd, &path, &name)?;
                        let mut argv = shlex::split(&job.rsh)
                            .filter(|a| !a.is_empty())
                            .ok_or_else(|| format!("rsh {:?}: not a command line", job.rsh))?;
                        argv.push(dest);
                        argv.push(remote);
                        ::plan::spool::feed_remote(&argv, &ctx.base_dir, &ctx.log).await?;
                    }
                    Ok(Endpoint::Local { .. }) => {
                        ::plan::spool::feed(
                            cmd,
                            &ctx.base_dir,
                            &landed(&job.dst, &ctx.spool),
                            &ctx.log,
                        )
                        .await?
                    }
                    // `check` refuses it before any pass; a plan cannot get here.
                    _ => {
                        return Err(
                            "destination_command: a daemon destination never runs commands".into(),
                        )
                    }
                }
            }
            if ctx.dry_run {
                let w = *events.would.lock().unwrap_or_else(|p| p.into_inner());
                (s.files_sent, s.files_meta_only, s.bytes_logical, s.deleted) = (w.0, 0, w.1, w.2);
            }
            let sent = events
                .sent
                .as_ref()
                .map(|m| std::mem::take(&mut *m.lock().unwrap_or_else(|p| p.into_inner())))
                .unwrap_or_default();
            Ok(PassStats {
                sent,
                entries_scanned: s.entries_scanned,
                files_changed: s.files_sent + s.files_meta_only,
                bytes_changed: s.bytes_logical,
                bytes_literal: s.bytes_literal,
                wire_bytes: wire,
                deleted: s.deleted,
                errors: s.errors,
                changed_during_copy: s.changed,
                delete_limit_hit: s.delete_limit_hit,
            })
        })
    }
}

/// `verify_mode`: the task's sync as a dry run with `checksum`, which lists exactly the
/// entries that differ (same-size files compared by their hashes on both sides), as the
/// task's final pass saw source and destination (same filters, `delete` for extra entries).
fn verify_task(
    t: TaskSpec,
    ctx: PassContext,
    only: Option<Vec<String>>,
) -> BoxFuture<Result<Vec<Mismatch>, String>> {
    Box::pin(async move {
        let mut job = job_for(&t, &ctx.base_dir, true, &ctx.spool)?;
        job.options.checksum = true;
        job.options.whole_file = false;
        // A dry run deletes nothing; extra entries are listed, never counted against a limit.
        job.options.max_delete = None;
        let events = Arc::new(CheckEvents {
            log: ctx.log.clone(),
            found: Default::default(),
        });
        let (s, _) = run_job(&job, events.clone(), Arc::new(Stats::default())).await?;
        if let Some(first) = s.errors.first() {
            return Err(format!(
                "{} error(s) while comparing; first: {first}",
                s.errors.len()
            ));
        }
        let found = std::mem::take(&mut *events.found.lock().unwrap_or_else(|p| p.into_inner()));
        // "transferred": the comparison covered everything; keep what the final pass sent.
        let only: Option<std::collections::HashSet<String>> = only.map(|v| v.into_iter().collect());
        Ok(found
            .into_iter()
            .filter(|m| only.as_ref().is_none_or(|o| o.contains(&m.path)))
            .collect())
    })
}

fn ago(ms: i64) -> String {
    let secs = ((state::now_ms() - ms).max(0) / 1000) as u64;
    format!("{} ago", humantime_short(Duration::from_secs(secs)))
}

fn humantime_short(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{}s", s / 60, s % 60),
        _ => format!("{}h{}m", s / 3600, (s % 3600) / 60),
    }
}

fn run_line(s: &Status) -> String {
    let Some(r) = &s.run else {
        return "no run yet".into();
    };
    let state = match (&r.outcome, s.runner_alive) {
        (Some(o), _) => format!(
            "ended {} ({o})",
            ::plan::logs::stamp(r.ended_ms.unwrap_or(0))
        ),
        (None, true) => format!("running (pid {})", r.pid),
        (None, false) => format!("runner (pid {}) is gone without recording an end", r.pid),
    };
    let mode = match &r.repeats {
        Some(m) => format!("{} (of a {m})", r.mode),
        None => r.mode.clone(),
    };
    format!(
        "run {}: {mode}, started {}, {state}",
        r.id,
        ::plan::logs::stamp(r.started_ms)
    )
}

fn print_status(plan: &Plan, s: &Status) {
    outln!(
        "plan {} ({}), state in {}",
        plan.name,
        plan.path.display(),
        plan.state_db().display()
    );
    outln!("{}", run_line(s));
    if s.plan_changed {
        outln!("note: the plan file changed since that run");
    }
    let predicted = s.prediction.as_ref().and_then(|p| p.total_s);
    outln!(
        "predicted final pass: {}",
        predicted
            .map(::plan::run::human_duration)
            .unwrap_or_else(|| "unknown (not every task has a successful pass)".into())
    );
    for line in s.prediction.iter().flat_map(|p| p.lines()) {
        outln!("  {line}");
    }
    let rows: Vec<[String; 5]> = s
        .tasks
        .iter()
        .map(|(name, t)| match t {
            None => [
                name.clone(),
                "never run".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ],
            Some(t) => [
                name.clone(),
                t.phase.as_str().into(),
                if !matches!(t.phase, state::Phase::Running | state::Phase::Verifying)
                    && t.last_pass.is_some()
                {
                    let p = t
                        .last_pass
                        .as_ref()
                        .map(|p| (p.files_changed, p.bytes_changed, p.duration_s()))
                        .unwrap_or_default();
                    format!(
                        "last pass: {} files, {}, {:.1} s",
                        p.0,
                        human_bytes(p.1),
                        p.2
                    )
                } else if t.progress.files_total + t.progress.bytes_total > 0 {
                    format!(
                        "{}/{} files, {}/{}",
                        t.progress.files_done,
                        t.progress.files_total,
                        human_bytes(t.progress.bytes_done),
                        human_bytes(t.progress.bytes_total)
                    )
                } else {
                    "-".into()
                },
                // As paths_from sees it (CUTOVER_LAST_SUCCESS): the start of the last
                // successful pass, to the second.
                t.last_success_ms
                    .map(|m| format!("{} ({})", ::plan::stamps::rfc3339(m), ago(m)))
                    .unwrap_or_else(|| "never".into()),
                match (&t.last_error, t.last_error_ms) {
                    (Some(e), Some(at)) => format!("{}: {e}", ::plan::logs::stamp(at)),
                    (Some(e), None) => e.clone(),
                    _ => "-".into(),
                },
            ],
        })
        .collect();
    let head = ["TASK", "PHASE", "PROGRESS", "STAMP", "LAST ERROR"].map(String::from);
    let mut width = [0usize; 4];
    for r in std::iter::once(&head).chain(&rows) {
        for (w, c) in width.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.chars().count());
        }
    }
    for r in std::iter::once(&head).chain(&rows) {
        outln!(
            "{:<w0$}  {:<w1$}  {:<w2$}  {:<w3$}  {}",
            r[0],
            r[1],
            r[2],
            r[3],
            r[4],
            w0 = width[0],
            w1 = width[1],
            w2 = width[2],
            w3 = width[3]
        );
    }
}

fn status_json(plan: &Plan, s: &Status) -> serde_json::Value {
    let models: Vec<(String, Option<::plan::predict::TaskModel>)> = s
        .prediction
        .as_ref()
        .map(|p| p.tasks.clone())
        .unwrap_or_default();
    let tasks: Vec<_> = s
        .tasks
        .iter()
        .map(|(name, t)| {
            let model = models
                .iter()
                .find(|(n, _)| n == name)
                .and_then(|(_, m)| m.as_ref());
            let predicted = model.map(|m| m.predicted_s);
            let prediction = model.map(|m| {
                json!({
                    "predicted_s": m.predicted_s,
                    "fitted": m.fitted,
                    "passes": m.passes,
                    "r2": m.r2,
                    "rel_residual": m.rel_residual,
                    "floor_s": m.floor_s,
                    "floored": m.floored,
                    "overhead_s": m.overhead_s,
                    "per_file_s": m.per_file_s,
                    "per_byte_s": m.per_byte_s,
                })
            });
            match t {
                None => json!({
                    "name": name,
                    "phase": null,
                    "predicted_final_s": predicted,
                    "prediction": prediction,
                }),
                Some(t) => json!({
                    "name": name,
                    "phase": t.phase.as_str(),
                    "progress": {
                        "files_done": t.progress.files_done,
                        "files_total": t.progress.files_total,
                        "bytes_done": t.progress.bytes_done,
                        "bytes_total": t.progress.bytes_total,
                    },
                    "last_success_ms": t.last_success_ms,
                    "last_success": t.last_success_ms.map(::plan::logs::stamp),
                    // What the next pass's commands get: CUTOVER_LAST_SUCCESS(_EPOCH).
                    "stamp": t.last_success_ms.map(::plan::stamps::rfc3339),
                    "stamp_epoch": t.last_success_ms.map(|m| m.div_euclid(1000)),
                    "last_error": t.last_error,
                    "last_error_ms": t.last_error_ms,
                    "last_pass": t.last_pass.as_ref().map(|p| json!({
                        "run": p.run,
                        "kind": p.kind,
                        "started_ms": p.started_ms,
                        "ended_ms": p.ended_ms,
                        "duration_s": p.duration_s(),
                        "files_changed": p.files_changed,
                        "bytes_changed": p.bytes_changed,
                        "bytes_literal": p.bytes_literal,
                        "wire_bytes": p.wire_bytes,
                        "entries_scanned": p.entries_scanned,
                        "deleted": p.deleted,
                        "outcome": p.outcome.as_str(),
                    })),
                    "predicted_final_s": predicted,
                    "prediction": prediction,
                }),
            }
        })
        .collect();
    json!({
        "plan": plan.path,
        "state": plan.state_db(),
        "run": s.run.as_ref().map(|r| json!({
            "id": r.id,
            "mode": r.mode,
            "repeats": r.repeats,
            "pid": r.pid,
            "started_ms": r.started_ms,
            "ended_ms": r.ended_ms,
            "outcome": r.outcome,
            "predicted_final_s": r.predicted_final_s,
        })),
        "runner_alive": s.runner_alive,
        "plan_changed": s.plan_changed,
        "predicted_final_s": s.prediction.as_ref().and_then(|p| p.total_s),
        "tasks": tasks,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_destination_commands_read_the_landed_file_there() {
        assert_eq!(
            remote_feed_command("pg_restore -d app", "/srv/new/", "db").unwrap(),
            "sh -c 'pg_restore -d app' < /srv/new/db"
        );
        assert_eq!(
            remote_feed_command("cat > x", "", "db").unwrap(),
            "sh -c 'cat > x' < ./db"
        );
        // Without a slash only the remote knows whether it is a directory.
        assert_eq!(
            remote_feed_command("restore", "dumps/app dump", "db").unwrap(),
            "f='dumps/app dump'; if [ -d \"$f\" ]; then f='dumps/app dump/db'; fi; sh -c restore < \"$f\""
        );
    }

    #[test]
    fn relative_local_paths_are_taken_from_the_plan_directory() {
        let base = Path::new("/srv/plans");
        assert_eq!(resolve("tree/docs/", base), "/srv/plans/tree/docs/");
        assert_eq!(resolve("tree/docs", base), "/srv/plans/tree/docs");
        assert_eq!(resolve("/abs/x/", base), "/abs/x/");
        assert_eq!(resolve("host:rel/", base), "host:rel/");
        assert_eq!(resolve("cutover://h:1/m/p", base), "cutover://h:1/m/p");
        // A colon in the plan's directory must not turn the path into an ssh endpoint.
        let odd = Path::new("/srv/a:b");
        assert!(matches!(
            Endpoint::parse(&resolve("x/", odd)).unwrap(),
            Endpoint::Local { .. }
        ));
    }
}
