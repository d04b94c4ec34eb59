//! Migration plans: the plan file and its validation ([`file`]), the task graph ([`graph`]),
//! the runner that runs every task in dependency order with a limit on how many run at once
//! ([`run`]), one pass with its `pre_pass`/`post_pass` hooks and `paths_from` list
//! ([`passes`], [`paths_from`]), the stamps those see ([`stamps`]), presync prediction
//! ([`predict`]), hooks ([`hooks`]), logs ([`logs`]), the end-of-run report ([`report`]) and
//! the processes of command tasks ([`spool`]).
//!
//! This crate never moves data itself: a [`TaskRunner`] (the CLI's, which calls the same
//! code as `cutover sync`) runs one pass of one task and returns what it did.

pub mod file;
pub mod graph;
pub mod hooks;
pub mod logs;
pub mod passes;
pub mod paths_from;
pub mod predict;
pub mod replica;
pub mod report;
pub mod run;
pub mod spool;
pub mod stamps;

pub use file::{
    parse_duration, Connections, Hook, HookRun, KeyError, Kind, Plan, PlanError, TaskSpec,
    VerifyMode,
};
pub use logs::{Echo, Logs, TaskLog};
pub use run::{PassOutcome, RunReport, TaskResult};

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A future a [`TaskRunner`] returns.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Everything that can stop a plan command.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    State(#[from] state::StateError),
    #[error("{path}: {source}")]
    Log {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The command refuses to run, and says why and what to do.
    #[error("{0}")]
    Refused(String),
}

/// What one pass of one task did (the engine's summary, in the plan's terms).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PassStats {
    pub entries_scanned: u64,
    /// Files sent whole or by delta, plus files whose metadata alone changed.
    pub files_changed: u64,
    /// Logical bytes of the files sent.
    pub bytes_changed: u64,
    pub bytes_literal: u64,
    pub wire_bytes: u64,
    pub deleted: u64,
    /// Errors of single entries (the pass went on).
    pub errors: Vec<String>,
    /// Files that changed while they were read (expected while the service is live).
    pub changed_during_copy: Vec<String>,
    /// With `max_delete`: how many entries would have gone (nothing was deleted).
    pub delete_limit_hit: Option<u64>,
    /// With [`PassContext::collect_sent`]: the paths whose content the pass sent (or whose
    /// directory, link or node it created), as the engine names them.
    pub sent: Vec<String>,
    /// A `replica` task's presync pass: what it measured (kept for the prediction).
    pub replica: Option<Box<replica::ReplicaMeasure>>,
}

/// One difference `verify_mode` found between source and destination after a final pass.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    /// As the engine names it: relative to the task's source.
    pub path: String,
    pub reason: String,
}

/// How a pass is to be run.
#[derive(Clone)]
pub struct PassContext {
    /// Relative local paths in the task are taken from here (the plan file's directory).
    pub base_dir: PathBuf,
    /// `presync`, `final`, `rerun` or `dry-run`. A final pass runs a command task's
    /// `destination_command`.
    pub kind: String,
    /// Where a command task's output is spooled.
    pub spool: PathBuf,
    /// Change nothing; report what would change.
    pub dry_run: bool,
    /// Fill [`PassStats::sent`] (a final pass whose task verifies what it transferred).
    pub collect_sent: bool,
    /// The task's `paths_from` list for this pass: sync only these paths (relative to the
    /// source, one a line; a listed directory with what is beneath it).
    pub files_from: Option<PathBuf>,
    /// The pass's environment (`CUTOVER_TASK`, `CUTOVER_PASS`, the stamp), for what the
    /// runner itself starts (a command task's command).
    pub env: Vec<(String, String)>,
    pub log: TaskLog,
    pub progress: ProgressSink,
}

/// Where a task's source is, as its `paths_from` command needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSide {
    /// On this machine, at this path.
    Local(PathBuf),
    /// On another host, at `path` there; `argv` followed by one shell command line runs
    /// that line there (the task's ssh command and the host).
    Remote { argv: Vec<String>, path: String },
}

/// Runs one pass of one task. The CLI implements it with the code path of `cutover sync`.
pub trait TaskRunner: Send + Sync + 'static {
    /// Check what only the runner understands (endpoint syntax, rates, fingerprints),
    /// without touching anything; the error names the key.
    fn check(&self, task: &TaskSpec) -> Result<(), KeyError>;
    /// Where the task's source is (relative local paths are taken from `base_dir`), and how
    /// to run a command there. `Err`: commands cannot run there (a daemon's module).
    fn source_side(
        &self,
        task: &TaskSpec,
        base_dir: &std::path::Path,
    ) -> Result<SourceSide, String>;
    /// Run one pass. `Err` is a failure of the whole pass, with a one-line reason.
    fn run_pass(&self, task: TaskSpec, ctx: PassContext) -> BoxFuture<Result<PassStats, String>>;
    /// After a final pass: compare the content of source and destination (by hashes, on
    /// both sides) and return every difference; `only` limits the result to these paths
    /// (`verify_mode = "transferred"`). `Err` means the comparison itself could not run.
    fn verify(
        &self,
        task: TaskSpec,
        ctx: PassContext,
        only: Option<Vec<String>>,
    ) -> BoxFuture<Result<Vec<Mismatch>, String>>;
    /// At a cutover's start, before its `pre_final` hooks: a `replica` task's prediction
    /// (`kept`, its presync's) made again from what can be asked cheaply now (the link and
    /// the bytes to verify, from its source daemon; no hashing). `Ok(None)` keeps `kept`
    /// (the default); `Err` says in one line why it could not be made (never fatal: `kept`
    /// stands).
    fn refresh_replica(
        &self,
        task: TaskSpec,
        base_dir: PathBuf,
        kept: replica::ReplicaMeasure,
    ) -> BoxFuture<Result<Option<replica::ReplicaMeasure>, String>> {
        let _ = (task, base_dir, kept);
        Box::pin(async { Ok(None) })
    }
}

/// Where a running pass reports progress; writes reach the state store at most twice a
/// second, so `status` sees movement without the store becoming the bottleneck.
#[derive(Clone)]
pub struct ProgressSink {
    inner: Option<Arc<SinkInner>>,
}

struct SinkInner {
    store: Arc<dyn state::Store>,
    task: String,
    last: Mutex<Option<Instant>>,
}

impl ProgressSink {
    const EVERY: Duration = Duration::from_millis(500);

    pub fn new(store: Arc<dyn state::Store>, task: &str) -> ProgressSink {
        ProgressSink {
            inner: Some(Arc::new(SinkInner {
                store,
                task: task.to_string(),
                last: Mutex::new(None),
            })),
        }
    }

    /// A sink that drops everything.
    pub fn discard() -> ProgressSink {
        ProgressSink { inner: None }
    }

    pub fn update(&self, p: state::Progress) {
        let Some(s) = &self.inner else { return };
        {
            let mut last = s.last.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|t| t.elapsed() < Self::EVERY) {
                return;
            }
            *last = Some(Instant::now());
        }
        // Progress is advisory: a failed write must not fail the pass.
        let _ = s.store.set_progress(&s.task, p);
    }
}
