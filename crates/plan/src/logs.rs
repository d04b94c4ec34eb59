//! Logs of a run: one file per task (appended across runs), one timestamped summary log per
//! run, and the JSON error log that names the tasks to re-run. Every line is stamped with
//! UTC time, so logs of parallel tasks can be merged by sorting.

use state::Millis;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// RFC 3339 UTC with milliseconds (the one stamp of plan and hook logs).
pub use ::hooks::stamp;

/// `20261124T010203Z`, for file names.
fn file_stamp(ms: Millis) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!("[year][month][day]T[hour][minute][second]Z");
    t.format(&f).unwrap_or_else(|_| ms.to_string())
}

/// Print a line to the user (the CLI decides where; a test may collect them).
pub type Echo = Arc<dyn Fn(&str) + Send + Sync>;

/// One task's log. Cheap to clone; lines from clones interleave whole.
#[derive(Clone)]
pub struct TaskLog {
    file: Option<Arc<Mutex<File>>>,
    /// Echo every line to the user with this prefix (dry runs, which keep no files).
    echo: Option<(String, Echo)>,
}

impl TaskLog {
    /// A log that writes nowhere.
    pub fn discard() -> TaskLog {
        TaskLog {
            file: None,
            echo: None,
        }
    }

    /// Whether lines go to the user rather than a file (then the summary, which the user
    /// sees too, need not repeat them).
    pub fn echoes(&self) -> bool {
        self.echo.is_some()
    }

    pub fn line(&self, text: &str) {
        if let Some(f) = &self.file {
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            // A log that cannot be written must not fail the transfer it describes.
            let _ = writeln!(f, "{} {text}", stamp(state::now_ms()));
        }
        if let Some((prefix, echo)) = &self.echo {
            echo(&format!("{prefix}{text}"));
        }
    }
}

/// The logs of one run.
pub struct Logs {
    dir: Option<PathBuf>,
    summary: Option<Mutex<File>>,
    summary_path: Option<PathBuf>,
    started_ms: Millis,
    echo: Echo,
}

impl Logs {
    /// Open the summary log `summary-<time>-run<id>.log` in `dir` (created if needed).
    pub fn open(dir: &Path, run: state::RunId, echo: Echo) -> std::io::Result<Logs> {
        std::fs::create_dir_all(dir)?;
        let started_ms = state::now_ms();
        let path = dir.join(format!("summary-{}-run{run}.log", file_stamp(started_ms)));
        let file = open_append(&path)?;
        Ok(Logs {
            dir: Some(dir.to_path_buf()),
            summary: Some(Mutex::new(file)),
            summary_path: Some(path),
            started_ms,
            echo,
        })
    }

    /// Logs that keep no files: the summary goes to `echo` only, task lines too (prefixed
    /// with the task's name).
    pub fn console_only(echo: Echo) -> Logs {
        Logs {
            dir: None,
            summary: None,
            summary_path: None,
            started_ms: state::now_ms(),
            echo,
        }
    }

    pub fn summary_path(&self) -> Option<&Path> {
        self.summary_path.as_deref()
    }

    /// A line in the summary log, shown to the user too.
    pub fn summary(&self, text: &str) {
        if let Some(f) = &self.summary {
            let mut f = f.lock().unwrap_or_else(|p| p.into_inner());
            let _ = writeln!(f, "{} {text}", stamp(state::now_ms()));
        }
        (self.echo)(text);
    }

    /// A line shown to the user but kept out of the summary log.
    pub fn say(&self, text: &str) {
        (self.echo)(text);
    }

    /// The log of task `name` (`<name>.log`, appended).
    pub fn task(&self, name: &str) -> std::io::Result<TaskLog> {
        match &self.dir {
            Some(dir) => {
                let f = open_append(&dir.join(format!("{name}.log")))?;
                Ok(TaskLog {
                    file: Some(Arc::new(Mutex::new(f))),
                    echo: None,
                })
            }
            None => Ok(TaskLog {
                file: None,
                echo: Some((format!("[{name}] "), self.echo.clone())),
            }),
        }
    }

    pub fn task_log_path(&self, name: &str) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(format!("{name}.log")))
    }

    /// Write the run's error log `errors-<time>-run<id>.json` (also for a clean run, so a
    /// script always finds one) and a copy at `errors-latest.json`. Returns its path.
    pub fn write_error_log(
        &self,
        value: &serde_json::Value,
        run: state::RunId,
    ) -> std::io::Result<Option<PathBuf>> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
        let path = dir.join(format!(
            "errors-{}-run{run}.json",
            file_stamp(self.started_ms)
        ));
        write_atomic(&path, text.as_bytes())?;
        write_atomic(&dir.join("errors-latest.json"), text.as_bytes())?;
        Ok(Some(path))
    }
}

impl Logs {
    /// Write the run's report as `report-<time>-run<id>.json` and `.md`; returns both paths.
    pub fn write_report(
        &self,
        run: state::RunId,
        json: &serde_json::Value,
        markdown: &str,
    ) -> std::io::Result<Option<(PathBuf, PathBuf)>> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let base = format!("report-{}-run{run}", file_stamp(self.started_ms));
        let (j, m) = (
            dir.join(format!("{base}.json")),
            dir.join(format!("{base}.md")),
        );
        let text = serde_json::to_string_pretty(json).map_err(std::io::Error::other)?;
        write_atomic(&j, text.as_bytes())?;
        write_atomic(&m, markdown.as_bytes())?;
        Ok(Some((j, m)))
    }
}

/// Write via a temporary file and rename, so a reader (or a crash) never sees half a file;
/// only a regular file (or nothing) at `path` is replaced.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    cofs::safe_write::replace(path, data, 0o644).map_err(in_log_dir)
}

/// Open a log file to append to, only if it is a regular file (or absent).
pub fn open_append(path: &Path) -> std::io::Result<File> {
    cofs::safe_write::open_append(path, 0o644).map_err(in_log_dir)
}

/// The error as an `io::Error` naming the file only: callers prefix the log directory.
fn in_log_dir(e: cofs::safe_write::SafeWriteError) -> std::io::Error {
    let name = e.path().file_name().unwrap_or_default().to_string_lossy();
    let kind = match &e {
        cofs::safe_write::SafeWriteError::Io { source, .. } => source.kind(),
        cofs::safe_write::SafeWriteError::NotRegular { .. } => std::io::ErrorKind::InvalidInput,
    };
    std::io::Error::new(kind, format!("{name}: {}", e.reason()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_rfc3339() {
        assert_eq!(stamp(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(stamp(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(file_stamp(1_700_000_000_123), "20231114T221320Z");
    }

    #[test]
    fn task_and_summary_lines_are_stamped() {
        let dir = tempfile::tempdir().unwrap();
        let seen = Arc::new(Mutex::new(Vec::<String>::new()));
        let s2 = seen.clone();
        let logs = Logs::open(
            dir.path(),
            7,
            Arc::new(move |l: &str| s2.lock().unwrap().push(l.to_string())),
        )
        .unwrap();
        logs.summary("pass 1 starts");
        logs.task("docs").unwrap().line("sent a.txt");
        let summary = std::fs::read_to_string(logs.summary_path().unwrap()).unwrap();
        assert!(summary.ends_with("Z pass 1 starts\n"), "{summary}");
        let task = std::fs::read_to_string(dir.path().join("docs.log")).unwrap();
        assert!(task.ends_with("Z sent a.txt\n"), "{task}");
        assert_eq!(*seen.lock().unwrap(), vec!["pass 1 starts".to_string()]);
        let p = logs
            .write_error_log(&serde_json::json!({"rerun": ["docs"]}), 7)
            .unwrap()
            .unwrap();
        assert!(p
            .file_name()
            .unwrap()
            .to_string_lossy()
            .ends_with("-run7.json"));
        let latest = std::fs::read_to_string(dir.path().join("errors-latest.json")).unwrap();
        assert!(latest.contains("docs"));
    }
}
