//! Ending a run: its outcome in the store, the error log and the report (JSON and
//! Markdown) written, the report's table shown, and the notify hooks run with the report.

use super::*;

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

/// End a run: outcome in the store, error log and report (JSON and Markdown) written, the
/// report's table shown. `notes` go into the report (downtime, hook failures). Returns the
/// error log's path.
pub(super) async fn close(
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
