//! The job queue and the data connections: full transfers cut into segments, the writer on
//! each data connection turning jobs into frames (small-file batches, segments, literals,
//! copies), and giving up on a file that failed or changed while it was read.

use super::*;

/// A job on the shared queue: whatever one data connection sends next.
pub(super) enum Job {
    Small(Vec<SmallJob>),
    Segment {
        file: Arc<BigFile>,
        index: u64,
    },
    /// Ranges of one file sent as they are, one frame each, read in one blocking task
    /// (a tracked volume's scattered blocks go many to a job).
    Literals {
        file: Arc<BigFile>,
        ranges: Vec<(u64, u64)>,
    },
    Copy {
        id: u64,
        ops: Vec<CopyOp>,
    },
}

pub(super) struct SmallJob {
    pub(super) id: u64,
    pub(super) item: ScanItem,
}

/// Give up on a file that changed while it was read: the receiver keeps its previous
/// version (and the partial file, the basis of the next attempt); the main loop lists the
/// file again, or reports it as changed once its retries are spent.
pub(super) async fn abort_changed(ctx: &Ctx, id: u64, reason: String) {
    let _ = ctx
        .internal
        .send(Internal::Changed {
            id,
            reason: reason.clone(),
        })
        .await;
    let _ = ctx.control.send(Msg::FileAbort { id, reason }).await;
}

pub(super) async fn abort(ctx: &Ctx, id: u64, reason: String, vanished: bool) {
    let _ = ctx
        .internal
        .send(Internal::Failed {
            id,
            reason: reason.clone(),
            vanished,
        })
        .await;
    let _ = ctx.control.send(Msg::FileAbort { id, reason }).await;
}

/// Queue every segment of a file the receiver does not have at all.
pub(super) fn spawn_full(ctx: Arc<Ctx>, id: u64, item: ScanItem) {
    tokio::spawn(async move {
        let Some(big) = open_or_abort(&ctx, id, item).await else {
            return;
        };
        let segments = big.size.div_ceil(LEAF as u64);
        if let Ok(mut l) = big.leaves.lock() {
            *l = vec![[0u8; 32]; segments as usize];
        }
        if segments == 0 {
            let _ = finish_full(&ctx, &big).await;
            return;
        }
        big.remaining.store(segments, Ordering::Release);
        for index in 0..segments {
            let job = Job::Segment {
                file: big.clone(),
                index,
            };
            if ctx.jobs.send(job).await.is_err() {
                return;
            }
        }
    });
}

/// After the last segment of a full transfer: check for live changes, send `FileEnd`.
pub(super) async fn finish_full(ctx: &Ctx, big: &BigFile) -> Result<(), EngineError> {
    if let Some(reason) = torn(big) {
        abort_changed(ctx, big.id, reason).await;
        return Ok(());
    }
    let leaves = big.leaves.lock().map(|l| l.clone()).unwrap_or_default();
    let digest = chunk::file_digest(big.size, &leaves);
    if let Ok(md) = big.file.metadata() {
        if let Some(reason) = moved(&big.scan, &md) {
            let _ = ctx
                .internal
                .send(Internal::Changed { id: big.id, reason })
                .await;
        }
    }
    let frames = leaves.len() as u64;
    ctx.control
        .send(Msg::FileEnd {
            id: big.id,
            size: big.size,
            frames,
            digest,
        })
        .await
        .map_err(|_| EngineError::Local(CONTROL_CLOSED.into()))
}

/// Accept data connections as they come and run a writer on each.
pub(super) async fn accept_data(
    mut data: mpsc::Receiver<Conn>,
    jobs: async_channel::Receiver<Job>,
    ctx: Arc<Ctx>,
    limiter: Option<Arc<RateLimiter>>,
    compress: bool,
) {
    // Aborting this task aborts the writers with it.
    let mut writers = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            conn = data.recv() => match conn {
                Some(c) => { writers.spawn(data_writer(c, jobs.clone(), ctx.clone(), limiter.clone(), compress)); }
                None => break,
            },
            _ = wait_closed(&jobs) => break,
        }
    }
    drop(ctx);
    while writers.join_next().await.is_some() {}
}

pub(super) async fn wait_closed(jobs: &async_channel::Receiver<Job>) {
    while !jobs.is_closed() {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

pub(super) async fn data_writer(
    conn: Conn,
    jobs: async_channel::Receiver<Job>,
    ctx: Arc<Ctx>,
    limiter: Option<Arc<RateLimiter>>,
    compress: bool,
) {
    let Conn { reader, mut writer } = conn;
    // Nothing is expected back on a data connection; reading notices when it goes away.
    let (drain_tx, _drain_rx) = mpsc::channel(1);
    tokio::spawn(forward(reader, drain_tx, None));
    let compress = compress && writer.is_framed();
    while let Ok(job) = jobs.recv().await {
        let (msgs, done) = materialize(job, &ctx).await;
        for msg in msgs {
            if let Some(l) = &limiter {
                l.take(wire_size(&msg)).await;
            }
            if let Err(e) = writer.send(msg, compress).await {
                let _ = ctx
                    .internal
                    .send(Internal::Lost(format!("data connection failed: {e}")))
                    .await;
                return;
            }
        }
        if let Some(big) = done {
            if big.remaining.fetch_sub(1, Ordering::AcqRel) == 1
                && !big.failed.load(Ordering::Acquire)
            {
                if let Err(e) = finish_full(&ctx, &big).await {
                    let _ = ctx.internal.send(Internal::Fatal(e.to_string())).await;
                }
            }
        }
    }
    writer.close().await;
}

pub(super) fn wire_size(msg: &Msg) -> u64 {
    match msg {
        Msg::Data { data, .. } => data.len() as u64 + 32,
        Msg::SmallFiles { files } => files.iter().map(|f| f.data.len() as u64 + 48).sum(),
        Msg::Copy { ops, .. } => ops.len() as u64 * 24,
        _ => 32,
    }
}

/// Turn a job into the frames to send; `Some(file)` when a full-transfer segment was sent.
pub(super) async fn materialize(job: Job, ctx: &Arc<Ctx>) -> (Vec<Msg>, Option<Arc<BigFile>>) {
    match job {
        Job::Copy { id, ops } => (vec![Msg::Copy { id, ops }], None),
        Job::Small(list) => {
            let out = tokio::task::spawn_blocking(move || read_small(list)).await;
            let Ok((files, notes)) = out else {
                return (Vec::new(), None);
            };
            for n in notes {
                match n {
                    SmallNote::Changed(id, reason) => {
                        let _ = ctx.internal.send(Internal::Changed { id, reason }).await;
                    }
                    SmallNote::Torn(id, reason) => abort_changed(ctx, id, reason).await,
                    SmallNote::Failed(id, reason, vanished) => {
                        abort(ctx, id, reason, vanished).await
                    }
                }
            }
            let sent: u64 = files.iter().map(|f| f.data.len() as u64).sum();
            Stats::add(&ctx.stats.literal_bytes, sent);
            if files.is_empty() {
                (Vec::new(), None)
            } else {
                (vec![Msg::SmallFiles { files }], None)
            }
        }
        Job::Segment { file, index } => {
            let big = file.clone();
            let offset = index * LEAF as u64;
            let len = (big.size - offset).min(LEAF as u64) as usize;
            let read = tokio::task::spawn_blocking(move || {
                let data = read_at(&big.file, offset, len)?;
                let hash = chunk::leaf_hash(&data);
                if let Ok(mut l) = big.leaves.lock() {
                    if let Some(slot) = l.get_mut(index as usize) {
                        *slot = hash;
                    }
                }
                Ok::<_, std::io::Error>(data)
            })
            .await;
            match read {
                Ok(Ok(data)) => {
                    if data.len() < len {
                        // The file shrank under us: `finish_full` gives it up instead of ending
                        // it (the receiver keeps its previous version), and it is listed again.
                        note_shrank(ctx, &file).await;
                    }
                    Stats::add(&ctx.stats.literal_bytes, data.len() as u64);
                    (vec![data_or_zero(file.id, offset, data)], Some(file))
                }
                Ok(Err(e)) => {
                    if !file.failed.swap(true, Ordering::AcqRel) {
                        abort(
                            ctx,
                            file.id,
                            format!("{}: read failed: {e}", file.display),
                            false,
                        )
                        .await;
                    }
                    (Vec::new(), Some(file))
                }
                Err(_) => (Vec::new(), Some(file)),
            }
        }
        Job::Literals { file, ranges } => {
            let big = file.clone();
            let read = tokio::task::spawn_blocking(move || {
                let mut out = Vec::with_capacity(ranges.len());
                let mut short = false;
                for (offset, len) in ranges {
                    let data = read_at(&big.file, offset, len as usize)?;
                    short |= data.len() < len as usize;
                    out.push((offset, data));
                }
                Ok::<_, std::io::Error>((out, short))
            })
            .await;
            match read {
                Ok(Ok((pieces, short))) => {
                    if short {
                        // The file shrank after its delta was planned (and `FileEnd` sent):
                        // the receiver refuses the short file, and this note makes that a
                        // change to retry, not an error.
                        note_shrank(ctx, &file).await;
                    }
                    let sent: u64 = pieces.iter().map(|(_, d)| d.len() as u64).sum();
                    Stats::add(&ctx.stats.literal_bytes, sent);
                    let msgs = pieces
                        .into_iter()
                        .map(|(offset, data)| data_or_zero(file.id, offset, data))
                        .collect();
                    (msgs, None)
                }
                _ => {
                    if !file.failed.swap(true, Ordering::AcqRel) {
                        abort(
                            ctx,
                            file.id,
                            format!("{}: read failed", file.display),
                            false,
                        )
                        .await;
                    }
                    (Vec::new(), None)
                }
            }
        }
    }
}

/// `file` gave fewer bytes than its size promised: mark it short (so it is given up, not
/// ended) and report it as changed, to be listed again.
pub(super) async fn note_shrank(ctx: &Ctx, file: &BigFile) {
    file.short.store(true, Ordering::Release);
    let _ = ctx
        .internal
        .send(Internal::Changed {
            id: file.id,
            reason: "shrank while it was read".into(),
        })
        .await;
}

pub(super) fn data_or_zero(id: u64, offset: u64, data: Vec<u8>) -> Msg {
    if chunk::is_zero(&data) {
        Msg::Zero {
            id,
            offset,
            len: data.len() as u64,
        }
    } else {
        Msg::Data { id, offset, data }
    }
}
