//! What a presync pass of a `replica` task measured, kept beside the state store as
//! `<state_dir>/replica/<task>.json`, and the prediction of its cutover made from it:
//! `drain + verify + demote/promote`, never a fit over passes (a presync pass of a replica
//! task moves nothing; the link does, all the time).

use crate::file::Plan;
use crate::predict::TaskModel;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// One presync pass's measurements of a replica task.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaMeasure {
    /// What the source daemon said about its link to the destination.
    pub out_of_sync_bytes: u64,
    pub lag_bytes: u64,
    pub lag_ms: u64,
    pub resync_rate: u64,
    /// A resync still has work: the destination is not in step, no prediction yet.
    pub resyncing: bool,
    /// The drain's predicted time; None when it cannot be said (a resync without a rate).
    pub drain_ms: Option<u64>,
    /// How the drain was predicted, for people.
    pub drain_by: String,
    /// Bytes the cutover's verify reads on each side, and their time at the hash rate this
    /// pass measured on the source.
    pub verify_bytes: u64,
    pub verify_ms: u64,
    /// Demote and promote: estimated from this pass's control round trips to both daemons
    /// and a superblock write (`mark`), until a cutover measured them (`switch_ms`).
    pub fixed_ms: u64,
    /// Demote and promote as the last cutover of this task measured them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_ms: Option<u64>,
}

impl ReplicaMeasure {
    /// The cutover's predicted duration (ms), once the destination is in step.
    pub fn predicted_ms(&self) -> Option<u64> {
        if self.resyncing {
            return None;
        }
        Some(self.drain_ms? + self.verify_ms + self.switch_ms.unwrap_or(self.fixed_ms))
    }

    /// How the prediction was made, one line.
    pub fn explain(&self) -> String {
        let ms = |m: u64| crate::run::human_duration(m as f64 / 1000.0);
        let drain = match self.drain_ms {
            Some(d) => format!("drain {} ({})", ms(d), self.drain_by),
            None => format!("drain unknown ({})", self.drain_by),
        };
        let switch = match self.switch_ms {
            Some(s) => format!("demote + promote {} (measured at the last cutover)", ms(s)),
            None => format!(
                "demote + promote {} (estimated from control round trips)",
                ms(self.fixed_ms)
            ),
        };
        format!(
            "{drain} + verify {} ({}) + {switch}; {} out of sync, lag {} ({})",
            ms(self.verify_ms),
            crate::run::human_bytes(self.verify_bytes),
            crate::run::human_bytes(self.out_of_sync_bytes),
            crate::run::human_bytes(self.lag_bytes),
            ms(self.lag_ms)
        )
    }
}

/// Where a task's measurements are kept.
pub fn path(plan: &Plan, task: &str) -> PathBuf {
    plan.state_dir.join("replica").join(format!("{task}.json"))
}

/// The task's last measurements, if any (a damaged file counts as none: the next
/// presync pass writes it again).
pub fn load(plan: &Plan, task: &str) -> Option<ReplicaMeasure> {
    let text = std::fs::read_to_string(path(plan, task)).ok()?;
    serde_json::from_str(&text).ok()
}

/// Keep `m` as the task's measurements; a demote/promote time measured earlier is kept
/// unless `m` brings one.
pub fn save(plan: &Plan, task: &str, m: &ReplicaMeasure) -> std::io::Result<()> {
    let mut m = m.clone();
    if m.switch_ms.is_none() {
        m.switch_ms = load(plan, task).and_then(|old| old.switch_ms);
    }
    let p = path(plan, task);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = p.with_extension("json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec_pretty(&m).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(tmp, p)
}

/// The model of a replica task: its last measurements' prediction, with how it was made.
pub fn model(plan: &Plan, task: &str) -> Option<TaskModel> {
    let m = load(plan, task)?;
    let predicted_s = m.predicted_ms()? as f64 / 1000.0;
    Some(TaskModel {
        overhead_s: m.switch_ms.unwrap_or(m.fixed_ms) as f64 / 1000.0,
        per_file_s: 0.0,
        per_byte_s: 0.0,
        last_files: 0,
        last_bytes: m.out_of_sync_bytes + m.lag_bytes,
        passes: 1,
        predicted_s,
        fitted: "drain + verify + demote/promote",
        floor_s: 0.0,
        floored: false,
        r2: None,
        rel_residual: None,
        note: Some(m.explain()),
    })
}
