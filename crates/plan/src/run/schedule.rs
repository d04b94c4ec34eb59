//! The scheduler: the selected tasks once each, in dependency order, at most `parallel` at
//! once; dependents of a task that did not succeed are blocked, and a stop request ends the
//! running passes and interrupts what still waits. Every pass is recorded in the state
//! store, its task's log and the summary.

use super::*;
use crate::file::TaskSpec;
use crate::logs::TaskLog;

/// Where a task is in one run of the scheduler.
#[derive(Clone, PartialEq)]
enum S {
    Waiting,
    Running,
    Finished,
}

/// Run the tasks once (those in `only`, or all), in dependency order, at most
/// `plan.parallel` at once. A task whose dependency did not succeed in this run is blocked;
/// a dependency outside `only` counts as satisfied (it succeeded before).
pub(super) async fn run_tasks(
    ctx: &Ctx<'_>,
    kind: &str,
    only: Option<&[String]>,
    stop: &mut watch::Receiver<bool>,
) -> RunReport {
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
        block_dependents(ctx, &deps, &selected, &mut st, &mut results);
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
            let (started, pass) = start_pass(ctx, kind, &spec, &log, stop);
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
        let started = results[i].started_ms.unwrap_or(ended);
        record_pass(ctx, kind, &tasks[i].name, started, ended, &outcome, log);
        results[i].outcome = outcome;
        results[i].ended_ms = Some(ended);
    }
    RunReport {
        results,
        interrupted,
    }
}

/// Block whatever waits on a dependency that did not succeed, until nothing changes (a
/// blocked task blocks its own dependents in turn).
fn block_dependents(
    ctx: &Ctx<'_>,
    deps: &[Vec<usize>],
    selected: &[bool],
    st: &mut [S],
    results: &mut [TaskResult],
) {
    let tasks = &ctx.plan.tasks;
    let n = tasks.len();
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
}

/// A task's pass begins: its phase in the store, a line in its log and in the summary,
/// and the pass itself (hooks, paths_from and the sync), which ends itself when `stop`
/// turns. Returns when it started, and the pass to run.
fn start_pass(
    ctx: &Ctx<'_>,
    kind: &str,
    spec: &TaskSpec,
    log: &TaskLog,
    stop: &watch::Receiver<bool>,
) -> (Millis, Pass) {
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
        spec,
        kind,
        PassContext {
            base_dir: ctx.plan.base_dir.clone(),
            kind: kind.to_string(),
            spool: ctx.plan.spool_path(spec),
            dry_run: ctx.dry_run,
            collect_sent: kind == "final"
                && !ctx.dry_run
                && ctx.plan.verify_mode(spec) == VerifyMode::Transferred,
            files_from: None,
            env: Vec::new(),
            log: log.clone(),
            progress: ProgressSink::new(ctx.store.clone(), &spec.name),
        },
        ctx.runner.clone(),
        ctx.store.clone(),
        stop.clone(),
    );
    (started, pass)
}

/// A pass ended: record it in the state store, and say how it went in its task's log and
/// in the summary.
fn record_pass(
    ctx: &Ctx<'_>,
    kind: &str,
    name: &str,
    started: Millis,
    ended: Millis,
    outcome: &PassOutcome,
    log: Option<TaskLog>,
) {
    let stats = match outcome {
        PassOutcome::Ok(s) => s.clone(),
        _ => PassStats::default(),
    };
    let record = PassRecord {
        run: ctx.run,
        task: name.to_string(),
        kind: kind.to_string(),
        started_ms: started,
        ended_ms: ended,
        files_changed: stats.files_changed,
        bytes_changed: stats.bytes_changed,
        bytes_literal: stats.bytes_literal,
        wire_bytes: stats.wire_bytes,
        entries_scanned: stats.entries_scanned,
        deleted: stats.deleted,
        outcome: match outcome {
            PassOutcome::Ok(_) => Outcome::Ok,
            PassOutcome::Failed(m) => Outcome::Failed(m.clone()),
            _ => Outcome::Interrupted,
        },
    };
    if let (Some(m), false) = (&stats.replica, ctx.dry_run) {
        if let Err(e) = crate::replica::save(ctx.plan, name, m) {
            ctx.logs.summary(&format!(
                "{name}: cannot keep the measurements in {}: {e}",
                crate::replica::path(ctx.plan, name).display()
            ));
        }
    }
    if let Err(e) = ctx.store.record_pass(&record) {
        ctx.logs
            .summary(&format!("{name}: cannot record the pass: {e}"));
    }
    let secs = record.duration_s();
    let line = match outcome {
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
}
