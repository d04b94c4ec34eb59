//! What the engine reports during a plan task's pass (into the task's log, counting what a
//! dry run would change) and during `verify_mode`'s comparison (every entry a mismatch).

use super::*;

/// Engine events of a plan task go to its log file. A dry run's engine sends nothing, so
/// its summary counts nothing: what it would change is counted here from the itemised list.
pub(super) struct TaskEvents {
    pub(super) log: TaskLog,
    pub(super) dry_run: bool,
    pub(super) would: std::sync::Mutex<(u64, u64, u64)>,
    /// With `collect_sent`: the paths sent or created (what `verify_mode = "transferred"`
    /// checks).
    pub(super) sent: Option<std::sync::Mutex<Vec<String>>>,
}

impl Events for TaskEvents {
    fn event(&self, ev: Event) {
        match ev {
            Event::Item { path, action, size } => {
                let would = if self.dry_run { "would " } else { "" };
                if let (Some(sent), Action::Send | Action::Delta | Action::Create) =
                    (&self.sent, action)
                {
                    sent.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(names::escape(path.as_bytes()));
                }
                if self.dry_run {
                    let mut w = self.would.lock().unwrap_or_else(|p| p.into_inner());
                    match action.as_str() {
                        "send" | "delta" => {
                            w.0 += 1;
                            w.1 += size;
                        }
                        "meta" => w.0 += 1,
                        "delete" => w.2 += 1,
                        _ => {}
                    }
                }
                let path = names::escape(path.as_bytes());
                self.log
                    .line(&format!("{would}{} {path} ({size} bytes)", action.as_str()));
            }
            Event::FileDone { .. } => {}
            // The engine reports a listed path it did not find this way (see LISTED_MISSING).
            Event::Changed { path, reason } if reason == engine::LISTED_MISSING => {
                self.log.line(&format!(
                    "missing: {}: listed by paths_from but not in the source",
                    names::escape(path.as_bytes())
                ))
            }
            Event::Changed { path, reason } => self.log.line(&format!(
                "changed while read: {}: {reason}",
                names::escape(path.as_bytes())
            )),
            Event::Error { message } => self.log.line(&format!("error: {message}")),
            Event::Note { message } => self.log.line(&message),
            Event::Retry {
                attempt,
                wait,
                reason,
            } => self.log.line(&format!(
                "retry {attempt} in {:.0} s: {reason}",
                wait.as_secs_f64().ceil()
            )),
        }
    }
}

/// The engine's events during `verify_mode`'s comparison (a dry run with checksum): every
/// entry it lists is a difference between the two sides.
pub(super) struct CheckEvents {
    pub(super) log: TaskLog,
    pub(super) found: std::sync::Mutex<Vec<Mismatch>>,
}

impl Events for CheckEvents {
    fn event(&self, ev: Event) {
        match ev {
            Event::Item { path, action, .. } => {
                let path = names::escape(path.as_bytes());
                let reason = match action {
                    Action::Delta => "content differs",
                    Action::Send => "missing on the destination, or of another size",
                    Action::Create => {
                        "missing or different on the destination (a directory, link or special file)"
                    }
                    Action::Delete => "only on the destination (the task has delete = true)",
                    Action::Meta => {
                        // Same content: not a mismatch of what verify_mode compares.
                        self.log
                            .line(&format!("verify: same content, other metadata: {path}"));
                        return;
                    }
                };
                self.found
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Mismatch {
                        path,
                        reason: reason.into(),
                    });
            }
            Event::Error { message } => self.log.line(&format!("verify: error: {message}")),
            Event::Changed { path, reason } => self.log.line(&format!(
                "verify: changed while read: {}: {reason}",
                names::escape(path.as_bytes())
            )),
            Event::FileDone { .. } => {}
            Event::Note { message } => self.log.line(&format!("verify: {message}")),
            // The comparison starts over in a new session, which lists every difference again.
            Event::Retry {
                attempt,
                wait,
                reason,
            } => {
                self.found.lock().unwrap_or_else(|p| p.into_inner()).clear();
                self.log.line(&format!(
                    "verify: retry {attempt} in {:.0} s: {reason}",
                    wait.as_secs_f64().ceil()
                ));
            }
        }
    }
}
