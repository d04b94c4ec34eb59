//! `cutover`: the `pre_final` hooks, the final pass with its verification, the
//! `post_final` hooks, and the downtime against the prediction.

use super::*;

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

/// Every `replica` task's prediction made again now, before the `pre_final` hooks stop the
/// application: what it wrote since presync is verified by the final pass too, and the
/// link's lag is the one the drain starts from. A task whose daemon cannot be asked keeps
/// its presync's prediction, with one line saying so.
async fn refresh_replicas(plan: &Plan, runner: &dyn TaskRunner, logs: &Logs) {
    for t in plan.tasks.iter().filter(|t| t.kind == crate::Kind::Replica) {
        let Some(kept) = crate::replica::load(plan, &t.name) else {
            continue;
        };
        let why = match runner
            .refresh_replica(t.clone(), plan.base_dir.clone(), kept)
            .await
        {
            Ok(None) => continue,
            Ok(Some(m)) => match crate::replica::save(plan, &t.name, &m) {
                Ok(()) => continue,
                Err(e) => format!(
                    "cannot keep it in {}: {e}",
                    crate::replica::path(plan, &t.name).display()
                ),
            },
            Err(e) => e,
        };
        logs.summary(&format!(
            "prediction for {}: not made again at the cutover's start ({why}); the kept one stands",
            t.name
        ));
    }
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
    refresh_replicas(plan, ctx.runner.as_ref(), &ctx.logs).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::{Link, Made, ReplicaMeasure};
    use crate::TaskSpec;
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// Answers a refresh with the link in step and `Ok(verify bytes)`, or `Err`.
    struct Refresher(Result<u64, String>);

    impl TaskRunner for Refresher {
        crate::passes::tests::runs_nothing!();
        fn refresh_replica(
            &self,
            _: TaskSpec,
            _: PathBuf,
            kept: ReplicaMeasure,
        ) -> crate::BoxFuture<Result<Option<ReplicaMeasure>, String>> {
            let link = Link {
                connection: "connected".into(),
                in_step: true,
                ..Link::default()
            };
            let r = self
                .0
                .clone()
                .map(|b| Some(kept.at_cutover_start(&link, b)));
            Box::pin(async move { r })
        }
    }

    /// A plan with a replica task and a tree task, its presync measurements kept.
    fn plan_with_presync(dir: &Path) -> (Plan, ReplicaMeasure) {
        let text = "[[task]]\nname = \"v\"\nkind = \"replica\"\nsource = \"volume:v\"\n\
                    destination = \"b\"\n[[task]]\nname = \"t\"\nkind = \"tree\"\n\
                    source = \"s\"\ndestination = \"d\"\n";
        let plan = Plan::parse(&dir.join("p.toml"), text.to_string()).unwrap();
        let link = Link {
            connection: "connected".into(),
            in_step: true,
            ..Link::default()
        };
        let presync = ReplicaMeasure::predict(&link, 0, "", 1 << 20, 10);
        crate::replica::save(&plan, "v", &presync).unwrap();
        (plan, presync)
    }

    fn collecting() -> (Logs, Arc<Mutex<Vec<String>>>) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        let echo: Echo = Arc::new(move |s: &str| l.lock().unwrap().push(s.to_string()));
        (Logs::console_only(echo), lines)
    }

    #[tokio::test]
    async fn a_replica_prediction_is_made_again_at_the_cutovers_start() {
        let dir = tempfile::tempdir().unwrap();
        let (plan, _) = plan_with_presync(dir.path());
        let (logs, lines) = collecting();
        refresh_replicas(&plan, &Refresher(Ok(3 << 20)), &logs).await;
        let m = crate::replica::load(&plan, "v").unwrap();
        assert_eq!(
            (m.made, m.verify_bytes, m.verify_ms),
            (Made::CutoverStart, 3 << 20, 3000)
        );
        assert!(lines.lock().unwrap().is_empty());
        let store = state::SqliteStore::in_memory().unwrap();
        let p = predict(&plan, &store).unwrap();
        assert!(
            p.lines()[0].starts_with("prediction for v: 3.5 s, at the cutover's start: "),
            "{:?}",
            p.lines()
        );
    }

    #[tokio::test]
    async fn a_daemon_that_cannot_be_asked_leaves_the_presync_prediction() {
        let dir = tempfile::tempdir().unwrap();
        let (plan, presync) = plan_with_presync(dir.path());
        let (logs, lines) = collecting();
        refresh_replicas(
            &plan,
            &Refresher(Err("source: connection refused".into())),
            &logs,
        )
        .await;
        assert_eq!(crate::replica::load(&plan, "v"), Some(presync.clone()));
        assert_eq!(
            *lines.lock().unwrap(),
            ["prediction for v: not made again at the cutover's start (source: connection refused); the kept one stands"]
        );
        // A runner that refreshes nothing (the trait's default) leaves it too, silently.
        let (logs, lines) = collecting();
        refresh_replicas(&plan, &crate::passes::tests::NoRunner, &logs).await;
        assert_eq!(crate::replica::load(&plan, "v"), Some(presync));
        assert!(lines.lock().unwrap().is_empty());
    }
}
