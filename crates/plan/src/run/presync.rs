//! `presync`: passes while the service is live, each followed by a prediction of the
//! final pass, until the prediction fits the window (or the passes asked for ran).

use super::*;

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
