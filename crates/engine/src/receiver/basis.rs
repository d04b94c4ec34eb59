//! The basis of a delta on the receiving side: open it (the target or a partial file, whose
//! unwritten ranges are filled from the target first), send its signature, and answer the
//! sender's requests for finer block hashes, each checked before it costs anything.

use super::*;

/// A signature to compute and send: of which file, against which basis, of which kind.
pub(super) struct SigJob {
    pub(super) id: u64,
    pub(super) rel: Vec<u8>,
    pub(super) basis: Basis,
    pub(super) positional: bool,
    pub(super) source_size: u64,
}

pub(super) async fn send_signature(shared: Arc<Shared>, job: SigJob) {
    let permit = shared.hashing.acquire().await;
    let id = job.id;
    let s = shared.clone();
    let sig = tokio::task::spawn_blocking(move || signature(&s.dest, &job)).await;
    drop(permit);
    let signature = match sig {
        Ok(Ok(s)) => s,
        _ => Signature::Unavailable,
    };
    // The size a device reports only through its ioctl, or a basis that changed since it
    // was listed: hash requests are checked against what the signature describes.
    if let Signature::Positional { basis_size, .. } | Signature::Chunks { basis_size, .. } =
        &signature
    {
        if let Some(f) = lock(&shared.files).get_mut(&id) {
            f.basis_size = *basis_size;
        }
    }
    let _ = shared.control.send(Msg::Signature { id, signature }).await;
}

/// Open the basis of a file to read: its target, or the partial file beside it.
pub(super) fn open_basis(
    dest: &Dest,
    rel: &[u8],
    basis: Basis,
) -> std::io::Result<(File, PathBuf)> {
    let target = dest.place(rel).map_err(std::io::Error::other)?;
    let place = match basis {
        Basis::Target => target,
        Basis::Partial => target.sibling(&partial_name(target.name())),
    };
    Ok((place.open_read()?, place.shown().to_path_buf()))
}

/// Before a partial file becomes the basis of a resumed transfer, copy the target's bytes
/// into the ranges the interrupted run never wrote (the partial's holes), up to the new
/// size. A positional delta against the partial then sends only what really differs from
/// the target, instead of everything the interruption left unwritten (measured with
/// `cutover-faults`: a kill during the delta of an 8 MiB file cost up to 8 MB more before).
/// Bytes wrongly filled (a literal run of zeros kept as a hole) only fail their block's
/// hash and are sent; the whole-file digest guards the result either way.
pub(super) fn fill_partial_from_target(dest: &Dest, rel: &[u8], upto: u64) -> std::io::Result<()> {
    use rustix::fs::SeekFrom;
    let target = dest.place(rel).map_err(std::io::Error::other)?;
    let Ok(from) = target.open_read() else {
        return Ok(()); // no target (or not a regular file): nothing to fill with
    };
    let md = from.metadata()?;
    if !md.is_file() {
        return Ok(());
    }
    let partial = target
        .sibling(&partial_name(target.name()))
        .open_write(false)?;
    let end = md.len().min(upto);
    if partial.metadata()?.len() < end {
        partial.set_len(end)?;
    }
    let mut at = 0u64;
    while at < end {
        let hole = match rustix::fs::seek(&partial, SeekFrom::Hole(at)) {
            Ok(h) => h,
            Err(_) => return Ok(()), // no hole reporting here: resume as before
        };
        if hole >= end {
            break;
        }
        let data = match rustix::fs::seek(&partial, SeekFrom::Data(hole)) {
            Ok(d) => d.min(end),
            Err(_) => end, // ENXIO: a hole up to the end
        };
        copy_range(
            &from,
            &partial,
            CopyOp {
                src: hole,
                len: data - hole,
                dst: hole,
            },
            Unwritten::Hole,
        )?;
        at = data;
    }
    Ok(())
}

pub(super) fn signature(dest: &Dest, job: &SigJob) -> std::io::Result<Signature> {
    if job.basis == Basis::Partial {
        fill_partial_from_target(dest, &job.rel, job.source_size)?;
    }
    let (file, shown) = open_basis(dest, &job.rel, job.basis)?;
    let basis_size = cofs::volume::size_of(&file, &shown).map_err(std::io::Error::other)?;
    let mut buf = vec![0u8; LEAF];
    let mut off = 0u64;
    if job.positional {
        let mut hashes = Vec::with_capacity(basis_size.div_ceil(LEAF as u64) as usize);
        while off < basis_size {
            let n = (basis_size - off).min(LEAF as u64) as usize;
            file.read_exact_at(&mut buf[..n], off)?;
            hashes.push(chunk::block_hash(&buf[..n]));
            off += n as u64;
        }
        return Ok(Signature::Positional {
            basis_size,
            block: LEAF as u32,
            hashes,
        });
    }
    let params = CdcParams::for_size(basis_size.max(job.source_size));
    let mut chunker = chunk::StreamChunker::new(params);
    let mut found = Vec::new();
    let mut chunks = Vec::new();
    while off < basis_size {
        let n = (basis_size - off).min(LEAF as u64) as usize;
        file.read_exact_at(&mut buf[..n], off)?;
        chunker.push(&buf[..n], &mut found);
        chunks.extend(found.drain(..).map(|c| (c.len, c.hash)));
        off += n as u64;
    }
    chunker.finish(&mut found);
    chunks.extend(found.drain(..).map(|c| (c.len, c.hash)));
    Ok(Signature::Chunks {
        basis_size,
        avg: params.avg,
        chunks,
    })
}

/// The most block hashes one answer may hold: what fits in a frame.
pub(super) const MAX_HASHES_PER_ANSWER: usize = proto::MAX_FRAME / 16;

/// How many block hashes a `HashRequest` asks for, if it is one an honest sender could make:
/// a level below the leaf, ranges of at most a leaf each, in order, not overlapping, and
/// within the basis (when the file is still in flight). Anything else ends the session
/// before it costs memory: `(0, u64::MAX)` alone would list 2^52 blocks.
pub(super) fn hash_request_blocks(
    block: u32,
    ranges: &[(u64, u64)],
    basis_size: Option<u64>,
) -> Result<usize, String> {
    if !LEVELS[1..].contains(&block) {
        return Err(format!(
            "hash request for {block}-byte blocks (levels are {:?})",
            &LEVELS[1..]
        ));
    }
    let mut at = 0u64;
    let mut blocks = 0usize;
    for &(off, len) in ranges {
        let end = off
            .checked_add(len)
            .filter(|_| len > 0 && len <= LEAF as u64);
        let Some(end) = end.filter(|_| off >= at) else {
            return Err(format!(
                "hash request range ({off}, {len}) is empty, longer than a leaf, overlapping or out of order"
            ));
        };
        if let Some(limit) = basis_size.filter(|&b| end > b) {
            return Err(format!(
                "hash request range ({off}, {len}) ends past the {limit}-byte basis"
            ));
        }
        blocks += len.div_ceil(u64::from(block)) as usize;
        if blocks > MAX_HASHES_PER_ANSWER {
            return Err(format!(
                "hash request for more than {MAX_HASHES_PER_ANSWER} blocks"
            ));
        }
        at = end;
    }
    Ok(blocks)
}

pub(super) async fn answer_hashes(
    shared: Arc<Shared>,
    permit: tokio::sync::OwnedSemaphorePermit,
    (id, block, ranges): (u64, u32, Vec<(u64, u64)>),
    expected: usize,
) {
    let basis = lock(&shared.files)
        .get(&id)
        .and_then(|f| Some((f.entry.path.clone(), f.basis?)));
    let hashes: Vec<BlockHash> = match basis {
        // The file failed or ended meanwhile: hashes that match nothing.
        None => vec![0; expected],
        Some((rel, basis)) => {
            let s = shared.clone();
            let r = tokio::task::spawn_blocking(move || {
                let (file, _) = open_basis(&s.dest, &rel, basis).map_err(|e| e.to_string())?;
                hash_ranges(&file, &ranges, (block as usize).max(1))
            })
            .await;
            match r {
                Ok(Ok(h)) => h,
                // Unreadable now: answer with hashes that match nothing, so all is sent.
                _ => vec![0; expected],
            }
        }
    };
    // Held until the answer is queued: a peer that reads no answers stalls its own session.
    let _ = shared.control.send(Msg::Hashes { id, block, hashes }).await;
    drop(permit);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_requests_an_honest_sender_makes_are_accepted() {
        let leaf = LEAF as u64;
        let ranges = [(0, leaf), (3 * leaf, 100)];
        assert_eq!(
            hash_request_blocks(LEVELS[1], &ranges, Some(4 * leaf)),
            Ok(16 + 1)
        );
        // A file no longer in flight has no basis to bound it; the frame cap still does.
        assert_eq!(hash_request_blocks(LEVELS[2], &ranges, None), Ok(256 + 1));
        assert_eq!(hash_request_blocks(LEVELS[2], &[], Some(0)), Ok(0));
    }

    #[test]
    fn hash_requests_no_honest_sender_makes_are_refused_before_allocating() {
        let leaf = LEAF as u64;
        for (block, ranges, basis) in [
            (LEVELS[1], vec![(0, u64::MAX)], None),
            (LEVELS[1], vec![(u64::MAX, 1)], None),
            (LEVELS[1], vec![(0, 0)], None),
            (LEVELS[1], vec![(0, leaf + 1)], None),
            (LEVELS[1], vec![(leaf, 10), (0, 10)], None),
            (LEVELS[1], vec![(0, 10), (5, 10)], None),
            (LEVELS[1], vec![(0, 10)], Some(5)),
            (0, vec![(0, 10)], None),
            (1, vec![(0, 10)], None),
            (LEVELS[0], vec![(0, 10)], None),
        ] {
            assert!(
                hash_request_blocks(block, &ranges, basis).is_err(),
                "{block} {ranges:?} {basis:?}"
            );
        }
        // Many leaf-long ranges: refused once the answer would not fit in a frame.
        let many: Vec<(u64, u64)> = (0..200_000).map(|i| (i * leaf, leaf)).collect();
        assert!(hash_request_blocks(LEVELS[2], &many, None).is_err());
    }
}
