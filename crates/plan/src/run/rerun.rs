//! `rerun --failed`: one more pass of the tasks whose last pass did not succeed, in the
//! mode of the run that left them undone.

use super::*;

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
