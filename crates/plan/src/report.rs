//! The end-of-run report: one row per task (outcome, files, bytes, wire bytes, duration,
//! verification) as a terminal table, and the same as JSON and Markdown files beside the logs,
//! with every mismatch verification found (path and reason).

use crate::run::{human_bytes, PassOutcome, RunReport};
use crate::Mismatch;
use serde_json::json;

/// One task's line of the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub task: String,
    /// `ok`, `failed`, `blocked`, `interrupted`, `not run`.
    pub outcome: String,
    pub files: u64,
    pub bytes: u64,
    pub wire_bytes: u64,
    pub seconds: Option<f64>,
    /// `ok`, `mismatch` (a `verify_mode` difference, the `verify` outputs differ, or the
    /// check could not run), or `-`.
    pub verify: String,
    /// Why it did not succeed.
    pub detail: Option<String>,
    /// Every difference `verify_mode` found.
    pub mismatches: Vec<Mismatch>,
}

/// How many mismatches the terminal shows; the JSON and Markdown reports list them all.
pub const TERMINAL_MISMATCHES: usize = 50;

pub fn rows(report: &RunReport) -> Vec<Row> {
    report
        .results
        .iter()
        .map(|r| {
            let (outcome, detail, s) = match &r.outcome {
                PassOutcome::Ok(s) => ("ok", None, Some(s)),
                PassOutcome::Failed(m) => ("failed", Some(m.clone()), None),
                PassOutcome::Blocked(d) => ("blocked", Some(format!("waits for {d}")), None),
                PassOutcome::Interrupted => ("interrupted", None, None),
                PassOutcome::NotRun => ("not run", None, None),
            };
            Row {
                task: r.name.clone(),
                outcome: outcome.into(),
                files: s.map_or(0, |s| s.files_changed),
                bytes: s.map_or(0, |s| s.bytes_changed),
                wire_bytes: s.map_or(0, |s| s.wire_bytes),
                seconds: r
                    .started_ms
                    .zip(r.ended_ms)
                    .map(|(a, b)| (b - a).max(0) as f64 / 1000.0),
                verify: match &r.verify {
                    None => "-".into(),
                    Some(Ok(())) => "ok".into(),
                    Some(Err(_)) if r.mismatches.is_empty() => "mismatch".into(),
                    Some(Err(_)) => format!("mismatch ({})", r.mismatches.len()),
                },
                mismatches: r.mismatches.clone(),
                detail: match &r.verify {
                    Some(Err(m)) => Some(m.clone()),
                    _ => detail,
                },
            }
        })
        .collect()
}

const HEAD: [&str; 7] = ["TASK", "RESULT", "FILES", "BYTES", "WIRE", "TIME", "VERIFY"];

fn cells(r: &Row) -> [String; 7] {
    [
        r.task.clone(),
        r.outcome.clone(),
        r.files.to_string(),
        human_bytes(r.bytes),
        human_bytes(r.wire_bytes),
        r.seconds.map_or("-".into(), |s| format!("{s:.2} s")),
        r.verify.clone(),
    ]
}

/// Mismatch lines for a terminal: `TASK: PATH: REASON`, at most [`TERMINAL_MISMATCHES`],
/// then how many more the report files hold.
pub fn mismatch_lines(rows: &[Row]) -> Vec<String> {
    let all: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            r.mismatches
                .iter()
                .map(move |m| format!("mismatch: {}: {}: {}", r.task, m.path, m.reason))
        })
        .collect();
    let more = all.len().saturating_sub(TERMINAL_MISMATCHES);
    let mut lines: Vec<String> = all.into_iter().take(TERMINAL_MISMATCHES).collect();
    if more > 0 {
        lines.push(format!(
            "... and {more} more mismatches (all of them are in the report files)"
        ));
    }
    lines
}

/// The table for a terminal, one string a line.
pub fn table(rows: &[Row]) -> Vec<String> {
    let all: Vec<[String; 7]> = std::iter::once(HEAD.map(String::from))
        .chain(rows.iter().map(cells))
        .collect();
    let mut w = [0usize; 7];
    for r in &all {
        for (w, c) in w.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    all.iter()
        .map(|r| {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate() {
                // Names and results left, numbers right.
                if i < 2 || i == 6 {
                    line.push_str(&format!("{c:<width$}  ", width = w[i]));
                } else {
                    line.push_str(&format!("{c:>width$}  ", width = w[i]));
                }
            }
            line.trim_end().to_string()
        })
        .collect()
}

pub fn to_json(rows: &[Row], header: serde_json::Value) -> serde_json::Value {
    let tasks: Vec<_> = rows
        .iter()
        .map(|r| {
            json!({
                "task": r.task,
                "result": r.outcome,
                "files_changed": r.files,
                "bytes_changed": r.bytes,
                "wire_bytes": r.wire_bytes,
                "duration_s": r.seconds,
                "verify": r.verify,
                "detail": r.detail,
                "mismatches": r.mismatches,
            })
        })
        .collect();
    let mut v = header;
    v["tasks"] = json!(tasks);
    v
}

/// Markdown: a title, `lines` as a list, the table, and the reasons of failures.
pub fn to_markdown(title: &str, lines: &[String], rows: &[Row]) -> String {
    let mut md = format!("# {title}\n\n");
    for l in lines {
        md.push_str(&format!("- {l}\n"));
    }
    md.push_str(
        "\n| task | result | files | bytes | wire | time | verify |\n|---|---|--:|--:|--:|--:|---|\n",
    );
    for r in rows {
        let c = cells(r);
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} |\n",
            c[0], c[1], c[2], c[3], c[4], c[5], c[6]
        ));
    }
    let problems: Vec<&Row> = rows.iter().filter(|r| r.detail.is_some()).collect();
    if !problems.is_empty() {
        md.push_str("\n## Problems\n\n");
        for r in problems {
            md.push_str(&format!(
                "- **{}**: {}\n",
                r.task,
                r.detail.as_deref().unwrap_or_default().replace('|', "\\|")
            ));
        }
    }
    if rows.iter().any(|r| !r.mismatches.is_empty()) {
        md.push_str("\n## Mismatches\n\n");
        for r in rows {
            for m in &r.mismatches {
                md.push_str(&format!(
                    "- **{}** `{}`: {}\n",
                    r.task,
                    m.path.replace('`', "'"),
                    m.reason
                ));
            }
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::TaskResult;
    use crate::PassStats;

    #[test]
    fn table_json_and_markdown_agree() {
        let report = RunReport {
            results: vec![
                TaskResult {
                    name: "docs".into(),
                    outcome: PassOutcome::Ok(PassStats {
                        files_changed: 12,
                        bytes_changed: 2048,
                        wire_bytes: 100,
                        ..Default::default()
                    }),
                    started_ms: Some(1000),
                    ended_ms: Some(3500),
                    verify: Some(Ok(())),
                    mismatches: Vec::new(),
                },
                TaskResult {
                    name: "db".into(),
                    outcome: PassOutcome::Failed("no | such".into()),
                    started_ms: Some(1000),
                    ended_ms: Some(1100),
                    verify: None,
                    mismatches: Vec::new(),
                },
                TaskResult {
                    name: "imgs".into(),
                    outcome: PassOutcome::Ok(PassStats::default()),
                    started_ms: Some(1000),
                    ended_ms: Some(2000),
                    verify: Some(Err("verify_mode full: 2 mismatches".into())),
                    mismatches: vec![
                        Mismatch {
                            path: "a/1.jpg".into(),
                            reason: "content differs".into(),
                        },
                        Mismatch {
                            path: "b`2.jpg".into(),
                            reason: "missing on the destination".into(),
                        },
                    ],
                },
            ],
            interrupted: false,
        };
        let r = rows(&report);
        let t = table(&r);
        assert_eq!(t[0], "TASK  RESULT  FILES    BYTES   WIRE    TIME  VERIFY");
        assert_eq!(t[1], "docs  ok         12  2.0 KiB  100 B  2.50 s  ok");
        let j = to_json(&r, json!({"mode": "cutover"}));
        assert_eq!(j["tasks"][0]["files_changed"], 12);
        assert_eq!(j["tasks"][1]["detail"], "no | such");
        assert_eq!(j["mode"], "cutover");
        let md = to_markdown("x", &["downtime 3 s".into()], &r);
        assert!(
            md.contains("| docs | ok | 12 | 2.0 KiB | 100 B | 2.50 s | ok |"),
            "{md}"
        );
        assert!(md.contains("- **db**: no \\| such"), "{md}");
        // Every mismatch, with its path and reason, in all three forms.
        assert!(t[3].ends_with("mismatch (2)"), "{}", t[3]);
        assert_eq!(
            mismatch_lines(&r),
            vec![
                "mismatch: imgs: a/1.jpg: content differs",
                "mismatch: imgs: b`2.jpg: missing on the destination"
            ]
        );
        assert_eq!(j["tasks"][2]["mismatches"][1]["path"], "b`2.jpg");
        assert_eq!(j["tasks"][2]["mismatches"][0]["reason"], "content differs");
        assert!(md.contains("## Mismatches"), "{md}");
        assert!(
            md.contains("- **imgs** `a/1.jpg`: content differs\n- **imgs** `b'2.jpg`: missing"),
            "{md}"
        );
    }
}
