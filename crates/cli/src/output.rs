//! What the user sees: progress bars on a terminal, itemised changes, `--json` events (one
//! object per line), the end-of-pass report, and the exit code that goes with it.

use crate::exit;
use crate::names;
use crate::print::{errln, outln};
use engine::{Event, Events, Stats, Summary};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

pub struct Reporter {
    json: bool,
    itemize: bool,
    quiet: bool,
    /// The run changes nothing (`-n`): its report says so.
    dry_run: bool,
}

pub struct Progress {
    bar: Option<ProgressBar>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    pub fn finish(&self) {
        if let Some(t) = &self.task {
            t.abort();
        }
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn out(line: String) {
    outln!("{line}");
}

impl Reporter {
    pub fn new(json: bool, itemize: bool, quiet: bool) -> Self {
        Reporter {
            json,
            itemize,
            quiet,
            dry_run: false,
        }
    }

    /// Mark the report as a dry run's.
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// A progress bar on stderr when it is a terminal (not with --json or --quiet).
    pub fn start_progress(&self, stats: Arc<Stats>) -> Progress {
        if self.json || self.quiet || !std::io::stderr().is_terminal() {
            return Progress {
                bar: None,
                task: None,
            };
        }
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        let style = ProgressStyle::with_template(
            "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
        bar.set_style(style);
        let b = bar.clone();
        let task = tokio::spawn(async move {
            loop {
                let scanned = Stats::get(&stats.entries_scanned);
                let files = Stats::get(&stats.files_done);
                let to_send = Stats::get(&stats.files_to_send);
                b.set_length(Stats::get(&stats.bytes_to_send));
                b.set_position(Stats::get(&stats.bytes_done));
                let scan = if stats.scan_done.load(std::sync::atomic::Ordering::Relaxed) {
                    ""
                } else {
                    "+"
                };
                b.set_message(format!("{scanned}{scan} scanned, {files}/{to_send} files"));
                b.tick();
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Progress {
            bar: Some(bar),
            task: Some(task),
        }
    }

    /// One-line fatal error; returns the exit code.
    pub fn fatal(&self, message: &str) -> u8 {
        if self.json {
            out(json!({"event": "fatal", "message": message}).to_string());
        }
        errln!("cutover: {message}");
        exit::FATAL
    }

    /// Print the report; returns the exit code it implies.
    pub fn summary(&self, s: &Summary, wire: u64, elapsed: Duration) -> u8 {
        let secs = elapsed.as_secs_f64().max(1e-9);
        let saved = s.bytes_logical.saturating_sub(s.bytes_literal);
        let code = if s.delete_limit_hit.is_some() {
            exit::DELETE_LIMIT
        } else if !s.errors.is_empty() {
            exit::PARTIAL
        } else if !s.changed.is_empty() || s.files_from_missing > 0 {
            // A listed path the source lacks is one that vanished before the scan.
            exit::INCONSISTENT
        } else {
            exit::OK
        };
        if self.json {
            out(json!({
                "event": "summary",
                "dry_run": self.dry_run,
                "entries_scanned": s.entries_scanned,
                "files_sent": s.files_sent,
                "files_meta_only": s.files_meta_only,
                "deleted": s.deleted,
                "bytes_logical": s.bytes_logical,
                "bytes_literal": s.bytes_literal,
                "bytes_copied_from_basis": s.bytes_copied,
                "wire_bytes": wire,
                "delta_saved_bytes": saved,
                "elapsed_s": (secs * 1000.0).round() / 1000.0,
                "throughput_bytes_per_s": (s.bytes_logical as f64 / secs) as u64,
                "changed_during_copy": s.changed,
                "errors": s.errors,
                "delete_limit_hit": s.delete_limit_hit,
                "reconnects": s.reconnects,
                "files_from_missing": s.files_from_missing,
                "exit_code": code,
            })
            .to_string());
            return code;
        }
        if !self.quiet {
            let pct = if s.bytes_logical > 0 {
                100.0 * saved as f64 / s.bytes_logical as f64
            } else {
                0.0
            };
            if self.dry_run {
                out("dry run             nothing was changed; the items above are what a run would do".into());
            }
            out(format!("entries scanned     {}", s.entries_scanned));
            if s.files_from_missing > 0 {
                out(format!(
                    "listed, missing     {} (see above)",
                    s.files_from_missing
                ));
            }
            out(format!(
                "files sent          {} ({} metadata only)",
                s.files_sent, s.files_meta_only
            ));
            out(format!("deleted             {}", s.deleted));
            out(format!("bytes logical       {}", human(s.bytes_logical)));
            out(format!("bytes literal       {}", human(s.bytes_literal)));
            out(format!("delta savings       {} ({pct:.1}%)", human(saved)));
            out(format!("bytes on the wire   {}", human(wire)));
            if s.reconnects > 0 {
                out(format!(
                    "reconnects          {} (the session broke and resumed)",
                    s.reconnects
                ));
            }
            out(format!("elapsed             {secs:.2} s"));
            out(format!(
                "throughput          {}/s",
                human((s.bytes_logical as f64 / secs) as u64)
            ));
        }
        if !s.changed.is_empty() {
            errln!(
                "cutover: {} file(s) changed while they were copied; the copy is not consistent (run again when the source is quiet):",
                s.changed.len()
            );
            for p in s.changed.iter().take(20) {
                errln!("  {}", names::escape(p.as_bytes()));
            }
        }
        if s.files_from_missing > 0 {
            errln!(
                "cutover: {} path(s) of the --files-from list are not in the source; they were skipped",
                s.files_from_missing
            );
        }
        if !s.errors.is_empty() {
            errln!("cutover: {} error(s); see above", s.errors.len());
        }
        code
    }
}

fn human(n: u64) -> String {
    ::plan::run::human_bytes_to(n, 2)
}

impl Events for Reporter {
    fn event(&self, ev: Event) {
        match ev {
            Event::Item { path, action, size } => {
                let bytes = path.as_bytes();
                if self.json {
                    let mut item = json!({"event": "item", "action": action.as_str(), "path": path.lossy(), "size": size});
                    if let Some(b64) = names::b64_unless_utf8(bytes) {
                        item["path_b64"] = b64.into();
                    }
                    out(item.to_string());
                } else if self.itemize && !self.quiet {
                    out(format!("{:<7}{}", action.as_str(), names::escape(bytes)));
                }
            }
            Event::FileDone {
                path,
                literal,
                copied,
            } => {
                if self.json {
                    out(json!({"event": "done", "path": path, "literal": literal, "copied": copied}).to_string());
                }
            }
            Event::Changed { path, reason } => {
                if self.json && reason == engine::LISTED_MISSING {
                    out(json!({"event": "missing", "path": path, "reason": reason}).to_string());
                } else if self.json {
                    out(json!({"event": "changed", "path": path, "reason": reason}).to_string());
                } else {
                    errln!("cutover: {}: {reason}", names::escape(path.as_bytes()));
                }
            }
            Event::Error { message } => {
                if self.json {
                    out(json!({"event": "error", "message": message}).to_string());
                } else {
                    errln!("cutover: {message}");
                }
            }
            Event::Note { message } => {
                if self.json {
                    out(json!({"event": "note", "message": message}).to_string());
                } else if !self.quiet {
                    errln!("cutover: {message}");
                }
            }
            Event::Retry {
                attempt,
                wait,
                reason,
            } => {
                if self.json {
                    out(json!({"event": "retry", "attempt": attempt, "wait_s": wait.as_secs_f64(), "reason": reason}).to_string());
                } else {
                    errln!(
                        "cutover: {reason}; resuming in {:.0} s (retry {attempt})",
                        wait.as_secs_f64().ceil()
                    );
                }
            }
        }
    }
}
