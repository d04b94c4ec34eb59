//! Building the file list: numbering scanned entries into `FileList` batches (hard links
//! found on the way), listing again a file that must be sent again, and `EndOfList`.

use super::*;

/// Stat a listed file again for a rescan.
pub(super) fn recapture(item: &ScanItem) -> Result<ScanItem, String> {
    let md = std::fs::symlink_metadata(&item.abs).map_err(|e| format!("{e}"))?;
    let mut entry = cofs::meta::capture(
        item.entry.path.clone(),
        &item.abs,
        &md,
        !item.entry.xattrs.is_empty(),
    )
    .map_err(|e| e.to_string())?;
    if item.entry.kind == EntryKind::Volume {
        entry.kind = EntryKind::Volume;
        entry.size = item.entry.size;
    }
    Ok(item.restated(entry, LocalInfo::of(&md)))
}

impl LoopState {
    /// Re-list files that must be sent again, one small batch each.
    pub(super) async fn relist(&mut self) {
        for (item, retries) in self.rescans.drain(..) {
            let entry = match recapture(&item) {
                Ok(e) => e,
                Err(e) => {
                    self.problems
                        .changed(&*self.events, display(&item.entry.path), e);
                    continue;
                }
            };
            let id = self.next_id;
            self.next_id += 1;
            let batch = self.next_batch;
            self.next_batch += 1;
            self.retries_by_id.insert(id, retries);
            let msg = Msg::FileList {
                batch,
                first_id: id,
                entries: vec![entry.entry.clone()],
                rescan: true,
                implied: Vec::new(),
            };
            self.batches.insert(batch, vec![(id, entry)]);
            self.in_flight += 1;
            if self.ctx.control.send(msg).await.is_err() {
                break;
            }
        }
    }

    /// Once the walk is over and nothing is in flight, tell the receiver the list ends.
    pub(super) async fn end_if_done(&mut self) {
        if self.scan_done
            && !self.end_sent
            && self.batches.is_empty()
            && self.awaiting_sig.is_empty()
            && self.transfers.is_empty()
            && self.small.is_empty()
            && self.compare_wait.is_empty()
            && self.comparing.is_empty()
        {
            self.end_sent = true;
            let _ = self
                .ctx
                .control
                .send(Msg::EndOfList {
                    batches: self.next_batch,
                    entries: self.next_id,
                })
                .await;
        }
    }

    /// What the walk handed over: a batch to number and list (hard links found on the way),
    /// a problem to report, the walk's end.
    pub(super) async fn on_scanned(&mut self, scanned: Option<ScanMsg>) -> Result<(), EngineError> {
        match scanned {
            None => {
                self.scan_done = true;
                self.stats.scan_done.store(true, Ordering::Relaxed);
            }
            Some(ScanMsg::Error(e)) => match e {
                cofs::FsError::Vanished { path } => self.problems.changed(
                    &*self.events,
                    path.display().to_string(),
                    "vanished during the scan".into(),
                ),
                other => self.problems.error(&*self.events, other.to_string()),
            },
            Some(ScanMsg::Listed {
                path,
                missing,
                reason,
            }) => {
                listed::report(
                    &*self.events,
                    &self.problems,
                    &mut self.summary,
                    &path,
                    missing,
                    reason.clone(),
                );
                let problem = Msg::ListedProblem {
                    path,
                    missing,
                    reason,
                };
                if self.ctx.control.send(problem).await.is_err() {
                    return Err(EngineError::Peer(CONTROL_CLOSED.into()));
                }
            }
            Some(ScanMsg::Fatal(why)) => return Err(EngineError::Local(why)),
            Some(ScanMsg::Batch(items, implied)) => {
                let batch = self.next_batch;
                self.next_batch += 1;
                let mut entries = Vec::with_capacity(items.len());
                let mut listed = Vec::with_capacity(items.len());
                for mut item in items {
                    if self.opts.hard_links
                        && item.entry.kind == EntryKind::File
                        && item.local.nlink > 1
                    {
                        let key = (item.local.dev, item.local.ino);
                        match self.links.get(&key) {
                            Some(first) => {
                                item.entry.kind = EntryKind::HardLink {
                                    first: first.clone(),
                                }
                            }
                            None => {
                                self.links.insert(key, item.entry.path.clone());
                            }
                        }
                    }
                    Stats::add(&self.stats.entries_scanned, 1);
                    entries.push(item.entry.clone());
                    listed.push((self.next_id, item));
                    self.next_id += 1;
                }
                self.in_flight += listed.len();
                let first_id = listed.first().map(|(id, _)| *id).unwrap_or(self.next_id);
                self.batches.insert(batch, listed);
                if self
                    .ctx
                    .control
                    .send(Msg::FileList {
                        batch,
                        first_id,
                        entries,
                        rescan: false,
                        implied,
                    })
                    .await
                    .is_err()
                {
                    return Err(EngineError::Peer(CONTROL_CLOSED.into()));
                }
            }
        }
        Ok(())
    }
}
