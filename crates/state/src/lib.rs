//! The state store of migration plans: runs, tasks (phase, progress, last success, last
//! error), passes (what each pass changed and how long it took), errors and the plan's
//! fingerprint, behind the [`Store`] trait; [`SqliteStore`] keeps them in SQLite (WAL) so
//! that `cutover plan status` can read while a runner writes.

mod sqlite;

pub use sqlite::SqliteStore;

use std::path::PathBuf;

/// Row id of a run (one invocation of `cutover plan presync|cutover|rerun`).
pub type RunId = i64;

/// Milliseconds since the Unix epoch (what every timestamp in the store is).
pub type Millis = i64;

/// Now, in [`Millis`].
pub fn now_ms() -> Millis {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("state store {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Something other than a regular file stands where the database or its lock would be.
    #[error("state store {0}")]
    File(#[from] cofs::safe_write::SafeWriteError),
    #[error("state store {path}: another runner ({holder}) is using this plan; wait for it to end or stop it")]
    Busy { path: PathBuf, holder: String },
    #[error("state store {path}: written by a newer cutover (schema {found}, this one knows up to {known}); use that version")]
    NewerSchema {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("state store {path}: no run has been recorded yet (run `cutover plan presync` first)")]
    NotFound { path: PathBuf },
    /// SQLite found the file damaged (not a database, a malformed page, a failed integrity
    /// check). Nothing in it is trusted: the fix is to set it aside and start a new one,
    /// which costs the pass history (predictions) and nothing else, since every pass
    /// compares content whatever the store says.
    #[error("state store {path} is damaged ({reason}); move it aside (mv {path} {path}.damaged, with any -wal and -shm files beside it) and run `cutover plan presync` again: every task is compared by content, so nothing is skipped, only the pass history is lost")]
    Damaged { path: PathBuf, reason: String },
    #[error("state store {path}: unknown {what} {value:?} in the database")]
    Corrupt {
        path: PathBuf,
        what: &'static str,
        value: String,
    },
}

/// Where a task stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Registered, not started in this run.
    Pending,
    Running,
    Verifying,
    /// Its last pass succeeded.
    Done,
    Failed,
    /// Not run because a task it depends on failed or was interrupted.
    Blocked,
    /// Stopped by Ctrl-C (or its runner died): resumable.
    Interrupted,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::Pending,
        Phase::Running,
        Phase::Verifying,
        Phase::Done,
        Phase::Failed,
        Phase::Blocked,
        Phase::Interrupted,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "pending",
            Phase::Running => "running",
            Phase::Verifying => "verifying",
            Phase::Done => "done",
            Phase::Failed => "failed",
            Phase::Blocked => "blocked",
            Phase::Interrupted => "interrupted",
        }
    }

    pub fn parse(s: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Whether `rerun --failed` should run a task in this phase.
    pub fn needs_rerun(self) -> bool {
        matches!(self, Phase::Failed | Phase::Blocked | Phase::Interrupted)
    }
}

/// How a pass ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    Failed(String),
    Interrupted,
}

impl Outcome {
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Failed(_) => "failed",
            Outcome::Interrupted => "interrupted",
        }
    }
}

/// One pass of one task, as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct PassRecord {
    pub run: RunId,
    pub task: String,
    /// `presync`, `final`, `rerun`.
    pub kind: String,
    pub started_ms: Millis,
    pub ended_ms: Millis,
    /// Files whose content or metadata was sent.
    pub files_changed: u64,
    /// Bytes of the changed files (logical size).
    pub bytes_changed: u64,
    /// Bytes sent as literal data (what delta could not avoid).
    pub bytes_literal: u64,
    /// Bytes on the network (0 for local-to-local).
    pub wire_bytes: u64,
    pub entries_scanned: u64,
    pub deleted: u64,
    pub outcome: Outcome,
}

impl PassRecord {
    pub fn duration_s(&self) -> f64 {
        (self.ended_ms - self.started_ms).max(0) as f64 / 1000.0
    }
}

/// Live progress of a running task.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
}

/// A task as `status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskState {
    pub name: String,
    pub phase: Phase,
    pub run: Option<RunId>,
    pub updated_ms: Millis,
    pub progress: Progress,
    /// The stamp: when the last successful pass *started* (see [`Store::stamp`]).
    pub last_success_ms: Option<Millis>,
    pub last_error: Option<String>,
    pub last_error_ms: Option<Millis>,
    /// The newest pass, whatever its outcome.
    pub last_pass: Option<PassRecord>,
}

/// A run as `status` shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunInfo {
    pub id: RunId,
    /// `presync`, `cutover`, `rerun`.
    pub mode: String,
    pub fingerprint: String,
    pub pid: u32,
    pub started_ms: Millis,
    pub ended_ms: Option<Millis>,
    /// `ok`, `failed`, `interrupted`, `ready`, `not-ready`; None while running.
    pub outcome: Option<String>,
    /// The latest prediction of the final pass's duration, in seconds.
    pub predicted_final_s: Option<f64>,
    /// A `rerun`: the mode of the run whose failed tasks it re-ran (`presync` or
    /// `cutover`), which is what a rerun of this one repeats in turn.
    pub repeats: Option<String>,
}

/// Everything the plan runner and `status` need from persistent state. Implementations
/// must make [`Store::record_pass`] atomic: the pass row, the task's phase and (for a
/// successful pass) its last-success stamp are written together or not at all.
pub trait Store: Send + Sync {
    /// The plan fingerprint the last run was made with.
    fn fingerprint(&self) -> Result<Option<String>, StateError>;
    /// Start a run: remember the plan's fingerprint, register `tasks`, and mark whatever
    /// an earlier runner left running as interrupted.
    fn begin_run(&self, mode: &str, fingerprint: &str, tasks: &[&str])
        -> Result<RunId, StateError>;
    fn end_run(&self, run: RunId, outcome: &str) -> Result<(), StateError>;
    fn set_prediction(&self, run: RunId, predicted_final_s: f64) -> Result<(), StateError>;
    /// Record that `run` (a rerun) repeats the mode `mode` (see [`RunInfo::repeats`]).
    fn set_repeats(&self, run: RunId, mode: &str) -> Result<(), StateError>;
    fn set_phase(&self, run: RunId, task: &str, phase: Phase) -> Result<(), StateError>;
    fn set_progress(&self, task: &str, progress: Progress) -> Result<(), StateError>;
    /// Record a finished pass (see the trait's note on atomicity); returns its row id.
    fn record_pass(&self, pass: &PassRecord) -> Result<i64, StateError>;
    /// Record an error that is not a pass's (a task that could not start, a hook).
    fn record_error(&self, run: RunId, task: &str, message: &str) -> Result<(), StateError>;
    fn tasks(&self) -> Result<Vec<TaskState>, StateError>;
    /// A task's stamp: when its last successful pass started (None: it never had one).
    /// A pass that fails, is interrupted or dies with its runner leaves it as it was, since
    /// only [`Store::record_pass`] of a successful pass writes it.
    fn stamp(&self, task: &str) -> Result<Option<Millis>, StateError>;
    /// Every recorded pass of `task`, oldest first.
    fn passes(&self, task: &str) -> Result<Vec<PassRecord>, StateError>;
    fn last_run(&self) -> Result<Option<RunInfo>, StateError>;
    /// The run `id`, if the store has it.
    fn run(&self, id: RunId) -> Result<Option<RunInfo>, StateError>;
}
