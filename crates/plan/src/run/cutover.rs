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
