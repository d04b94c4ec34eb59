//! What a presync pass of a `replica` task measured, kept beside the state store as
//! `<state_dir>/replica/<task>.json`, and the prediction of its cutover made from it:
//! `drain + verify + demote/promote`, never a fit over passes (a presync pass of a replica
//! task moves nothing; the link does, all the time).
//!
//! The application keeps writing between presync and cutover, so a cutover makes the
//! prediction again at its start, before its `pre_final` hooks: the link and the bytes to
//! verify as the source daemon reports them then, at the rates and with the demote/promote
//! time presync measured ([`ReplicaMeasure::at_cutover_start`]).

use crate::file::Plan;
use crate::predict::TaskModel;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The peer makes applied writes durable at least this often (the drain's tail), in ms.
pub const PEER_FLUSH_MS: u64 = 500;

/// When a [`ReplicaMeasure`] was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Made {
    /// By a presync pass: the link then, a verify timed then.
    #[default]
    Presync,
    /// At a cutover's start, before its `pre_final` hooks: the link and the bytes to verify
    /// then, the verify rate and demote/promote as presync measured them.
    CutoverStart,
    /// By a cutover's final pass: what each step took (not a prediction).
    Cutover,
}

/// What the source daemon says about its link to the destination, as a prediction needs it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Link {
    /// "connected", "connecting", "disconnected", …
    pub connection: String,
    /// Connected, the source sending, the peer up to date, no resync left.
    pub in_step: bool,
    pub out_of_sync_bytes: u64,
    pub lag_bytes: u64,
    pub lag_ms: u64,
    pub resync_rate: u64,
}

impl Link {
    /// The drain's predicted time (None when it cannot be said), and how it was predicted.
    pub fn drain(&self) -> (Option<u64>, String) {
        if self.in_step {
            (
                Some(self.lag_ms + PEER_FLUSH_MS),
                "the stream's lag plus the peer's flush interval".into(),
            )
        } else if self.connection != "connected" {
            (None, format!("the link is {}", self.connection))
        } else if let Some(d) = (self.out_of_sync_bytes * 1000).checked_div(self.resync_rate) {
            (
                Some(d),
                format!(
                    "{} out of sync at the resync rate, {}/s",
                    crate::run::human_bytes(self.out_of_sync_bytes),
                    crate::run::human_bytes(self.resync_rate)
                ),
            )
        } else {
            (None, "a resync without a rate yet".into())
        }
    }
}

/// One presync pass's measurements of a replica task (or a cutover's, see [`Made`]).
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
    /// Bytes the cutover's verify reads on each side, and their time at `verify_rate`.
    pub verify_bytes: u64,
    pub verify_ms: u64,
    /// Bytes a verify compares a second, both daemons hashing in turn as the cutover's
    /// does, as presync timed it (0: not measured, files of older versions).
    #[serde(default)]
    pub verify_rate: u64,
    /// Which bytes the verify compares, for people ("written since the presync mark").
    #[serde(default)]
    pub verify_by: String,
    /// Demote and promote: estimated from this pass's control round trips to both daemons
    /// and a superblock write (`mark`), until a cutover measured them (`switch_ms`).
    pub fixed_ms: u64,
    /// Demote and promote as the last cutover of this task measured them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub switch_ms: Option<u64>,
    #[serde(default)]
    pub made: Made,
    /// A cutover's measurements: the prediction that cutover was compared against.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub predicted: Option<Box<ReplicaMeasure>>,
}

/// `bytes` at `rate` bytes/s in ms; None without a rate for bytes to read.
fn at_rate(bytes: u64, rate: u64) -> Option<u64> {
    if bytes == 0 {
        return Some(0);
    }
    (rate > 0).then(|| (bytes as u128 * 1000 / rate as u128) as u64)
}

impl ReplicaMeasure {
    /// A presync pass's prediction: the `link` now, a verify of `verify_bytes` (which ones:
    /// `verify_by`) at `verify_rate` bytes/s, demote + promote in `fixed_ms`.
    pub fn predict(
        link: &Link,
        verify_bytes: u64,
        verify_by: &str,
        verify_rate: u64,
        fixed_ms: u64,
    ) -> ReplicaMeasure {
        let (drain_ms, drain_by) = link.drain();
        ReplicaMeasure {
            out_of_sync_bytes: link.out_of_sync_bytes,
            lag_bytes: link.lag_bytes,
            lag_ms: link.lag_ms,
            resync_rate: link.resync_rate,
            resyncing: !link.in_step,
            drain_ms,
            drain_by,
            verify_bytes,
            verify_ms: at_rate(verify_bytes, verify_rate).unwrap_or(0),
            verify_rate,
            verify_by: verify_by.to_string(),
            fixed_ms,
            switch_ms: None,
            made: Made::Presync,
            predicted: None,
        }
    }

    /// This prediction made again at a cutover's start from the source daemon's view now:
    /// the `link` and the `verify_bytes` the verify will compare (what the application
    /// wrote since presync included), at the verify rate and with the demote/promote time
    /// kept here. Without a kept rate (a file of an older version) the verify stays as it
    /// was predicted, and says so.
    pub fn at_cutover_start(&self, link: &Link, verify_bytes: u64) -> ReplicaMeasure {
        let mut m = ReplicaMeasure::predict(
            link,
            verify_bytes,
            &self.verify_by,
            self.verify_rate,
            self.fixed_ms,
        );
        if at_rate(verify_bytes, self.verify_rate).is_none() {
            m.verify_bytes = self.verify_bytes;
            m.verify_ms = self.verify_ms;
            m.verify_by = "as presync said: it kept no verify rate; run presync again".into();
        }
        m.switch_ms = self.switch_ms;
        m.made = Made::CutoverStart;
        m
    }

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
        let bytes = crate::run::human_bytes;
        let made = match self.made {
            Made::Presync => "at presync",
            Made::CutoverStart => "at the cutover's start",
            Made::Cutover => "as the last cutover took",
        };
        let drain = match self.drain_ms {
            Some(d) => format!("drain {} ({})", ms(d), self.drain_by),
            None => format!("drain unknown ({})", self.drain_by),
        };
        let mut what = bytes(self.verify_bytes);
        if !self.verify_by.is_empty() {
            what = format!("{what} {}", self.verify_by);
        }
        if self.verify_rate > 0 && self.verify_bytes > 0 {
            what = format!("{what}, at {}/s", bytes(self.verify_rate));
        }
        let switch = match self.switch_ms {
            Some(s) => format!("demote + promote {} (measured at the last cutover)", ms(s)),
            None => format!(
                "demote + promote {} (estimated from control round trips)",
                ms(self.fixed_ms)
            ),
        };
        format!(
            "{made}: {drain} + verify {} ({what}) + {switch}; {} out of sync, lag {} ({})",
            ms(self.verify_ms),
            bytes(self.out_of_sync_bytes),
            bytes(self.lag_bytes),
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
/// unless `m` brings one, and a cutover's measurements keep the prediction they replace.
pub fn save(plan: &Plan, task: &str, m: &ReplicaMeasure) -> std::io::Result<()> {
    let mut m = m.clone();
    let old = load(plan, task);
    if m.switch_ms.is_none() {
        m.switch_ms = old.as_ref().and_then(|o| o.switch_ms);
    }
    if m.made == Made::Cutover && m.predicted.is_none() {
        m.predicted = old.filter(|o| o.made != Made::Cutover).map(|mut o| {
            o.predicted = None;
            Box::new(o)
        });
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn in_step(lag_ms: u64) -> Link {
        Link {
            connection: "connected".into(),
            in_step: true,
            lag_ms,
            ..Link::default()
        }
    }

    #[test]
    fn the_cutover_start_counts_what_was_written_since_presync() {
        // Presync: the mark just set, nothing to verify yet; 200 MiB/s measured.
        let presync = ReplicaMeasure::predict(
            &in_step(0),
            0,
            "written since the presync mark",
            200 * MIB,
            40,
        );
        assert_eq!(presync.verify_ms, 0);
        assert_eq!(presync.predicted_ms(), Some(PEER_FLUSH_MS + 40));
        assert!(presync.explain().starts_with("at presync: "), "{presync:?}");
        // The application wrote 100 MiB since, and the stream lags 0.3 s.
        let now = presync.at_cutover_start(&in_step(300), 100 * MIB);
        assert_eq!(now.made, Made::CutoverStart);
        assert_eq!((now.verify_bytes, now.verify_ms), (100 * MIB, 500));
        assert_eq!(now.drain_ms, Some(300 + PEER_FLUSH_MS));
        assert_eq!(now.predicted_ms(), Some(300 + PEER_FLUSH_MS + 500 + 40));
        let e = now.explain();
        assert!(
            e.starts_with("at the cutover's start: drain 0.8 s (")
                && e.contains(
                    "verify 0.5 s (100.0 MiB written since the presync mark, at 200.0 MiB/s)"
                ),
            "{e}"
        );
        // A demote/promote a cutover measured stays.
        let mut measured = presync.clone();
        measured.switch_ms = Some(70);
        let now = measured.at_cutover_start(&in_step(0), 0);
        assert_eq!(now.predicted_ms(), Some(PEER_FLUSH_MS + 70));
    }

    #[test]
    fn a_resync_at_the_cutover_start_has_a_drain_at_its_rate() {
        let presync = ReplicaMeasure::predict(&in_step(0), 0, "", 100 * MIB, 10);
        let link = Link {
            connection: "connected".into(),
            out_of_sync_bytes: 50 * MIB,
            resync_rate: 100 * MIB,
            ..Link::default()
        };
        let now = presync.at_cutover_start(&link, 0);
        assert_eq!(now.drain_ms, Some(500));
        assert!(now.resyncing);
        assert_eq!(now.predicted_ms(), None, "not in step: no prediction");
        let down = Link {
            connection: "connecting".into(),
            ..Link::default()
        };
        assert_eq!(down.drain(), (None, "the link is connecting".to_string()));
    }

    #[test]
    fn a_file_of_an_older_version_loads_and_keeps_its_verify() {
        // As versions without a kept verify rate wrote it.
        let old = r#"{"out_of_sync_bytes": 0, "lag_bytes": 0, "lag_ms": 0, "resync_rate": 0,
            "resyncing": false, "drain_ms": 500, "drain_by": "x", "verify_bytes": 4096,
            "verify_ms": 3, "fixed_ms": 20}"#;
        let m: ReplicaMeasure = serde_json::from_str(old).unwrap();
        assert_eq!((m.made, m.verify_rate), (Made::Presync, 0));
        let now = m.at_cutover_start(&in_step(100), 64 * MIB);
        assert_eq!((now.verify_bytes, now.verify_ms), (4096, 3));
        assert!(now.verify_by.contains("run presync again"), "{now:?}");
        assert_eq!(now.drain_ms, Some(100 + PEER_FLUSH_MS));
    }

    #[test]
    fn a_cutovers_measurements_keep_the_prediction_they_replace() {
        let dir = tempfile::tempdir().unwrap();
        let text = "[[task]]\nname = \"v\"\nkind = \"replica\"\nsource = \"volume:v\"\ndestination = \"b\"\n";
        let plan = Plan::parse(&dir.path().join("p.toml"), text.to_string()).unwrap();
        let presync = ReplicaMeasure::predict(&in_step(0), 0, "", MIB, 10);
        save(&plan, "v", &presync).unwrap();
        let start = presync.at_cutover_start(&in_step(0), MIB);
        save(&plan, "v", &start).unwrap();
        let took = ReplicaMeasure {
            made: Made::Cutover,
            verify_bytes: MIB,
            verify_ms: 900,
            switch_ms: Some(30),
            ..ReplicaMeasure::default()
        };
        save(&plan, "v", &took).unwrap();
        let kept = load(&plan, "v").unwrap();
        assert_eq!(kept.predicted.as_deref(), Some(&start));
        // The next cutover's measurements replace these, and keep no cutover as prediction.
        save(&plan, "v", &took).unwrap();
        assert_eq!(load(&plan, "v").unwrap().predicted, None);
    }
}
