//! The receiver's answers to the list: each entry's `Need` turned into events, jobs on the
//! queue (small-file batches, full transfers) or a wait for its signature; signatures
//! starting delta descents; and a dry run's `--checksum` comparisons answered.

use super::*;

impl LoopState {
    /// `Needs` for one listed batch, entry by entry.
    pub(super) async fn on_needs(
        &mut self,
        batch: u64,
        needs: Vec<Need>,
    ) -> Result<(), EngineError> {
        let Some(listed) = self.batches.remove(&batch) else {
            return Err(EngineError::Protocol(format!(
                "needs for unknown batch {batch}"
            )));
        };
        if listed.len() != needs.len() {
            return Err(EngineError::Protocol(format!(
                "batch {batch}: {} needs for {} entries",
                needs.len(),
                listed.len()
            )));
        }
        let mut violation = None;
        for ((id, item), need) in listed.into_iter().zip(needs) {
            let retries = self.retries_by_id.remove(&id).unwrap_or(0);
            let path = ItemPath::new(&item.entry.path);
            let size = item.entry.size;
            match need {
                Need::Skip => self.in_flight -= 1,
                Need::Compare { meta } => {
                    if !(self.opts.dry_run && self.opts.checksum) {
                        violation = Some(format!(
                            "{path}: a comparison outside a dry run with --checksum"
                        ));
                        break;
                    }
                    self.compare_wait.insert(id, (item, meta));
                }
                Need::Meta | Need::Created => {
                    self.summary.files_meta_only += u64::from(need == Need::Meta);
                    self.events.event(Event::Item {
                        path,
                        action: if need == Need::Meta {
                            Action::Meta
                        } else {
                            Action::Create
                        },
                        size,
                    });
                    self.in_flight -= 1;
                }
                Need::Refused => {
                    self.transfers
                        .insert(id, Transfer::new(item, retries, None));
                }
                Need::Changed => {
                    let Some(changed) = self.changed.clone() else {
                        violation = Some(format!(
                            "{path}: changed blocks asked for, but this source is not a tracked volume"
                        ));
                        break;
                    };
                    let bytes = changed.bytes();
                    self.events.event(Event::Item {
                        path,
                        action: Action::Delta,
                        size,
                    });
                    Stats::add(&self.stats.files_to_send, 1);
                    Stats::add(&self.stats.bytes_to_send, bytes);
                    if self.opts.dry_run {
                        self.in_flight -= 1;
                        continue;
                    }
                    let t = Transfer::new(item, retries, None);
                    let item = t.item.clone();
                    self.transfers.insert(id, t);
                    tokio::spawn(send_changed(self.ctx.clone(), id, item, changed));
                }
                Need::Full | Need::Positional | Need::Chunks | Need::Verify { .. } => {
                    let verify = match need {
                        Need::Verify { meta } => Some(meta),
                        _ => None,
                    };
                    let action = if need == Need::Full {
                        Action::Send
                    } else {
                        Action::Delta
                    };
                    if verify.is_none() {
                        self.events.event(Event::Item { path, action, size });
                    }
                    Stats::add(&self.stats.files_to_send, 1);
                    Stats::add(&self.stats.bytes_to_send, size);
                    if self.opts.dry_run {
                        self.in_flight -= 1;
                        continue;
                    }
                    let t = Transfer::new(item, retries, verify);
                    if need != Need::Full {
                        self.awaiting_sig.insert(id, t);
                    } else if size <= SMALL_FILE {
                        self.small_bytes += size as usize;
                        self.small.push(SmallJob {
                            id,
                            item: t.item.clone(),
                        });
                        self.transfers.insert(id, t);
                        if self.small_bytes >= SMALL_BATCH_BYTES {
                            self.small_bytes = 0;
                            if self.small_tx.send(std::mem::take(&mut self.small)).is_err() {
                                // As below: the rest of the batch could never be sent.
                                return Err(EngineError::Local("data connections are gone".into()));
                            }
                        }
                    } else {
                        let item = t.item.clone();
                        self.transfers.insert(id, t);
                        spawn_full(self.ctx.clone(), id, item);
                    }
                }
            }
        }
        if let Some(v) = violation {
            return Err(EngineError::Protocol(v));
        }
        if !self.small.is_empty() {
            self.small_bytes = 0;
            if self.small_tx.send(std::mem::take(&mut self.small)).is_err() {
                return Err(EngineError::Local("data connections are gone".into()));
            }
        }
        Ok(())
    }

    /// The receiver's signature of its file: a dry run's comparison, or a delta descent.
    pub(super) fn on_signature(
        &mut self,
        id: u64,
        signature: Signature,
    ) -> Result<(), EngineError> {
        if self.compare_wait.contains_key(&id) {
            if let Some((item, meta)) = self.compare_wait.remove(&id) {
                self.comparing.insert(id, (item.clone(), meta));
                tokio::spawn(compare(self.ctx.clone(), id, item, signature));
            }
            return Ok(());
        }
        let Some(t) = self.awaiting_sig.remove(&id) else {
            return Err(EngineError::Protocol(format!(
                "signature for unknown file {id}"
            )));
        };
        let item = t.item.clone();
        self.transfers.insert(id, t);
        tokio::spawn(run_delta(self.ctx.clone(), id, item, signature));
        Ok(())
    }

    /// A note from this side's own tasks: applied to the files in flight, or a comparison's
    /// answer sent to the receiver and itemised.
    pub(super) async fn on_note(&mut self, note: Internal) -> Result<(), EngineError> {
        match take_note(&mut self.transfers, note) {
            Ok(None) => {}
            Ok(Some(Internal::Compared { id, same, error })) => {
                let Some((item, meta)) = self.comparing.remove(&id) else {
                    return Ok(());
                };
                self.in_flight -= 1;
                if let Some(e) = error {
                    self.problems.error(&*self.events, e);
                }
                let (path, size) = (ItemPath::new(&item.entry.path), item.entry.size);
                let answer = if same {
                    Msg::Same { id }
                } else {
                    Msg::Differs { id }
                };
                if self.ctx.control.send(answer).await.is_err() {
                    return Err(EngineError::Transport(format!("the {CONTROL_CLOSED}")));
                }
                if !same {
                    self.events.event(Event::Item {
                        path,
                        action: Action::Delta,
                        size,
                    });
                    Stats::add(&self.stats.files_to_send, 1);
                    Stats::add(&self.stats.bytes_to_send, size);
                } else if meta {
                    self.summary.files_meta_only += 1;
                    self.events.event(Event::Item {
                        path,
                        action: Action::Meta,
                        size,
                    });
                }
            }
            Ok(Some(_)) => {}
            Err(e) => return Err(e),
        }
        Ok(())
    }
}
