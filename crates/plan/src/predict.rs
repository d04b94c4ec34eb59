//! Prediction of the final pass's duration from the recorded passes.
//!
//! The model, per task, from its successful passes:
//! - `overhead` = the shortest pass's duration: scanning both sides, opening the session and
//!   the final filesystem sync, which the final pass pays too, whatever it sends;
//! - the rest of each pass, `duration − overhead`, is fitted (least squares, no intercept)
//!   as `per_file × files_changed + per_byte × bytes_changed`; when the passes cannot tell
//!   the two apart (too few, or a negative coefficient) all of it is put on bytes (or on
//!   files when no pass moved bytes);
//! - the final pass is assumed to find as much changed as the newest pass did, so
//!   `predicted = overhead + per_file × files_last + per_byte × bytes_last`.
//!
//! The plan's prediction schedules every task's predicted duration the way the runner
//! would (dependency order, at most `parallel` at once, ready tasks in file order) and
//! takes the time the last one ends.

use crate::file::Plan;
use crate::graph;
use state::{Outcome, PassRecord, StateError, Store};

/// What the model made of one task's passes.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskModel {
    pub overhead_s: f64,
    pub per_file_s: f64,
    pub per_byte_s: f64,
    pub last_files: u64,
    pub last_bytes: u64,
    pub passes: usize,
    pub predicted_s: f64,
}

/// Fit the model to `passes` (any order; only successful ones count).
pub fn model(passes: &[PassRecord]) -> Option<TaskModel> {
    let ok: Vec<&PassRecord> = passes.iter().filter(|p| p.outcome == Outcome::Ok).collect();
    let last = *ok.last()?;
    let overhead = ok
        .iter()
        .map(|p| p.duration_s())
        .fold(f64::INFINITY, f64::min);
    let (mut ff, mut fb, mut bb, mut fx, mut bx) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for p in &ok {
        let (f, b, x) = (
            p.files_changed as f64,
            p.bytes_changed as f64,
            (p.duration_s() - overhead).max(0.0),
        );
        ff += f * f;
        fb += f * b;
        bb += b * b;
        fx += f * x;
        bx += b * x;
    }
    let det = ff * bb - fb * fb;
    let two = if det > 1e-9 * ff * bb && det > 0.0 {
        let pf = (fx * bb - bx * fb) / det;
        let pb = (bx * ff - fx * fb) / det;
        (pf >= 0.0 && pb >= 0.0).then_some((pf, pb))
    } else {
        None
    };
    let (per_file, per_byte) = match two {
        Some(v) => v,
        None if bb > 0.0 => (0.0, bx / bb),
        None if ff > 0.0 => (fx / ff, 0.0),
        None => (0.0, 0.0),
    };
    let predicted =
        overhead + per_file * last.files_changed as f64 + per_byte * last.bytes_changed as f64;
    Some(TaskModel {
        overhead_s: overhead,
        per_file_s: per_file,
        per_byte_s: per_byte,
        last_files: last.files_changed,
        last_bytes: last.bytes_changed,
        passes: ok.len(),
        predicted_s: predicted,
    })
}

/// When every task would end if each took `durations[i]`, scheduled like the runner does.
pub fn makespan(plan: &Plan, durations: &[f64]) -> f64 {
    let n = plan.tasks.len();
    let deps: Vec<Vec<usize>> = (0..n)
        .map(|i| graph::dependencies(&plan.tasks, i))
        .collect();
    let mut end: Vec<Option<f64>> = vec![None; n];
    let mut started = vec![false; n];
    let mut running: Vec<(usize, f64)> = Vec::new();
    let mut now = 0.0f64;
    loop {
        for i in 0..n {
            if running.len() >= plan.parallel.max(1) {
                break;
            }
            if !started[i] && deps[i].iter().all(|&d| end[d].is_some_and(|e| e <= now)) {
                started[i] = true;
                running.push((i, now + durations.get(i).copied().unwrap_or(0.0)));
            }
        }
        // The next task to end moves the clock.
        let Some(k) = running
            .iter()
            .enumerate()
            .min_by(|a, b| a.1 .1.total_cmp(&b.1 .1))
            .map(|(k, _)| k)
        else {
            break;
        };
        let (i, t) = running.swap_remove(k);
        now = t;
        end[i] = Some(t);
    }
    end.iter().flatten().fold(0.0, |a: f64, &b| a.max(b))
}

/// The prediction for a whole plan.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// Per task (plan order): its model, or None before its first successful pass.
    pub tasks: Vec<(String, Option<TaskModel>)>,
    /// The plan's predicted final pass, once every task has a model.
    pub total_s: Option<f64>,
}

pub fn predict(plan: &Plan, store: &dyn Store) -> Result<Prediction, StateError> {
    let mut tasks = Vec::with_capacity(plan.tasks.len());
    for t in &plan.tasks {
        tasks.push((t.name.clone(), model(&store.passes(&t.name)?)));
    }
    let total_s = tasks
        .iter()
        .map(|(_, m)| m.as_ref().map(|m| m.predicted_s))
        .collect::<Option<Vec<f64>>>()
        .map(|d| makespan(plan, &d));
    Ok(Prediction { tasks, total_s })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn pass(files: u64, bytes: u64, secs: f64) -> PassRecord {
        PassRecord {
            run: 1,
            task: "t".into(),
            kind: "presync".into(),
            started_ms: 0,
            ended_ms: (secs * 1000.0) as i64,
            files_changed: files,
            bytes_changed: bytes,
            bytes_literal: bytes,
            wire_bytes: 0,
            entries_scanned: 0,
            deleted: 0,
            outcome: Outcome::Ok,
        }
    }

    #[test]
    fn recovers_a_synthetic_cost_model() {
        // duration = 2 s + 10 ms a file + 1 s per 100 MB
        let truth = |f: u64, b: u64| 2.0 + 0.01 * f as f64 + b as f64 / 100e6;
        let passes: Vec<PassRecord> = [
            (10_000, 5_000_000_000),
            (800, 40_000_000),
            (100, 900_000_000),
            (0, 0),
        ]
        .iter()
        .map(|&(f, b)| pass(f, b, truth(f, b)))
        .collect();
        let m = model(&passes).unwrap();
        // The shortest pass changed nothing: overhead is exact, and so is the rest.
        assert!((m.overhead_s - 2.0).abs() < 1e-3, "{m:?}");
        assert!((m.per_file_s - 0.01).abs() < 1e-5, "{m:?}");
        assert!((m.per_byte_s * 100e6 - 1.0).abs() < 1e-3, "{m:?}");
        assert!(
            (m.predicted_s - 2.0).abs() < 1e-3,
            "last pass changed nothing: {m:?}"
        );
        let mut more = passes.clone();
        more.push(pass(300, 60_000_000, truth(300, 60_000_000)));
        let m = model(&more).unwrap();
        assert!(
            (m.predicted_s - truth(300, 60_000_000)).abs() < 0.01,
            "{m:?}"
        );
    }

    #[test]
    fn one_pass_predicts_itself_and_failures_do_not_count() {
        let mut failed = pass(1, 1, 99.0);
        failed.outcome = Outcome::Failed("x".into());
        let m = model(&[pass(5, 5000, 3.0), failed]).unwrap();
        assert_eq!(m.predicted_s, 3.0);
        assert!(model(&[]).is_none());
    }

    #[test]
    fn makespan_respects_dependencies_and_the_limit() {
        let text = r#"
parallel = 2
[[task]]
name = "a"
kind = "tree"
source = "s"
destination = "d"
[[task]]
name = "b"
kind = "tree"
source = "s"
destination = "d"
[[task]]
name = "c"
kind = "tree"
source = "s"
destination = "d"
depends_on = ["a"]
[[task]]
name = "d"
kind = "tree"
source = "s"
destination = "d"
"#;
        let plan = Plan::parse(Path::new("p.toml"), text.to_string()).unwrap();
        // a(3) and b(1) start; b ends at 1, d(1) takes its slot until 2; a ends at 3,
        // then c(2) until 5.
        assert_eq!(makespan(&plan, &[3.0, 1.0, 2.0, 1.0]), 5.0);
        let mut one = plan.clone();
        one.parallel = 1;
        assert_eq!(makespan(&one, &[3.0, 1.0, 2.0, 1.0]), 7.0);
    }
}
