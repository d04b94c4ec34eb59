//! Running a plan: the scheduler (every task in dependency order, at most `parallel` at
//! once, dependents of a failed task blocked, everything stopped on request), the record of
//! every pass in the state store, and the commands built on it: `dry-run`, `presync` (passes
//! until the predicted final pass fits), `cutover` (pre_final hooks, final pass, post_final
//! hooks, downtime against the prediction) and `rerun --failed`.

/// Resolves when `stop` becomes true (never, if its sender is gone); hooks wait alike.
pub(crate) use ::hooks::stopped;

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

mod close;
mod cutover;
mod presync;
mod rerun;
mod schedule;
mod verify;

use close::*;
pub use cutover::{cutover, CutoverReport};
pub use presync::{presync, PresyncReport, Verdict};
pub use rerun::rerun_failed;
use schedule::*;
use verify::*;

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
