//! Prediction of the final pass's duration from the recorded passes.
//!
//! The model, per task, from its successful passes:
//! `duration = overhead + per_file × files_changed + per_byte × bytes_changed`, where
//! `overhead` is what every pass pays whatever it sends (scanning both sides, opening the
//! session, the final filesystem sync). The terms are fitted by least squares; with too few
//! passes, or when a term comes out negative (noise, or a rate limiter's initial burst),
//! a simpler model is fitted instead: overhead + bytes, overhead + files, bytes alone, files
//! alone; with nothing changed in any pass, the overhead is the shortest pass.
//! The final pass is assumed to find as much changed as the newest pass did, so
//! `predicted = overhead + per_file × files_last + per_byte × bytes_last`.
//!
//! A floor: a final pass can never be faster than its own walk of both sides and its
//! session set-up. The engine's summary does not time those apart from the transfer, so
//! the floor is the shortest successful pass (the least a pass was ever seen to cost,
//! hooks and `paths_from` included) and the prediction is never below it. Without the
//! floor, a model that fell back to a rate alone (no overhead term) predicted 0.0 s after
//! two passes of a live PostgreSQL directory whose second pass took 2.3 s for one file.
//!
//! Every model says how far to trust it: how many passes it was fitted to, which terms,
//! and how well they fit: R² and the residual's standard error relative to the mean pass
//! (both only when there were more passes than terms; with as many, any model fits
//! exactly and says nothing).
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
    /// `max(model's figure, floor_s)`.
    pub predicted_s: f64,
    /// Which terms were fitted, e.g. "overhead + per byte".
    pub fitted: &'static str,
    /// The shortest successful pass: no prediction is below it.
    pub floor_s: f64,
    /// The model's own figure was below the floor (the prediction is the floor).
    pub floored: bool,
    /// 1 − SS_res/SS_tot over the passes; None with no more passes than terms, or when
    /// every pass took as long.
    pub r2: Option<f64>,
    /// √(SS_res/(passes − terms)) / mean duration; None with no more passes than terms.
    pub rel_residual: Option<f64>,
    /// How a model that is not a fit was made (a `replica` task's measurements).
    pub note: Option<String>,
}

impl TaskModel {
    /// How far to trust it, for people: `overhead + per byte fitted to 4 passes (R² 0.98,
    /// residual ±5%)`, and when the floor applied, what the model said.
    pub fn confidence(&self) -> String {
        if let Some(n) = &self.note {
            return n.clone();
        }
        let passes = if self.passes == 1 {
            "1 pass".to_string()
        } else {
            format!("{} passes", self.passes)
        };
        let fit = match (self.r2, self.rel_residual) {
            (Some(r2), Some(res)) => format!("R² {r2:.2}, residual ±{:.0}%", res * 100.0),
            (None, Some(res)) => format!("residual ±{:.0}%", res * 100.0),
            _ => "exact: no more passes than terms, nothing to judge the fit by".into(),
        };
        let mut s = format!("{} fitted to {passes} ({fit})", self.fitted);
        if self.floored {
            s.push_str(&format!(
                "; the model said {}, raised to the floor of {} (the shortest pass)",
                crate::run::human_duration(self.modelled_s()),
                crate::run::human_duration(self.floor_s)
            ));
        }
        s
    }

    /// What the fitted terms alone give for the final pass (before the floor).
    pub fn modelled_s(&self) -> f64 {
        self.overhead_s
            + self.per_file_s * self.last_files as f64
            + self.per_byte_s * self.last_bytes as f64
    }
}

/// What each candidate model is called.
fn fitted_name(cols: &[usize]) -> &'static str {
    match cols {
        [0, 1, 2] => "overhead + per file + per byte",
        [0, 2] => "overhead + per byte",
        [0, 1] => "overhead + per file",
        [2] => "per byte only",
        [1] => "per file only",
        _ => "overhead only (the shortest pass)",
    }
}

/// Least squares for `duration ≈ Σ c_j · feature_j` over the features `cols` (0 = the
/// constant, 1 = files, 2 = bytes); None when the passes cannot determine them.
fn fit(x: &[[f64; 3]], d: &[f64], cols: &[usize]) -> Option<Vec<f64>> {
    let k = cols.len();
    // Scale each feature to about 1, so bytes (1e9) and the constant share one precision.
    let scale: Vec<f64> = cols
        .iter()
        .map(|&c| x.iter().map(|r| r[c].abs()).fold(0.0, f64::max))
        .collect();
    if scale.contains(&0.0) {
        return None;
    }
    // Normal equations, augmented: m = [AᵀA | Aᵀd].
    let mut m = vec![vec![0.0; k + 1]; k];
    for (r, &dv) in x.iter().zip(d) {
        let f: Vec<f64> = cols.iter().zip(&scale).map(|(&c, s)| r[c] / s).collect();
        for a in 0..k {
            for b in 0..k {
                m[a][b] += f[a] * f[b];
            }
            m[a][k] += f[a] * dv;
        }
    }
    // Gauss-Jordan with partial pivoting.
    for col in 0..k {
        let piv = (col..k).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
        if m[piv][col].abs() < 1e-9 {
            return None;
        }
        m.swap(col, piv);
        for row in 0..k {
            if row != col {
                let f = m[row][col] / m[col][col];
                let pivot_row = m[col].clone();
                for (cell, p) in m[row].iter_mut().zip(pivot_row).skip(col) {
                    *cell -= f * p;
                }
            }
        }
    }
    Some((0..k).map(|a| m[a][k] / m[a][a] / scale[a]).collect())
}

/// Fit the model to `passes` (any order; only successful ones count).
pub fn model(passes: &[PassRecord]) -> Option<TaskModel> {
    let ok: Vec<&PassRecord> = passes.iter().filter(|p| p.outcome == Outcome::Ok).collect();
    let last = *ok.last()?;
    let x: Vec<[f64; 3]> = ok
        .iter()
        .map(|p| [1.0, p.files_changed as f64, p.bytes_changed as f64])
        .collect();
    let d: Vec<f64> = ok.iter().map(|p| p.duration_s()).collect();
    // The richest model the passes support whose terms are all non-negative (a negative
    // overhead or cost is noise fitted, not a property of the task).
    let candidates: [&[usize]; 5] = [&[0, 1, 2], &[0, 2], &[0, 1], &[2], &[1]];
    let floor = d.iter().copied().fold(f64::INFINITY, f64::min);
    let mut coef = [0.0f64; 3];
    let mut chosen: &[usize] = &[0];
    let mut found = false;
    for cols in candidates {
        if ok.len() < cols.len() {
            continue;
        }
        if let Some(c) = fit(&x, &d, cols) {
            if c.iter().all(|&v| v >= -1e-9) {
                for (&col, v) in cols.iter().zip(c) {
                    coef[col] = v.max(0.0);
                }
                chosen = cols;
                found = true;
                break;
            }
        }
    }
    if !found {
        // Nothing changed in any pass: each pass is all overhead.
        coef[0] = floor;
    }
    let (r2, rel_residual) = goodness(&x, &d, &coef, chosen.len());
    let mut m = TaskModel {
        overhead_s: coef[0],
        per_file_s: coef[1],
        per_byte_s: coef[2],
        last_files: last.files_changed,
        last_bytes: last.bytes_changed,
        passes: ok.len(),
        predicted_s: 0.0,
        fitted: if found {
            fitted_name(chosen)
        } else {
            fitted_name(&[])
        },
        floor_s: floor,
        floored: false,
        r2,
        rel_residual,
        note: None,
    };
    let modelled = m.modelled_s();
    // A millisecond of slack: the overhead-only model *is* the floor.
    m.floored = modelled < floor - 1e-3;
    m.predicted_s = modelled.max(floor);
    Some(m)
}

/// R² and the relative residual of `coef` over the passes (`k` terms fitted).
fn goodness(x: &[[f64; 3]], d: &[f64], coef: &[f64; 3], k: usize) -> (Option<f64>, Option<f64>) {
    let n = d.len();
    if n <= k {
        return (None, None);
    }
    let mean = d.iter().sum::<f64>() / n as f64;
    let ss_res: f64 = x
        .iter()
        .zip(d)
        .map(|(r, &dv)| {
            let e = dv - (coef[0] * r[0] + coef[1] * r[1] + coef[2] * r[2]);
            e * e
        })
        .sum();
    let ss_tot: f64 = d.iter().map(|&dv| (dv - mean) * (dv - mean)).sum();
    let r2 = (ss_tot > 1e-12).then(|| 1.0 - ss_res / ss_tot);
    let rel = (mean > 0.0).then(|| (ss_res / (n - k) as f64).sqrt() / mean);
    (r2, rel)
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

impl Prediction {
    /// One line per task: its predicted final pass and how far to trust it (for the
    /// terminal and the report's notes).
    pub fn lines(&self) -> Vec<String> {
        self.tasks
            .iter()
            .map(|(name, m)| match m {
                Some(m) => format!(
                    "prediction for {name}: {}, {}",
                    crate::run::human_duration(m.predicted_s),
                    m.confidence()
                ),
                None => format!("prediction for {name}: none (no successful pass yet)"),
            })
            .collect()
    }
}

pub fn predict(plan: &Plan, store: &dyn Store) -> Result<Prediction, StateError> {
    let mut tasks = Vec::with_capacity(plan.tasks.len());
    for t in &plan.tasks {
        let m = if t.kind == crate::Kind::Replica {
            crate::replica::model(plan, &t.name)
        } else {
            model(&store.passes(&t.name)?)
        };
        tasks.push((t.name.clone(), m));
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
    fn a_negative_overhead_falls_back_to_a_rate() {
        // A limiter's burst makes the first MiB free: 8 MiB took 1.75 s, 4 MiB 0.75 s. The
        // line through both has a negative intercept; the fallback is a plain rate.
        let mib = 1u64 << 20;
        let m = model(&[pass(8, 8 * mib, 1.75), pass(4, 4 * mib, 0.75)]).unwrap();
        assert_eq!(m.overhead_s, 0.0);
        assert!((m.predicted_s - 0.85).abs() < 0.01, "{m:?}");
    }

    #[test]
    fn one_pass_predicts_itself_and_failures_do_not_count() {
        let mut failed = pass(1, 1, 99.0);
        failed.outcome = Outcome::Failed("x".into());
        let m = model(&[pass(5, 5000, 3.0), failed]).unwrap();
        assert!((m.predicted_s - 3.0).abs() < 1e-9, "{m:?}");
        assert!(model(&[]).is_none());
    }

    #[test]
    fn a_fit_without_overhead_never_predicts_below_the_shortest_pass() {
        // Two presync passes of a live PostgreSQL data directory (1023 entries): the first
        // copied everything in 1.2 s, the second took 2.3 s (files changing while read)
        // for one 8 KiB file. Both lines through the two passes slope down, so the fit
        // falls back to a rate alone, which put 0.0 s on an 8 KiB pass.
        let passes = [pass(1023, 41 << 20, 1.2), pass(1, 8 << 10, 2.3)];
        let m = model(&passes).unwrap();
        assert_eq!(m.fitted, "per byte only");
        assert!(m.modelled_s() < 0.01, "{m:?}");
        assert!(m.floored, "{m:?}");
        assert_eq!(m.floor_s, 1.2);
        assert!(m.predicted_s >= 1.2, "below the measured overhead: {m:?}");
        // And it says how little to trust it: two passes, one term, a poor fit.
        assert_eq!(m.passes, 2);
        assert!(m.rel_residual.unwrap() > 0.5, "{m:?}");
        let c = m.confidence();
        assert!(
            c.starts_with("per byte only fitted to 2 passes (R² "),
            "{c}"
        );
        assert!(
            c.ends_with("raised to the floor of 1.2 s (the shortest pass)"),
            "{c}"
        );
    }

    #[test]
    fn a_good_fit_says_so_and_an_exact_one_says_nothing() {
        let truth = |f: u64, b: u64| 2.0 + 0.01 * f as f64 + b as f64 / 100e6;
        let passes: Vec<PassRecord> = [(500, 100_000_000), (100, 50_000_000), (50, 1_000)]
            .iter()
            .map(|&(f, b)| pass(f, b, truth(f, b) * 1.01))
            .collect();
        let m = model(&passes).unwrap();
        // Three passes, three terms: exact.
        assert_eq!(m.fitted, "overhead + per file + per byte");
        assert_eq!((m.r2, m.rel_residual), (None, None));
        assert!(m.confidence().contains("exact"), "{}", m.confidence());
        let mut more = passes.clone();
        more.push(pass(200, 20_000_000, truth(200, 20_000_000) * 0.99));
        let m = model(&more).unwrap();
        assert!(m.r2.unwrap() > 0.99, "{m:?}");
        assert!(m.rel_residual.unwrap() < 0.05, "{m:?}");
        assert!(!m.floored);
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
