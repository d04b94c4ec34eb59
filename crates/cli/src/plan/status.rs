//! `plan status`: the run, the prediction and each task's phase, progress, stamp and last
//! error, as a table or as one JSON object.

use super::*;

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

pub(super) fn print_status(plan: &Plan, s: &Status) {
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

pub(super) fn status_json(plan: &Plan, s: &Status) -> serde_json::Value {
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
