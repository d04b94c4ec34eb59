//! Completions: the receiver's `FileDone` for each file, with the notes this side's own
//! tasks left about it (changed, unchanged, failed), turned into the summary, a rescan of a
//! file that changed while it was sent, or a reported problem.

use super::*;

impl LoopState {
    /// The receiver's verdict on one file, with what this side's tasks noted about it.
    pub(super) fn on_done(
        &mut self,
        internal_rx: &mut mpsc::Receiver<Internal>,
        id: u64,
        result: FileResult,
    ) -> Result<(), EngineError> {
        // Notes about this file were queued before the frames that led to this
        // answer; `select!` may pick the answer first, so take them now.
        let mut fatal = None;
        while let Ok(note) = internal_rx.try_recv() {
            match take_note(&mut self.transfers, note) {
                Ok(None) => {}
                // A comparison's answer is not about this file: back in line.
                Ok(Some(other)) => {
                    let tx = self.ctx.internal.clone();
                    tokio::spawn(async move {
                        let _ = tx.send(other).await;
                    });
                }
                Err(e) => fatal = fatal.or(Some(e)),
            }
        }
        if let Some(e) = fatal {
            return Err(e);
        }
        let Some(t) = self.transfers.remove(&id) else {
            return Err(EngineError::Protocol(format!(
                "completion for unknown file {id}"
            )));
        };
        self.in_flight -= 1;
        let path = display(&t.item.entry.path);
        match result {
            FileResult::Written { .. } if t.unchanged && t.verify.is_some() => {
                if t.verify == Some(true) {
                    self.summary.files_meta_only += 1;
                    self.events.event(Event::Item {
                        path: ItemPath::new(&t.item.entry.path),
                        action: Action::Meta,
                        size: t.item.entry.size,
                    });
                }
                if let Some(reason) = t.changed {
                    if t.retries < LIVE_RETRIES {
                        self.rescans.push((t.item, t.retries + 1));
                    } else {
                        self.problems.changed(&*self.events, path, reason);
                    }
                }
            }
            FileResult::Written { literal, copied } => {
                if t.verify.is_some() {
                    self.events.event(Event::Item {
                        path: ItemPath::new(&t.item.entry.path),
                        action: Action::Delta,
                        size: t.item.entry.size,
                    });
                }
                self.summary.files_sent += 1;
                self.summary.bytes_logical += t.item.entry.size;
                self.summary.bytes_literal += literal;
                self.summary.bytes_copied += copied;
                Stats::add(&self.stats.files_done, 1);
                Stats::add(&self.stats.bytes_done, t.item.entry.size);
                self.events.event(Event::FileDone {
                    path: path.clone(),
                    literal,
                    copied,
                });
                if let Some(reason) = t.changed {
                    if t.retries < LIVE_RETRIES {
                        self.rescans.push((t.item, t.retries + 1));
                    } else {
                        self.problems.changed(&*self.events, path, reason);
                    }
                }
            }
            FileResult::Failed { reason, retry } => {
                if let Some((why, vanished)) = t.failed {
                    if vanished {
                        self.problems.changed(&*self.events, path, why);
                    } else {
                        self.problems.error(&*self.events, why);
                    }
                } else if let Some(changed) = t.changed {
                    // Aborted here because it changed while read (the receiver
                    // kept its previous version), or refused for what a change
                    // made of it: try again, then report it as changed.
                    if t.retries < LIVE_RETRIES {
                        self.rescans.push((t.item, t.retries + 1));
                    } else {
                        self.problems.changed(&*self.events, path, changed);
                    }
                } else if retry && t.retries < LIVE_RETRIES {
                    self.rescans.push((t.item, t.retries + 1));
                } else if retry && source_moved(&t.item) {
                    self.problems.changed(
                        &*self.events,
                        path,
                        format!("kept changing while it was sent ({reason})"),
                    );
                } else {
                    self.problems.error(&*self.events, reason);
                }
            }
        }
        Ok(())
    }
}

/// Apply a note from this side's own tasks to the files in flight; a note that ends the session comes back as its error, and
/// one this cannot apply (a comparison's answer) comes back as it is.
pub(super) fn take_note(
    transfers: &mut HashMap<u64, Transfer>,
    note: Internal,
) -> Result<Option<Internal>, EngineError> {
    match note {
        Internal::Changed { id, reason } => {
            if let Some(t) = transfers.get_mut(&id) {
                t.changed = Some(reason);
            }
        }
        Internal::Unchanged { id } => {
            if let Some(t) = transfers.get_mut(&id) {
                t.unchanged = true;
            }
        }
        Internal::Failed {
            id,
            reason,
            vanished,
        } => {
            if let Some(t) = transfers.get_mut(&id) {
                t.failed = Some((reason, vanished));
            }
        }
        Internal::Fatal(message) => return Err(EngineError::Local(message)),
        Internal::Lost(message) => return Err(EngineError::Transport(message)),
        compared @ Internal::Compared { .. } => return Ok(Some(compared)),
    }
    Ok(None)
}

/// Whether a file's metadata moved since it was listed (for a retry that failed for good:
/// a source that keeps changing is reported as changed, not as an error).
pub(super) fn source_moved(item: &ScanItem) -> bool {
    match std::fs::symlink_metadata(&item.abs) {
        Ok(md) => moved(&(item.entry.clone(), item.local), &md).is_some(),
        Err(_) => true,
    }
}
