//! The data connections of a receiving session: accepting them, applying each data,
//! zero and copy frame to its file's work file (opened once, in place or beside the
//! target), and failing a file whose frames cannot be applied.

use super::*;

/// Accept data connections and apply every frame that arrives on them. Aborting this task
/// aborts the readers too (they hold the control writer open through `Shared`), so a session
/// that ends in an error does not wait for a stalled peer to close its data connections.
pub(super) async fn accept_data(
    mut data: mpsc::Receiver<Conn>,
    shared: Arc<Shared>,
    fatal: mpsc::Sender<EngineError>,
) {
    let mut tasks = tokio::task::JoinSet::new();
    while let Some(conn) = data.recv().await {
        let s = shared.clone();
        let f = fatal.clone();
        tasks.spawn(async move {
            let Conn { mut reader, writer } = conn;
            let _keep_open = writer;
            loop {
                match reader.recv().await {
                    Ok(Some(msg)) => {
                        if let Err(e) = apply_data(&s, msg).await {
                            let _ = f.send(e).await;
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        let why = format!("data connection failed: {e}");
                        let err = if e.is_transport() {
                            EngineError::Transport(why)
                        } else {
                            EngineError::Protocol(why)
                        };
                        let _ = f.send(err).await;
                        return;
                    }
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
}

/// Apply one data-plane frame.
pub(super) async fn apply_data(shared: &Arc<Shared>, msg: Msg) -> Result<(), EngineError> {
    match msg {
        Msg::SmallFiles { files } => {
            // One blocking call for the whole frame: a thread hand-off per small file cost
            // more than writing it.
            let work: Vec<(RFile, SmallFile)> = {
                let mut map = lock(&shared.files);
                files
                    .into_iter()
                    .filter_map(|f| map.remove(&f.id).map(|rf| (rf, f)))
                    .collect()
            };
            let s = shared.clone();
            let done = tokio::task::spawn_blocking(move || {
                work.into_iter()
                    .map(|(rf, f)| {
                        let id = f.id;
                        let path = rf.entry.path.clone();
                        let result = match write_small(&s, rf, f) {
                            Ok(n) => FileResult::Written {
                                literal: n,
                                copied: 0,
                            },
                            Err((reason, retry)) => FileResult::Failed { reason, retry },
                        };
                        note_outcome(&s, path, &result);
                        (id, result)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| EngineError::Local(e.to_string()))?;
            for (id, result) in done {
                if shared.dest.halted.get().is_none() {
                    let _ = shared.control.send(Msg::FileDone { id, result }).await;
                }
            }
            halted(shared)
        }
        Msg::Data { .. } | Msg::Zero { .. } | Msg::Copy { .. } => {
            let Some(id) = msg.counted_file() else {
                return Ok(());
            };
            let covers = match &msg {
                Msg::Data { data, .. } => data.len() as u64,
                // A sender zeroes at most a leaf per frame; more would let one frame cost
                // the receiver a terabyte of writes into a device.
                Msg::Zero { len, .. } if *len > LEAF as u64 => {
                    return Err(EngineError::Protocol(format!(
                        "a zero frame of {len} bytes (at most {LEAF})"
                    )))
                }
                Msg::Zero { len, .. } => *len,
                Msg::Copy { ops, .. } => ops.iter().fold(0u64, |n, op| n.saturating_add(op.len)),
                _ => 0,
            };
            let opened = {
                let mut files = lock(&shared.files);
                match files.get_mut(&id) {
                    None => return Ok(()), // aborted or failed already
                    Some(f) => match open_work(&shared.dest, f) {
                        Ok(()) => Ok((
                            f.out.clone(),
                            f.basis_file.clone(),
                            f.fresh,
                            f.in_place,
                            f.changed,
                        )),
                        Err(reason) => {
                            note_failure(shared, &f.entry.path, &reason);
                            files.remove(&id);
                            Err(reason)
                        }
                    },
                }
            };
            let (out, basis, fresh, in_place, changed) = match opened {
                Ok((Some(out), basis, fresh, in_place, changed)) => {
                    (out, basis, fresh, in_place, changed)
                }
                Ok((None, ..)) => return Ok(()),
                Err(reason) => return fail_file(shared, id, reason).await,
            };
            // A tracked volume's blocks are scattered: start writing each to the disk as it
            // lands, so that the end-of-pass sync overlaps the transfer instead of following
            // it (fadvise DONTNEED starts the writeback without waiting for it).
            let early = match &msg {
                Msg::Data { offset, data, .. } if changed => Some((*offset, data.len() as u64)),
                _ => None,
            };
            let written = tokio::task::spawn_blocking(move || {
                let r = write_frame(&out, basis.as_deref(), fresh, in_place, msg);
                if let (Ok(_), Some((offset, len))) = (&r, early) {
                    let _ = rustix::fs::fadvise(
                        &*out,
                        offset,
                        std::num::NonZeroU64::new(len),
                        rustix::fs::Advice::DontNeed,
                    );
                }
                r
            })
            .await
            .map_err(|e| EngineError::Local(e.to_string()))?;
            let ready = {
                let mut files = lock(&shared.files);
                match (files.get_mut(&id), written) {
                    (None, _) => Ok(false),
                    (Some(f), Ok((lit, cop))) => {
                        f.seen += 1;
                        f.covered = f.covered.saturating_add(covers);
                        f.literal += lit;
                        f.copied += cop;
                        Stats::add(&shared.stats.literal_bytes, lit);
                        Stats::add(&shared.stats.copied_bytes, cop);
                        Ok(matches!(f.end, Some((frames, _, _)) if frames == f.seen))
                    }
                    (Some(_), Err(e)) => {
                        let pending = pending_bytes(&files);
                        let f = files.remove(&id);
                        let (shown, path) = f.map(|f| (f.shown, f.entry.path)).unwrap_or_default();
                        let reason = halt_if_full(shared, &e, || pending)
                            .unwrap_or_else(|| format!("{}: {e}", shown.display()));
                        note_failure(shared, &path, &reason);
                        Err(reason)
                    }
                }
            };
            let ready = match ready {
                Ok(r) => r,
                Err(reason) => return fail_file(shared, id, reason).await,
            };
            if ready {
                finish_file(shared.clone(), id, commit).await;
            }
            halted(shared)
        }
        other => Err(EngineError::Protocol(format!(
            "unexpected message on a data connection: {:?}",
            std::mem::discriminant(&other)
        ))),
    }
}

pub(super) async fn fail_file(shared: &Shared, id: u64, reason: String) -> Result<(), EngineError> {
    halted(shared)?;
    let _ = shared
        .control
        .send(Msg::FileDone {
            id,
            result: FileResult::Failed {
                reason,
                retry: false,
            },
        })
        .await;
    Ok(())
}

/// The target of a file and the file its bytes go to (the partial file, or the target itself).
pub(super) fn places(dest: &Dest, f: &RFile) -> Result<(Place, Place), String> {
    let target = dest.place(&f.entry.path)?;
    let work = if f.in_place {
        target.clone()
    } else {
        target.sibling(&partial_name(target.name()))
    };
    Ok((target, work))
}

/// Open the file that receives writes (and the basis), once.
pub(super) fn open_work(dest: &Dest, f: &mut RFile) -> Result<(), String> {
    if f.out.is_some() {
        return Ok(());
    }
    let (target, work) = places(dest, f)?;
    let out = work
        .open_write(f.fresh && !f.in_place)
        .map_err(|e| format!("{}: cannot open for writing: {e}", f.shown.display()))?;
    if !f.in_place || !is_block_device(&out) {
        out.set_len(f.entry.size).map_err(|e| {
            format!(
                "{}: cannot size to {} bytes: {e}",
                f.shown.display(),
                f.entry.size
            )
        })?;
    }
    let out = Arc::new(out);
    // The basis is the work file itself, except for a delta against the target into a
    // partial file.
    f.basis_file = match f.basis {
        None => None,
        Some(Basis::Target) if !f.in_place => {
            let bf = target
                .open_read()
                .map_err(|e| format!("{}: cannot read basis: {e}", target.shown().display()))?;
            Some(Arc::new(bf))
        }
        Some(_) => Some(out.clone()),
    };
    f.out = Some(out);
    Ok(())
}
