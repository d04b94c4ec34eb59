//! Running a plan: the scheduler (every task in dependency order, at most `parallel` at
//! once, dependents of a failed task blocked, everything stopped on request), the record of
//! every pass in the state store, and the commands built on it: `dry-run`, `presync` (passes
//! until the predicted final pass fits), `cutover` (pre_final hooks, final pass, post_final
//! hooks, downtime against the prediction) and `rerun --failed`.

use crate::file::{Plan, VerifyMode};
use crate::logs::{stamp, Echo, Logs};
use crate::passes::Pass;
use crate::predict::{predict, Prediction};
use crate::{graph, Error, Mismatch, PassContext, PassStats, ProgressSink, TaskRunner};
use serde_json::json;
use state::{now_ms, Millis, Outcome, PassRecord, Phase, RunId, SqliteStore, Store};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How one task's pass ended in a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PassOutcome {
    Ok(PassStats),
    Failed(String),
    /// Not run: the named dependency failed, was blocked or was interrupted.
    Blocked(String),
    Interrupted,
    /// Not selected in this run (`rerun --failed` runs a subset), or never reached.
    NotRun,
}

#[derive(Debug, Clone)]
pub struct TaskResult {
    pub name: String,
    pub outcome: PassOutcome,
    pub started_ms: Option<Millis>,
    pub ended_ms: Option<Millis>,
    /// After a final pass, the task's verification (`verify_mode` and the `verify` pair):
    /// None when it has none or did not get that far, else whether it passed (Err says how
    /// it failed).
    pub verify: Option<Result<(), String>>,
    /// Every difference `verify_mode` found (path and reason).
    pub mismatches: Vec<Mismatch>,
}

/// The result of running the plan's tasks once.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub results: Vec<TaskResult>,
    pub interrupted: bool,
}

impl RunReport {
    /// Every task that ran succeeded and nothing was interrupted.
    pub fn ok(&self) -> bool {
        !self.interrupted
            && self.results.iter().all(|r| {
                matches!(r.outcome, PassOutcome::Ok(_) | PassOutcome::NotRun)
                    && !matches!(r.verify, Some(Err(_)))
            })
    }

    /// Names of the tasks a `rerun --failed` should run.
    pub fn to_rerun(&self) -> Vec<String> {
        self.results
            .iter()
            .filter(|r| {
                matches!(
                    r.outcome,
                    PassOutcome::Failed(_) | PassOutcome::Blocked(_) | PassOutcome::Interrupted
                ) || matches!(r.verify, Some(Err(_)))
            })
            .map(|r| r.name.clone())
            .collect()
    }

    /// Sums over the tasks that succeeded: (files, bytes) changed.
    pub fn changed(&self) -> (u64, u64) {
        self.results
            .iter()
            .fold((0, 0), |(f, b), r| match &r.outcome {
                PassOutcome::Ok(s) => (f + s.files_changed, b + s.bytes_changed),
                _ => (f, b),
            })
    }
}

/// What a run needs, opened once per command.
struct Ctx<'a> {
    plan: &'a Plan,
    store: Arc<dyn Store>,
    runner: Arc<dyn TaskRunner>,
    logs: Logs,
    run: RunId,
    dry_run: bool,
}

/// Resolves when `stop` becomes true (never, if its sender is gone).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Bytes for people, one decimal (plan tables).
pub fn human_bytes(n: u64) -> String {
    human_bytes_to(n, 1)
}

/// Bytes for people in binary units with `decimals` digits after the point.
pub fn human_bytes_to(n: u64, decimals: usize) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.decimals$} {}", UNITS[u])
    }
}

/// "1h 2m 3s"-style, rounded to what matters for a downtime window.
pub fn human_duration(secs: f64) -> String {
    if secs < 10.0 {
        return format!("{secs:.1} s");
    }
    humantime::format_duration(Duration::from_secs(secs.round() as u64)).to_string()
}

/// Run the tasks once (those in `only`, or all), in dependency order, at most
/// `plan.parallel` at once. A task whose dependency did not succeed in this run is blocked;
/// a dependency outside `only` counts as satisfied (it succeeded before).
async fn run_tasks(
    ctx: &Ctx<'_>,
    kind: &str,
    only: Option<&[String]>,
    stop: &mut watch::Receiver<bool>,
) -> RunReport {
    #[derive(Clone, PartialEq)]
    enum S {
        Waiting,
        Running,
        Finished,
    }
    let tasks = &ctx.plan.tasks;
    let n = tasks.len();
    let deps: Vec<Vec<usize>> = (0..n).map(|i| graph::dependencies(tasks, i)).collect();
    let mut results: Vec<TaskResult> = tasks
        .iter()
        .map(|t| TaskResult {
            name: t.name.clone(),
            outcome: PassOutcome::NotRun,
            started_ms: None,
            ended_ms: None,
            verify: None,
            mismatches: Vec::new(),
        })
        .collect();
    let selected: Vec<bool> = tasks
        .iter()
        .map(|t| only.is_none_or(|o| o.contains(&t.name)))
        .collect();
    let mut st: Vec<S> = selected
        .iter()
        .map(|&s| if s { S::Waiting } else { S::Finished })
        .collect();
    let mut set = tokio::task::JoinSet::new();
    let mut by_id: HashMap<tokio::task::Id, usize> = HashMap::new();
    let mut running = 0usize;
    let mut interrupted = false;
    loop {
        // A pass may see the stop (and end) before this loop does: look at it before
        // judging or starting anything. Every pass sees the same stop: it drops its sync
        // or kills its hook, runs its post_pass hooks and ends as interrupted.
        if !interrupted && *stop.borrow() {
            interrupted = true;
            ctx.logs
                .summary("stop requested: stopping every running task");
        }
        // Once stopping, nothing new starts: what still waits is interrupted too, so that
        // `rerun --failed` picks it up.
        if interrupted {
            for i in 0..n {
                if st[i] == S::Waiting {
                    st[i] = S::Finished;
                    results[i].outcome = PassOutcome::Interrupted;
                    let _ = ctx
                        .store
                        .set_phase(ctx.run, &tasks[i].name, Phase::Interrupted);
                }
            }
        }
        // Block whatever waits on a dependency that did not succeed, until nothing changes
        // (a blocked task blocks its own dependents in turn).
        loop {
            let mut changed = false;
            for i in 0..n {
                if st[i] != S::Waiting {
                    continue;
                }
                let bad = deps[i].iter().find(|&&d| {
                    selected[d]
                        && st[d] == S::Finished
                        && !matches!(results[d].outcome, PassOutcome::Ok(_))
                });
                if let Some(&d) = bad {
                    st[i] = S::Finished;
                    results[i].outcome = PassOutcome::Blocked(tasks[d].name.clone());
                    let _ = ctx.store.set_phase(ctx.run, &tasks[i].name, Phase::Blocked);
                    ctx.logs.summary(&format!(
                        "{}: blocked: {} did not succeed",
                        tasks[i].name, tasks[d].name
                    ));
                    changed = true;
                }
            }
            if !changed {
                break;
            }
        }
        // Start what is ready, in plan order.
        for i in 0..n {
            if running >= ctx.plan.parallel || interrupted {
                break;
            }
            if st[i] != S::Waiting
                || !deps[i].iter().all(|&d| {
                    !selected[d]
                        || (st[d] == S::Finished
                            && matches!(results[d].outcome, PassOutcome::Ok(_)))
                })
            {
                continue;
            }
            let spec = tasks[i].clone();
            let log = match ctx.logs.task(&spec.name) {
                Ok(l) => l,
                Err(e) => {
                    let m = format!("cannot open its log: {e}");
                    ctx.logs.summary(&format!("{}: failed: {m}", spec.name));
                    st[i] = S::Finished;
                    results[i].outcome = PassOutcome::Failed(m);
                    continue;
                }
            };
            let started = now_ms();
            let _ = ctx.store.set_phase(ctx.run, &spec.name, Phase::Running);
            if !log.echoes() {
                log.line(&format!(
                    "{kind} pass starts: {} -> {}{}",
                    spec.what(),
                    spec.destination,
                    if ctx.dry_run { " (dry run)" } else { "" }
                ));
            }
            ctx.logs
                .summary(&format!("{}: {kind} pass starts", spec.name));
            // Hooks, paths_from and the sync; the pass ends itself when `stop` turns.
            let pass = Pass::new(
                ctx.plan,
                &spec,
                kind,
                PassContext {
                    base_dir: ctx.plan.base_dir.clone(),
                    kind: kind.to_string(),
                    spool: ctx.plan.spool_path(&spec),
                    dry_run: ctx.dry_run,
                    collect_sent: kind == "final"
                        && !ctx.dry_run
                        && ctx.plan.verify_mode(&spec) == VerifyMode::Transferred,
                    files_from: None,
                    env: Vec::new(),
                    log: log.clone(),
                    progress: ProgressSink::new(ctx.store.clone(), &spec.name),
                },
                ctx.runner.clone(),
                ctx.store.clone(),
                stop.clone(),
            );
            let handle = set.spawn(async move {
                let outcome = pass.run().await;
                (outcome, now_ms(), log)
            });
            by_id.insert(handle.id(), i);
            results[i].started_ms = Some(started);
            st[i] = S::Running;
            running += 1;
        }
        if running == 0 {
            break;
        }
        let joined = tokio::select! {
            j = set.join_next_with_id() => j,
            _ = stopped(stop), if !interrupted => continue,
        };
        let Some(joined) = joined else { break };
        let (id, outcome, ended, log) = match joined {
            Ok((id, (o, ended, log))) => (id, Some(o), ended, Some(log)),
            Err(e) => {
                let o = if e.is_cancelled() {
                    PassOutcome::Interrupted
                } else {
                    PassOutcome::Failed("internal error: the pass panicked".into())
                };
                (e.id(), Some(o), now_ms(), None)
            }
        };
        let Some(i) = by_id.remove(&id) else { continue };
        running -= 1;
        st[i] = S::Finished;
        let outcome = outcome.unwrap_or(PassOutcome::Interrupted);
        let name = &tasks[i].name;
        let started = results[i].started_ms.unwrap_or(ended);
        let stats = match &outcome {
            PassOutcome::Ok(s) => s.clone(),
            _ => PassStats::default(),
        };
        let record = PassRecord {
            run: ctx.run,
            task: name.clone(),
            kind: kind.to_string(),
            started_ms: started,
            ended_ms: ended,
            files_changed: stats.files_changed,
            bytes_changed: stats.bytes_changed,
            bytes_literal: stats.bytes_literal,
            wire_bytes: stats.wire_bytes,
            entries_scanned: stats.entries_scanned,
            deleted: stats.deleted,
            outcome: match &outcome {
                PassOutcome::Ok(_) => Outcome::Ok,
                PassOutcome::Failed(m) => Outcome::Failed(m.clone()),
                _ => Outcome::Interrupted,
            },
        };
        if let Err(e) = ctx.store.record_pass(&record) {
            ctx.logs
                .summary(&format!("{name}: cannot record the pass: {e}"));
        }
        let secs = record.duration_s();
        let line = match &outcome {
            PassOutcome::Ok(s) => format!(
                "{kind} pass ok: {} files, {} changed ({} on the wire), {} deleted, {} scanned, in {secs:.2} s{}",
                s.files_changed,
                human_bytes(s.bytes_changed),
                human_bytes(s.wire_bytes),
                s.deleted,
                s.entries_scanned,
                if s.changed_during_copy.is_empty() {
                    String::new()
                } else {
                    format!("; {} changed while read", s.changed_during_copy.len())
                }
            ),
            PassOutcome::Failed(m) => format!("{kind} pass failed after {secs:.2} s: {m}"),
            _ => format!("{kind} pass interrupted after {secs:.2} s"),
        };
        // A pass whose task was aborted left no log handle behind; open the task's log
        // again so the interruption is recorded there too.
        let log = log.or_else(|| ctx.logs.task(name).ok());
        if let Some(l) = log.filter(|l| !l.echoes()) {
            l.line(&line);
        }
        ctx.logs.summary(&format!("{name}: {line}"));
        results[i].outcome = outcome;
        results[i].ended_ms = Some(ended);
    }
    RunReport {
        results,
        interrupted,
    }
}

/// After a final pass, for every task whose pass succeeded: its `verify_mode` comparison
/// (content hashes on both sides, through the runner), then its `verify` pair. A mismatch
/// fails the task (its pass stays recorded: the data moved, but is not what the source
/// has). Returns true when a stop request ended it (the task being verified is then
/// interrupted).
async fn verify_tasks(
    ctx: &Ctx<'_>,
    report: &mut RunReport,
    stop: &mut watch::Receiver<bool>,
) -> Result<bool, Error> {
    for r in &mut report.results {
        let Some(spec) = ctx.plan.task(&r.name) else {
            continue;
        };
        let PassOutcome::Ok(stats) = &r.outcome else {
            continue;
        };
        let mode = ctx.plan.verify_mode(spec);
        if mode == VerifyMode::None && spec.verify.is_none() {
            continue;
        }
        ctx.store.set_phase(ctx.run, &r.name, Phase::Verifying)?;
        ctx.logs.summary(&format!("{}: verify starts", r.name));
        let log = ctx.logs.task(&r.name).map_err(|source| Error::Log {
            path: ctx.plan.log_dir(),
            source,
        })?;
        let mut failures: Vec<String> = Vec::new();
        let only = (mode == VerifyMode::Transferred).then(|| stats.sent.clone());
        if mode == VerifyMode::None {
            // Only the `verify` pair below.
        } else if only.as_ref().is_some_and(|o| o.is_empty()) {
            log.line("verify_mode transferred: the final pass sent nothing; nothing to compare");
        } else {
            let what = match &only {
                Some(o) => format!("the {} entries the final pass sent", o.len()),
                None => "every file".into(),
            };
            log.line(&format!(
                "verify_mode {}: comparing content hashes of {what} on both sides",
                mode.as_str()
            ));
            let check = ctx.runner.verify(
                spec.clone(),
                PassContext {
                    base_dir: ctx.plan.base_dir.clone(),
                    kind: "verify".into(),
                    spool: ctx.plan.spool_path(spec),
                    dry_run: true,
                    collect_sent: false,
                    files_from: None,
                    env: Vec::new(),
                    log: log.clone(),
                    progress: ProgressSink::discard(),
                },
                only,
            );
            let found = tokio::select! {
                found = check => found,
                _ = stopped(stop) => {
                    let m = "interrupted during verification".to_string();
                    ctx.store.set_phase(ctx.run, &r.name, Phase::Interrupted)?;
                    log.line(&m);
                    ctx.logs.summary(&format!("{}: {m}", r.name));
                    r.verify = Some(Err(m));
                    return Ok(true);
                }
            };
            match found {
                Ok(m) if m.is_empty() => log.line(&format!(
                    "verify_mode {}: same content on both sides",
                    mode.as_str()
                )),
                Ok(m) => {
                    for x in &m {
                        log.line(&format!("mismatch: {}: {}", x.path, x.reason));
                    }
                    failures.push(format!(
                        "verify_mode {}: {} mismatch{} (first: {}: {})",
                        mode.as_str(),
                        m.len(),
                        if m.len() == 1 { "" } else { "es" },
                        m[0].path,
                        m[0].reason
                    ));
                    r.mismatches = m;
                }
                Err(e) => failures.push(format!(
                    "verify_mode {}: the comparison failed: {e}",
                    mode.as_str()
                )),
            }
        }
        if let Some(v) = &spec.verify {
            match verify_pair(ctx, &r.name, v, &log).await {
                Ok(()) => {}
                Err(m) => failures.push(m),
            }
        }
        let result = if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("; "))
        };
        match &result {
            Ok(()) => {
                ctx.store.set_phase(ctx.run, &r.name, Phase::Done)?;
                ctx.logs.summary(&format!("{}: verify ok", r.name));
            }
            Err(m) => {
                ctx.store.record_error(ctx.run, &r.name, m)?;
                ctx.store.set_phase(ctx.run, &r.name, Phase::Failed)?;
                log.line(m);
                ctx.logs.summary(&format!("{}: {m}", r.name));
            }
        }
        r.verify = Some(result);
    }
    Ok(false)
}

/// A task's `verify` pair: both commands' outputs must be identical.
async fn verify_pair(
    ctx: &Ctx<'_>,
    name: &str,
    v: &crate::file::VerifySpec,
    log: &crate::TaskLog,
) -> Result<(), String> {
    let dir = ctx.plan.log_dir();
    let out = |side: &str| dir.join(format!("verify-{name}.{side}.out"));
    let base = &ctx.plan.base_dir;
    let a = crate::spool::fingerprint_output("verify source", &v.source, base, &out("source"), log)
        .await;
    let b = crate::spool::fingerprint_output(
        "verify destination",
        &v.destination,
        base,
        &out("destination"),
        log,
    )
    .await;
    match (a, b) {
        (Ok((ha, n)), Ok((hb, _))) if ha == hb => {
            log.line(&format!("verify ok: both outputs are the same {n} bytes"));
            Ok(())
        }
        (Ok((_, na)), Ok((_, nb))) => Err(format!(
            "verify: the outputs differ (source {na} bytes, destination {nb} bytes); compare {} and {}",
            out("source").display(),
            out("destination").display()
        )),
        (Err(e), _) | (_, Err(e)) => Err(format!("verify: {e}")),
    }
}

/// The JSON error log of a run.
fn error_log(plan: &Plan, run: RunId, mode: &str, report: &RunReport) -> serde_json::Value {
    let failed: Vec<_> = report
        .results
        .iter()
        .filter_map(|r| match (&r.outcome, &r.verify) {
            (PassOutcome::Failed(m), _) | (_, Some(Err(m))) => Some(json!({
                "task": r.name,
                "error": m,
                "log": plan.log_dir().join(format!("{}.log", r.name)),
            })),
            _ => None,
        })
        .collect();
    let blocked: Vec<_> = report
        .results
        .iter()
        .filter_map(|r| match &r.outcome {
            PassOutcome::Blocked(d) => Some(json!({"task": r.name, "waiting_for": d})),
            _ => None,
        })
        .collect();
    let interrupted: Vec<_> = report
        .results
        .iter()
        .filter(|r| r.outcome == PassOutcome::Interrupted)
        .map(|r| r.name.clone())
        .collect();
    let rerun = report.to_rerun();
    json!({
        "plan": plan.path,
        "plan_name": plan.name,
        "run": run,
        "mode": mode,
        "at": stamp(now_ms()),
        "ok": report.ok(),
        "failed": failed,
        "blocked": blocked,
        "interrupted": interrupted,
        "rerun": rerun,
        "rerun_command": if rerun.is_empty() {
            serde_json::Value::Null
        } else {
            json!(format!("cutover plan rerun --failed {}", plan.path.display()))
        },
    })
}

/// Check what the runner alone understands, task by task; errors name line and key.
pub fn check(plan: &Plan, runner: &dyn TaskRunner) -> Result<(), crate::PlanError> {
    for (i, t) in plan.tasks.iter().enumerate() {
        runner.check(t).map_err(|e| plan.error_at_task_key(i, e))?;
    }
    Ok(())
}

/// Open the store and the logs for a run of `mode` (refusing a changed plan unless `force`
/// when `guard`), and register the run.
fn open<'a>(
    plan: &'a Plan,
    runner: Arc<dyn TaskRunner>,
    echo: Echo,
    mode: &str,
    guard: bool,
    force: bool,
) -> Result<Ctx<'a>, Error> {
    check(plan, runner.as_ref())?;
    let store = SqliteStore::open(&plan.state_db())?;
    if let Some(old) = store.fingerprint()? {
        if old != plan.fingerprint {
            if guard && !force {
                return Err(Error::Refused(format!(
                    "{}: the plan changed since the last run (fingerprint {} then, {} now); a {mode} would mix passes of two plans: run `cutover plan presync` with the new plan first, or pass --force",
                    plan.path.display(),
                    &old[..12.min(old.len())],
                    &plan.fingerprint[..12]
                )));
            }
            echo(&format!(
                "note: the plan changed since the last run (fingerprint {} then, {} now)",
                &old[..12.min(old.len())],
                &plan.fingerprint[..12]
            ));
        }
    }
    let names: Vec<&str> = plan.tasks.iter().map(|t| t.name.as_str()).collect();
    let run = store.begin_run(mode, &plan.fingerprint, &names)?;
    let logs = Logs::open(&plan.log_dir(), run, echo).map_err(|source| Error::Log {
        path: plan.log_dir(),
        source,
    })?;
    Ok(Ctx {
        plan,
        store: Arc::new(store),
        runner,
        logs,
        run,
        dry_run: false,
    })
}

/// End a run: outcome in the store, error log and report (JSON and Markdown) written, the
/// report's table shown. `notes` go into the report (downtime, hook failures). Returns the
/// error log's path.
async fn close(
    ctx: &Ctx<'_>,
    mode: &str,
    report: &RunReport,
    outcome: &str,
    notes: &[String],
) -> Result<Option<std::path::PathBuf>, Error> {
    ctx.store.end_run(ctx.run, outcome)?;
    let log_err = |source| Error::Log {
        path: ctx.plan.log_dir(),
        source,
    };
    let path = ctx
        .logs
        .write_error_log(&error_log(ctx.plan, ctx.run, mode, report), ctx.run)
        .map_err(log_err)?;
    let rows = crate::report::rows(report);
    if !rows.iter().all(|r| r.outcome == "not run") {
        for line in crate::report::table(&rows) {
            ctx.logs.say(&line);
        }
        for line in crate::report::mismatch_lines(&rows) {
            ctx.logs.say(&line);
        }
    }
    let header = json!({
        "plan": ctx.plan.path,
        "plan_name": ctx.plan.name,
        "run": ctx.run,
        "mode": mode,
        "outcome": outcome,
        "at": stamp(now_ms()),
        "notes": notes,
    });
    let title = format!(
        "cutover plan {mode}: {} (run {}, {outcome})",
        ctx.plan.name, ctx.run
    );
    let md = crate::report::to_markdown(&title, notes, &rows);
    let report_json = crate::report::to_json(&rows, header);
    if let Some((j, m)) = ctx
        .logs
        .write_report(ctx.run, &report_json, &md)
        .map_err(log_err)?
    {
        ctx.logs
            .say(&format!("report: {} and {}", j.display(), m.display()));
    }
    // Notify hooks get the report on stdin. They run even after Ctrl-C (that is when an
    // alert matters), bounded by their own timeouts, and never change the outcome.
    let (phase, hooks) = if matches!(outcome, "ok" | "ready") {
        ("on_success", &ctx.plan.on_success)
    } else {
        ("on_failure", &ctx.plan.on_failure)
    };
    let input = report_json.to_string();
    let (_keep, mut never) = watch::channel(false);
    let hooks_log = ctx.plan.log_dir().join("hooks.log");
    for h in hooks {
        let call = crate::hooks::HookCall {
            phase,
            plan_path: &ctx.plan.path,
            dir: &ctx.plan.base_dir,
            log: Some(&hooks_log),
            input: Some(input.as_bytes()),
            env: &[],
            task: None,
        };
        let r = crate::hooks::run_hook(h, &call, &mut never).await;
        if let Err(m) = r {
            let line = format!("{phase} hook {:?} failed: {m}", h.name);
            ctx.store.record_error(ctx.run, phase, &line)?;
            ctx.logs.summary(&line);
        }
    }
    if let Some(p) = &path {
        let rerun = report.to_rerun();
        if !rerun.is_empty() {
            ctx.logs.summary(&format!(
                "to re-run: {} (cutover plan rerun --failed {}); details in {}",
                rerun.join(", "),
                ctx.plan.path.display(),
                p.display()
            ));
        }
    }
    Ok(path)
}

/// `dry-run`: every task once with the engine's dry run, in dependency order; nothing is
/// written (the state lives in memory, task lines go to `echo`).
pub async fn dry_run(
    plan: &Plan,
    runner: Arc<dyn TaskRunner>,
    echo: Echo,
    mut stop: watch::Receiver<bool>,
) -> Result<RunReport, Error> {
    check(plan, runner.as_ref())?;
    let store = SqliteStore::in_memory()?;
    let names: Vec<&str> = plan.tasks.iter().map(|t| t.name.as_str()).collect();
    let run = store.begin_run("dry-run", &plan.fingerprint, &names)?;
    let ctx = Ctx {
        plan,
        store: Arc::new(store),
        runner,
        logs: Logs::console_only(echo),
        run,
        dry_run: true,
    };
    Ok(run_tasks(&ctx, "dry-run", None, &mut stop).await)
}

/// How a presync ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The predicted final pass fits the window.
    Ready,
    /// `max_passes` ran and the prediction still does not fit.
    NotReady,
    /// The passes asked for ran (no window given).
    Done,
    /// A task failed or was blocked.
    Failed,
    Interrupted,
}

#[derive(Debug, Clone)]
pub struct PresyncReport {
    pub verdict: Verdict,
    pub passes: u32,
    pub last: RunReport,
    pub prediction: Option<Prediction>,
    pub error_log: Option<std::path::PathBuf>,
    pub summary_log: Option<std::path::PathBuf>,
}

/// `presync`: passes of every task while the service is live, each followed by a
/// prediction of the final pass; with a window (`until_under`, else the plan's
/// `target_downtime`) it stops as soon as the prediction fits.
pub async fn presync(
    plan: &Plan,
    runner: Arc<dyn TaskRunner>,
    echo: Echo,
    until_under: Option<Duration>,
    max_passes: Option<u32>,
    mut stop: watch::Receiver<bool>,
) -> Result<PresyncReport, Error> {
    let window = until_under.or(plan.target_downtime);
    // With a window, keep going until it fits (bounded); without, one pass.
    let max = max_passes
        .unwrap_or(if window.is_some() { 10 } else { 1 })
        .max(1);
    let ctx = open(plan, runner, echo, "presync", false, false)?;
    ctx.logs.summary(&format!(
        "presync of plan {:?} ({} tasks, {} at once){}",
        plan.name,
        plan.tasks.len(),
        plan.parallel,
        window
            .map(|w| format!(
                ", until the final pass is predicted under {}",
                human_duration(w.as_secs_f64())
            ))
            .unwrap_or_default()
    ));
    let mut pass = 0;
    let (verdict, last, prediction) = loop {
        pass += 1;
        ctx.logs.summary(&format!("presync pass {pass} starts"));
        let started = now_ms();
        let report = run_tasks(&ctx, "presync", None, &mut stop).await;
        if report.interrupted {
            break (Verdict::Interrupted, report, None);
        }
        if !report.ok() {
            break (Verdict::Failed, report, None);
        }
        let (files, bytes) = report.changed();
        let prediction = predict(plan, ctx.store.as_ref())?;
        let secs = (now_ms() - started) as f64 / 1000.0;
        let predicted = prediction.total_s;
        if let Some(p) = predicted {
            ctx.store.set_prediction(ctx.run, p)?;
        }
        ctx.logs.summary(&format!(
            "presync pass {pass}: {files} files, {} changed in {}; predicted final pass: {}",
            human_bytes(bytes),
            human_duration(secs),
            predicted
                .map(human_duration)
                .unwrap_or_else(|| "unknown".into())
        ));
        match (window, predicted) {
            (Some(w), Some(p)) if p <= w.as_secs_f64() => {
                ctx.logs.summary(&format!(
                    "ready for cutover: the final pass is predicted to take {} (window {})",
                    human_duration(p),
                    human_duration(w.as_secs_f64())
                ));
                break (Verdict::Ready, report, Some(prediction));
            }
            _ if pass >= max => {
                if let Some(w) = window {
                    ctx.logs.summary(&format!(
                        "not ready after {pass} passes: the final pass is predicted to take {}, over the window of {}; run presync again or widen the window",
                        predicted.map(human_duration).unwrap_or_else(|| "unknown".into()),
                        human_duration(w.as_secs_f64())
                    ));
                    break (Verdict::NotReady, report, Some(prediction));
                }
                break (Verdict::Done, report, Some(prediction));
            }
            _ => {}
        }
    };
    let outcome = match verdict {
        Verdict::Ready => "ready",
        Verdict::NotReady => "not-ready",
        Verdict::Done => "ok",
        Verdict::Failed => "failed",
        Verdict::Interrupted => "interrupted",
    };
    // How far to trust the prediction, per task, on the terminal and in the report.
    let notes = prediction.as_ref().map(|p| p.lines()).unwrap_or_default();
    for line in &notes {
        ctx.logs.summary(line);
    }
    let error_log = close(&ctx, "presync", &last, outcome, &notes).await?;
    Ok(PresyncReport {
        verdict,
        passes: pass,
        last,
        prediction,
        error_log,
        summary_log: ctx.logs.summary_path().map(|p| p.to_path_buf()),
    })
}

/// How a cutover ended.
#[derive(Debug, Clone)]
pub struct CutoverReport {
    /// Hooks and final pass all succeeded (non-fatal hook failures aside).
    pub ok: bool,
    pub interrupted: bool,
    /// The fatal `pre_final` hook that stopped the cutover before any final pass.
    pub stopped_by: Option<String>,
    pub report: RunReport,
    pub predicted_s: Option<f64>,
    pub final_pass_s: Option<f64>,
    /// From the first `pre_final` hook to the end of the last `post_final` hook.
    pub downtime_s: f64,
}

/// Run one list of hooks; returns the first fatal failure, after recording every failure.
async fn run_hooks(
    ctx: &Ctx<'_>,
    phase: &str,
    hooks: &[crate::Hook],
    stop: &mut watch::Receiver<bool>,
    notes: &mut Vec<String>,
) -> Result<Option<String>, Error> {
    let log = ctx.plan.log_dir().join("hooks.log");
    for h in hooks {
        ctx.logs
            .summary(&format!("{phase} hook {:?} starts", h.name));
        let call = crate::hooks::HookCall {
            phase,
            plan_path: &ctx.plan.path,
            dir: &ctx.plan.base_dir,
            log: Some(&log),
            input: None,
            env: &[],
            task: None,
        };
        let r = crate::hooks::run_hook(h, &call, stop).await;
        match r {
            Ok(secs) => ctx.logs.summary(&format!(
                "{phase} hook {:?} ok in {}",
                h.name,
                human_duration(secs)
            )),
            Err(m) => {
                let line = format!(
                    "{phase} hook {:?} failed: {m} (output in {})",
                    h.name,
                    log.display()
                );
                ctx.store.record_error(ctx.run, phase, &line)?;
                notes.push(line.clone());
                if h.err_is_fatal || *stop.borrow() {
                    ctx.logs.summary(&line);
                    return Ok(Some(h.name.clone()));
                }
                ctx.logs
                    .summary(&format!("{line}; err_is_fatal = false, going on"));
            }
        }
    }
    Ok(None)
}

/// `cutover`: the `pre_final` hooks (a fatal failure stops everything before any final
/// pass), the final pass of every task (a file that changes during it fails the task),
/// then the `post_final` hooks; reports the downtime against the prediction. A plan
/// changed since the last run is refused unless `force`.
pub async fn cutover(
    plan: &Plan,
    runner: Arc<dyn TaskRunner>,
    echo: Echo,
    force: bool,
    mut stop: watch::Receiver<bool>,
) -> Result<CutoverReport, Error> {
    let ctx = open(plan, runner, echo, "cutover", true, force)?;
    let prediction = predict(plan, ctx.store.as_ref())?;
    let predicted_s = prediction.total_s;
    ctx.logs.summary(&format!(
        "cutover of plan {:?}: predicted final pass {}",
        plan.name,
        predicted_s
            .map(human_duration)
            .unwrap_or_else(|| "unknown (no successful presync of every task)".into())
    ));
    // After the notes about what happened, in the report: how far to trust the prediction.
    let confidence = prediction.lines();
    for line in &confidence {
        ctx.logs.summary(line);
    }
    let mut notes = Vec::new();
    let downtime = std::time::Instant::now();
    let mut out = CutoverReport {
        ok: false,
        interrupted: false,
        stopped_by: None,
        report: RunReport::default(),
        predicted_s,
        final_pass_s: None,
        downtime_s: 0.0,
    };
    if let Some(h) = run_hooks(&ctx, "pre_final", &plan.pre_final, &mut stop, &mut notes).await? {
        out.interrupted = *stop.borrow();
        out.stopped_by = Some(h);
        ctx.logs
            .summary("no final pass was started; the source side is as the hooks left it");
        out.downtime_s = downtime.elapsed().as_secs_f64();
        let outcome = if out.interrupted {
            "interrupted"
        } else {
            "failed"
        };
        notes.extend(confidence);
        close(&ctx, "cutover", &out.report, outcome, &notes).await?;
        return Ok(out);
    }
    let final_started = std::time::Instant::now();
    ctx.logs.summary("final pass starts");
    out.report = run_tasks(&ctx, "final", None, &mut stop).await;
    if !out.report.interrupted && verify_tasks(&ctx, &mut out.report, &mut stop).await? {
        out.report.interrupted = true;
    }
    let final_s = final_started.elapsed().as_secs_f64();
    out.final_pass_s = Some(final_s);
    out.interrupted = out.report.interrupted;
    let mut fatal = None;
    if out.report.ok() {
        fatal = run_hooks(&ctx, "post_final", &plan.post_final, &mut stop, &mut notes).await?;
        out.interrupted |= *stop.borrow();
    } else if !out.interrupted {
        ctx.logs.summary(
            "the final pass or its verification failed: post_final hooks were not run; fix the cause and run `cutover plan rerun --failed`, then the post_final steps by hand",
        );
    }
    out.downtime_s = downtime.elapsed().as_secs_f64();
    out.ok = out.report.ok() && fatal.is_none() && !out.interrupted;
    let vs = match predicted_s {
        Some(p) if p > 0.0 => format!(
            "predicted {}, {:+.0}%",
            human_duration(p),
            (final_s - p) / p * 100.0
        ),
        Some(p) => format!("predicted {}", human_duration(p)),
        None => "no prediction".into(),
    };
    let line = format!(
        "downtime {} (final pass {}, {vs})",
        human_duration(out.downtime_s),
        human_duration(final_s)
    );
    ctx.logs.summary(&line);
    notes.insert(0, line);
    let outcome = if out.interrupted {
        "interrupted"
    } else if out.ok {
        "ok"
    } else {
        "failed"
    };
    notes.extend(confidence);
    close(&ctx, "cutover", &out.report, outcome, &notes).await?;
    Ok(out)
}

/// `rerun --failed`: one pass of every task whose last pass failed, was blocked or was
/// interrupted (as the state store says), in dependency order; a final pass when it
/// finishes a cutover. A changed plan is refused unless `force`.
pub async fn rerun_failed(
    plan: &Plan,
    runner: Arc<dyn TaskRunner>,
    echo: Echo,
    force: bool,
    mut stop: watch::Receiver<bool>,
) -> Result<(RunReport, Vec<String>), Error> {
    let ctx = open(plan, runner, echo, "rerun", true, force)?;
    let states = ctx.store.tasks()?;
    // In plan order, as they will run; tasks the store knows but the plan dropped are out.
    let failed: Vec<String> = plan
        .tasks
        .iter()
        .filter(|t| {
            states
                .iter()
                .any(|s| s.name == t.name && s.phase.needs_rerun())
        })
        .map(|t| t.name.clone())
        .collect();
    if failed.is_empty() {
        ctx.logs
            .summary("nothing to re-run: the last pass of every task succeeded");
        let report = RunReport::default();
        close(&ctx, "rerun", &report, "ok", &[]).await?;
        return Ok((report, failed));
    }
    // Repeat the mode of the run that left them undone: re-running what a cutover's final
    // pass left undone is still a final pass (strict about files that change, and followed
    // by destination commands); what a presync left undone is not.
    let (from, repeats) = repeated_mode(ctx.store.as_ref(), &states, &failed)?;
    ctx.store.set_repeats(ctx.run, repeats)?;
    ctx.logs.summary(&format!(
        "cutover: rerunning the failed tasks of {} ({repeats})",
        from.map(|r| format!("run {r}"))
            .unwrap_or_else(|| "an earlier run".into())
    ));
    let after_cutover = repeats == "cutover";
    let kind = if after_cutover { "final" } else { "rerun" };
    ctx.logs.summary(&format!(
        "re-running {}{}",
        failed.join(", "),
        if after_cutover {
            " (as the final pass of the cutover)"
        } else {
            ""
        }
    ));
    let mut report = run_tasks(&ctx, kind, Some(&failed), &mut stop).await;
    if kind == "final" && !report.interrupted && verify_tasks(&ctx, &mut report, &mut stop).await? {
        report.interrupted = true;
    }
    let outcome = if report.interrupted {
        "interrupted"
    } else if report.ok() {
        "ok"
    } else {
        "failed"
    };
    close(&ctx, "rerun", &report, outcome, &[]).await?;
    Ok((report, failed))
}

/// The run a `rerun --failed` repeats and its mode (`presync` or `cutover`): the most recent
/// run that left one of `failed` failed, blocked or interrupted (the store keeps, per task,
/// the run that set its phase). A rerun repeats what its own run repeated. A run without
/// a recorded mode (a rerun recorded before schema 2) is a cutover when a pass it made of
/// one of `failed` was a final pass.
fn repeated_mode(
    store: &dyn Store,
    states: &[state::TaskState],
    failed: &[String],
) -> Result<(Option<RunId>, &'static str), Error> {
    let from = states
        .iter()
        .filter(|s| failed.contains(&s.name))
        .filter_map(|s| s.run)
        .max();
    let recorded = match from {
        Some(id) => store.run(id)?.and_then(|r| {
            if r.mode == "rerun" {
                r.repeats
            } else {
                Some(r.mode)
            }
        }),
        None => None,
    };
    let mode = match recorded.as_deref() {
        Some("cutover") => "cutover",
        Some("presync") => "presync",
        _ => {
            let mut final_pass = false;
            for name in failed {
                final_pass |= store
                    .passes(name)?
                    .iter()
                    .any(|p| from == Some(p.run) && p.kind == "final");
            }
            if final_pass {
                "cutover"
            } else {
                "presync"
            }
        }
    };
    Ok((from, mode))
}

/// What `status` shows, read from the state store without taking the runner's lock.
#[derive(Debug, Clone)]
pub struct Status {
    pub run: Option<state::RunInfo>,
    /// Whether the run's process is alive (a run without an end whose process is gone
    /// died without recording it).
    pub runner_alive: bool,
    pub plan_changed: bool,
    /// Tasks of the plan, in plan order (None: never run).
    pub tasks: Vec<(String, Option<state::TaskState>)>,
    pub prediction: Option<Prediction>,
}

pub fn status(plan: &Plan) -> Result<Status, Error> {
    let store = SqliteStore::open_read_only(&plan.state_db())?;
    let run = store.last_run()?;
    let runner_alive = run.as_ref().is_some_and(|r| {
        r.ended_ms.is_none() && std::path::Path::new(&format!("/proc/{}", r.pid)).exists()
    });
    let plan_changed = store.fingerprint()?.is_some_and(|f| f != plan.fingerprint);
    let all = store.tasks()?;
    let tasks = plan
        .tasks
        .iter()
        .map(|t| {
            (
                t.name.clone(),
                all.iter().find(|s| s.name == t.name).cloned(),
            )
        })
        .collect();
    let prediction = Some(predict(plan, &store)?);
    Ok(Status {
        run,
        runner_alive,
        plan_changed,
        tasks,
        prediction,
    })
}
