//! Delta descents against the receiver's signature: positional (1 MiB hashes, then finer
//! levels asked for by `HashRequest`) or content-defined chunks, planned into copy and
//! literal jobs; and a dry run's `--checksum` comparison.

use super::*;

/// Copy ops per `Copy` frame.
pub(super) const COPY_OPS_PER_FRAME: usize = 4096;

/// Open a file to send (off the runtime), or give it up with the reason.
pub(super) async fn open_or_abort(ctx: &Ctx, id: u64, item: ScanItem) -> Option<Arc<BigFile>> {
    let opened = tokio::task::spawn_blocking(move || open_big(id, &item)).await;
    match opened {
        Ok(Ok(b)) => Some(Arc::new(b)),
        Ok(Err((why, vanished))) => {
            abort(ctx, id, why, vanished).await;
            None
        }
        Err(e) => {
            abort(ctx, id, e.to_string(), false).await;
            None
        }
    }
}

/// Compute and send a delta for one file against the receiver's signature.
pub(super) async fn run_delta(ctx: Arc<Ctx>, id: u64, item: ScanItem, signature: Signature) {
    let Some(big) = open_or_abort(&ctx, id, item).await else {
        return;
    };
    let planned = match signature {
        Signature::Positional {
            basis_size, hashes, ..
        } => positional(&ctx, &big, basis_size, hashes).await,
        Signature::Chunks { avg, chunks, .. } => {
            let b = big.clone();
            tokio::task::spawn_blocking(move || plan_cdc(&b, avg, &chunks))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
        }
        Signature::Unavailable => {
            let b = big.clone();
            tokio::task::spawn_blocking(move || plan_cdc(&b, 1 << 20, &[]))
                .await
                .unwrap_or_else(|e| Err(e.to_string()))
        }
    };
    let plan = match planned {
        Ok(p) => p,
        Err(why) => return abort(&ctx, id, format!("{}: {why}", big.display), false).await,
    };
    // The plan's digest and hashes come from a read that a writer crossed: not a version.
    if let Some(reason) = torn(&big) {
        return abort_changed(&ctx, id, reason).await;
    }
    if let Some(reason) = plan.moved {
        let _ = ctx.internal.send(Internal::Changed { id, reason }).await;
    }
    if plan.same {
        // Noted before the answer, so the completion finds it (see the `FileDone` arm).
        let _ = ctx.internal.send(Internal::Unchanged { id }).await;
        let _ = ctx.control.send(Msg::Same { id }).await;
        return;
    }
    let mut frames = 0u64;
    let mut copies = Vec::new();
    for op in plan.ops {
        match op {
            DeltaOp::Copy { src, len, dst } => {
                copies.push(CopyOp { src, len, dst });
                if copies.len() == COPY_OPS_PER_FRAME {
                    frames += 1;
                    let ops = std::mem::take(&mut copies);
                    if ctx.jobs.send(Job::Copy { id, ops }).await.is_err() {
                        return;
                    }
                }
            }
            DeltaOp::Literal { dst, len } => {
                frames += 1;
                let job = Job::Literals {
                    file: big.clone(),
                    ranges: vec![(dst, len)],
                };
                if ctx.jobs.send(job).await.is_err() {
                    return;
                }
            }
        }
    }
    if !copies.is_empty() {
        frames += 1;
        if ctx.jobs.send(Job::Copy { id, ops: copies }).await.is_err() {
            return;
        }
    }
    let _ = ctx
        .control
        .send(Msg::FileEnd {
            id,
            size: big.size,
            frames,
            digest: plan.digest,
        })
        .await;
}

/// `Need::Changed`: send the blocks of a tracked volume written since the destination's
/// last pass, as literals at their offsets, and nothing else; only they are read. A block
/// written again while it is read is in the volume's next pass, so no torn-read check.
pub(super) async fn send_changed(
    ctx: Arc<Ctx>,
    id: u64,
    item: ScanItem,
    changed: Arc<ChangedBlocks>,
) {
    let Some(big) = open_or_abort(&ctx, id, item).await else {
        return;
    };
    if changed.size() != big.size {
        let why = format!(
            "{}: the volume's bitmap covers {} bytes but its backing holds {}",
            big.display,
            changed.size(),
            big.size
        );
        return abort(&ctx, id, why, false).await;
    }
    // Scattered blocks go many to a job (up to MAX_PIECE bytes): one blocking read task
    // and one queue hand-off for dozens of 16 KiB blocks instead of one each.
    let mut frames = 0u64;
    let mut ranges = Vec::new();
    let mut bytes = 0u64;
    let mut extents = changed.extents(MAX_PIECE).peekable();
    while let Some((offset, len)) = extents.next() {
        frames += 1;
        ranges.push((offset, len));
        bytes += len;
        if bytes >= MAX_PIECE || extents.peek().is_none() {
            bytes = 0;
            let job = Job::Literals {
                file: big.clone(),
                ranges: std::mem::take(&mut ranges),
            };
            if ctx.jobs.send(job).await.is_err() {
                return;
            }
        }
    }
    let _ = ctx
        .control
        .send(Msg::FileEnd {
            id,
            size: big.size,
            frames,
            digest: [0; 32],
        })
        .await;
}

/// A dry run with --checksum: compare the source's content with the receiver's hashes of
/// its file (`Need::Compare`) and tell the main loop whether they are the same. A file that
/// cannot be read counts as differing (and is reported).
pub(super) async fn compare(ctx: Arc<Ctx>, id: u64, item: ScanItem, signature: Signature) {
    let r = tokio::task::spawn_blocking(move || -> Result<bool, String> {
        let Signature::Positional {
            basis_size,
            block,
            hashes,
        } = signature
        else {
            return Ok(false); // the receiver could not read its file
        };
        let big = open_big(id, &item).map_err(|(why, _)| why)?;
        if basis_size != big.size || block as usize != LEAF {
            return Ok(false);
        }
        let (leaves, _) = read_leaves(&big).map_err(|e| format!("{}: {e}", big.display))?;
        Ok(leaves.len() == hashes.len()
            && leaves
                .iter()
                .map(chunk::truncate)
                .eq(hashes.iter().copied()))
    })
    .await;
    let (same, error) = match r {
        Ok(Ok(same)) => (same, None),
        Ok(Err(e)) => (false, Some(e)),
        Err(e) => (false, Some(e.to_string())),
    };
    let _ = ctx
        .internal
        .send(Internal::Compared { id, same, error })
        .await;
}

pub(super) struct Plan {
    ops: Vec<DeltaOp>,
    digest: [u8; 32],
    same: bool,
    moved: Option<String>,
}

/// Read the whole source once: digest leaves (which are also the coarsest positional hashes).
pub(super) fn read_leaves(big: &BigFile) -> Result<(Vec<[u8; 32]>, Option<String>), String> {
    let mut leaves = Vec::with_capacity(big.size.div_ceil(LEAF as u64) as usize);
    let mut off = 0u64;
    while off < big.size {
        let len = (big.size - off).min(LEAF as u64) as usize;
        let data = read_at(&big.file, off, len).map_err(|e| e.to_string())?;
        leaves.push(chunk::leaf_hash(&data));
        if data.len() < len {
            big.short.store(true, Ordering::Release);
            break;
        }
        off += len as u64;
    }
    let moved = big
        .file
        .metadata()
        .ok()
        .and_then(|md| moved(&big.scan, &md));
    Ok((leaves, moved))
}

/// Positional delta: compare 1 MiB hashes, then descend into the pieces that differ.
pub(super) async fn positional(
    ctx: &Arc<Ctx>,
    big: &Arc<BigFile>,
    basis_size: u64,
    theirs: Vec<BlockHash>,
) -> Result<Plan, String> {
    let b = big.clone();
    let (leaves, moved) = tokio::task::spawn_blocking(move || read_leaves(&b))
        .await
        .map_err(|e| e.to_string())??;
    let digest = chunk::file_digest(big.size, &leaves);
    let ours: Vec<BlockHash> = leaves.iter().map(chunk::truncate).collect();
    let common = big.size.min(basis_size);
    let same = big.size == basis_size && ours == theirs;
    if same {
        return Ok(Plan {
            ops: Vec::new(),
            digest,
            same,
            moved,
        });
    }
    // Ranges (offset, len) still differing at the current level, within the common length.
    let mut diff: Vec<(u64, u64)> = chunk::differing_blocks(&ours, &theirs)
        .into_iter()
        .map(|i| i as u64 * LEAF as u64)
        .filter(|&o| o < common)
        .map(|o| (o, (common - o).min(LEAF as u64)))
        .collect();
    for &level in &LEVELS[1..] {
        if diff.is_empty() {
            break;
        }
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = ctx.hash_waiters.lock() {
            w.insert(big.id, tx);
        }
        ctx.control
            .send(Msg::HashRequest {
                id: big.id,
                block: level,
                ranges: diff.clone(),
            })
            .await
            .map_err(|_| CONTROL_CLOSED.to_string())?;
        let b = big.clone();
        let ranges = diff.clone();
        let ours =
            tokio::task::spawn_blocking(move || hash_ranges(&b.file, &ranges, level as usize))
                .await
                .map_err(|e| e.to_string())??;
        let theirs = rx
            .await
            .map_err(|_| "the receiver did not answer a hash request".to_string())?;
        let blocks = blocks_of(&diff, level as u64);
        if theirs.len() != blocks.len() || ours.len() != blocks.len() {
            return Err(format!("hash count mismatch at {level}-byte level"));
        }
        diff = blocks
            .into_iter()
            .zip(ours.iter().zip(theirs.iter()))
            .filter(|(_, (a, b))| a != b)
            .map(|(r, _)| r)
            .collect();
    }
    // Everything in the common part outside `diff` is copied; `diff` and the tail are literal.
    let mut ops = Vec::new();
    let mut co = OpCoalescer::new(LEAF as u64);
    let mut at = 0u64;
    for &(off, len) in &diff {
        if off > at {
            co.push(
                DeltaOp::Copy {
                    src: at,
                    len: off - at,
                    dst: at,
                },
                &mut ops,
            );
        }
        co.push(DeltaOp::Literal { dst: off, len }, &mut ops);
        at = off + len;
    }
    if common > at {
        co.push(
            DeltaOp::Copy {
                src: at,
                len: common - at,
                dst: at,
            },
            &mut ops,
        );
    }
    if big.size > common {
        co.push(
            DeltaOp::Literal {
                dst: common,
                len: big.size - common,
            },
            &mut ops,
        );
    }
    co.finish(&mut ops);
    Ok(Plan {
        ops,
        digest,
        same: false,
        moved,
    })
}

/// Split ranges into `block`-sized pieces (the last piece of a range may be short).
pub(crate) fn blocks_of(ranges: &[(u64, u64)], block: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    for &(off, len) in ranges {
        let mut o = off;
        while o < off + len {
            let l = (off + len - o).min(block);
            out.push((o, l));
            o += l;
        }
    }
    out
}

/// Hashes of `block`-sized pieces of the given ranges of `file`, in order.
pub(crate) fn hash_ranges(
    file: &File,
    ranges: &[(u64, u64)],
    block: usize,
) -> Result<Vec<BlockHash>, String> {
    let block = block.max(1);
    let mut out = Vec::new();
    for &(off, len) in ranges {
        let data = read_at(file, off, len as usize).map_err(|e| e.to_string())?;
        let mut hashes = chunk::block_hashes(&data, block);
        // A short read (the file shrank) still yields one hash per expected piece; zero
        // matches nothing real, so those pieces are sent.
        hashes.resize((len as usize).div_ceil(block), 0);
        out.extend(hashes);
    }
    Ok(out)
}

/// Content-defined delta: chunk the source, copy chunks the basis has, send the rest.
pub(super) fn plan_cdc(big: &BigFile, avg: u32, basis: &[(u32, u64)]) -> Result<Plan, String> {
    let params = CdcParams::from_avg(avg);
    let index = ChunkIndex::new(basis);
    let mut chunker = chunk::StreamChunker::new(params);
    let mut digest = DigestBuilder::new();
    let mut chunks = Vec::new();
    let mut ops = Vec::new();
    let mut co = OpCoalescer::new(LEAF as u64);
    let mut off = 0u64;
    let emit = |chunks: &mut Vec<chunk::ChunkRef>, ops: &mut Vec<DeltaOp>, co: &mut OpCoalescer| {
        for c in chunks.drain(..) {
            let op = match index.lookup(c.len, c.hash) {
                Some(src) => DeltaOp::Copy {
                    src,
                    len: u64::from(c.len),
                    dst: c.offset,
                },
                None => DeltaOp::Literal {
                    dst: c.offset,
                    len: u64::from(c.len),
                },
            };
            co.push(op, ops);
        }
    };
    while off < big.size {
        let len = (big.size - off).min(LEAF as u64) as usize;
        let data = read_at(&big.file, off, len).map_err(|e| e.to_string())?;
        digest.update(&data);
        chunker.push(&data, &mut chunks);
        emit(&mut chunks, &mut ops, &mut co);
        if data.len() < len {
            big.short.store(true, Ordering::Release);
            break;
        }
        off += len as u64;
    }
    chunker.finish(&mut chunks);
    emit(&mut chunks, &mut ops, &mut co);
    co.finish(&mut ops);
    let moved = big
        .file
        .metadata()
        .ok()
        .and_then(|md| moved(&big.scan, &md));
    Ok(Plan {
        ops,
        digest: digest.finish(),
        same: false,
        moved,
    })
}
