//! `checksums`: BLAKE3 hashes of pieces of a hosted volume's backing, for a comparison of
//! two daemons' copies made from outside the replication link (a plan's `replica` task
//! verifies its cutover with it: the primary names the pieces written since the last mark
//! and hashes them, its peer hashes the same pieces, the runner compares).
//!
//! The comparison reads the backings directly, so it is independent of the link's own
//! checksum code; it is meant for a drained link with the application stopped (nothing
//! then changes on either side while both read).

use crate::control::{Checksums, Piece};
use crate::volumes::Hosted;

/// The longest piece hashed as one: what one mismatch names at most.
pub const PIECE: u64 = 1 << 20;
/// Pieces in one reply (at most 1 GiB read per request).
pub const MAX_PIECES: usize = 1024;

/// Hash the pieces `ranges` names (each `(offset, length)`, at most [`PIECE`] long, at most
/// [`MAX_PIECES`] of them), or, with `dirty`, the pieces written since the last mark (slot
/// 0's bitmap) from byte `from` on, cut into pieces of at most [`PIECE`]; `next` then says
/// where the following request starts.
pub(crate) fn checksums(
    h: &Hosted,
    dirty: bool,
    from: u64,
    ranges: &[(u64, u64)],
) -> Result<Checksums, String> {
    let size = h.backend.size();
    let name = &h.name;
    let (wanted, next) = if dirty {
        dirty_pieces(h, from, size)?
    } else {
        if ranges.len() > MAX_PIECES {
            return Err(format!(
                "volume {name:?}: {} pieces asked for; at most {MAX_PIECES} per request",
                ranges.len()
            ));
        }
        for &(offset, length) in ranges {
            if length == 0 || length > PIECE || offset.checked_add(length).is_none_or(|e| e > size)
            {
                return Err(format!(
                    "volume {name:?}: piece {offset}+{length} is empty, longer than {PIECE} bytes or past the volume's {size} bytes"
                ));
            }
        }
        (ranges.to_vec(), None)
    };
    let mut buf = vec![0u8; PIECE as usize];
    let mut pieces = Vec::with_capacity(wanted.len());
    for (offset, length) in wanted {
        let b = &mut buf[..length as usize];
        h.backend.read_at(b, offset).map_err(|e| {
            format!(
                "volume {name:?}: {}: read at {offset}: {e}",
                h.backing.display()
            )
        })?;
        pieces.push(Piece {
            offset,
            length,
            hash: blake3::hash(b).to_hex().to_string(),
        });
    }
    Ok(Checksums { pieces, next })
}

/// Pieces to hash (`(offset, length)`) and where the next request starts.
type Wanted = (Vec<(u64, u64)>, Option<u64>);

/// The pieces of slot 0's dirty runs from byte `from` (at most [`MAX_PIECES`]), and where
/// the next request starts when there may be more.
fn dirty_pieces(h: &Hosted, from: u64, size: u64) -> Result<Wanted, String> {
    let tracker = h.with_meta(|m| m.tracker())?;
    let mut out = Vec::new();
    let mut at = from.min(size);
    while at < size && out.len() < MAX_PIECES {
        let runs = tracker.dirty_runs(at, size - at, 64);
        if runs.is_empty() {
            break;
        }
        for (len, dirty) in runs {
            if dirty {
                let mut o = at;
                while o < at + len && out.len() < MAX_PIECES {
                    let l = PIECE.min(at + len - o);
                    out.push((o, l));
                    o += l;
                }
                if o < at + len {
                    return Ok((out, Some(o)));
                }
            }
            at += len;
            if out.len() >= MAX_PIECES {
                break;
            }
        }
    }
    Ok((out, (at < size).then_some(at)))
}
