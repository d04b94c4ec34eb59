//! Entry points for the fuzz target (`fuzz/fuzz_targets/volume_meta.rs`): the parsers of
//! what `open` reads from disk, fed arbitrary bytes with valid checksums (a fuzzer cannot
//! forge BLAKE3, and the checks behind the checksum are what needs exercising). Each
//! panics if a parser accepts something it should not, or crashes on its own.

use crate::al::{self, Transaction};
use crate::layout::PAGE;
use crate::superblock::{self, Superblock};

/// `bytes` padded or cut to a 4 KiB page.
fn page(bytes: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; PAGE as usize];
    let n = bytes.len().min(p.len());
    p[..n].copy_from_slice(&bytes[..n]);
    p
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A superblock copy made of `bytes` with its checksum fixed: whatever decodes must
/// describe a layout `Geometry` accepts and survive a round trip; both copies are then
/// picked between. The first byte's low bits repair more, so that random bytes (a build
/// without coverage feedback) get past the magic (bit 0) and the layout check (bit 1).
pub fn superblock(bytes: &[u8]) -> bool {
    let mode = bytes.first().copied().unwrap_or(0);
    let mut b = page(bytes);
    if mode & 1 != 0 {
        b[0..8].copy_from_slice(superblock::MAGIC);
        put32(&mut b, 8, superblock::VERSION);
        put32(&mut b, 12, PAGE as u32);
    }
    if mode & 2 != 0 {
        // Small shapes: block size 4 KiB << (0..9), 1-32 slots, 1-65534 hot extents.
        // At most 16 TiB >> (mode / 4): small volumes too.
        let raw = u64::from_le_bytes(b[48..56].try_into().unwrap_or([0; 8]));
        let size = (raw % (1 << 44)) >> (mode >> 2);
        let block = 4096u32 << (get32(&b, 56) % 9);
        let slots = get32(&b, 64) % 32 + 1;
        let al = get32(&b, 68) % 65534 + 1;
        put64(&mut b, 48, size);
        put32(&mut b, 56, block);
        put32(&mut b, 64, slots);
        put32(&mut b, 68, al);
        if let Ok(g) = crate::layout::Geometry::new(size, block, slots, al) {
            put32(&mut b, 60, crate::layout::EXTENT_SHIFT);
            put32(&mut b, 72, g.al_ring);
            put64(&mut b, 88, g.al_offset);
            put64(&mut b, 96, g.bitmap_offset);
            put64(&mut b, 104, g.bitmap_slot_len);
        }
        // Slots past the ones with a bitmap are not in use.
        for slot in slots as usize..crate::layout::MAX_PEER_SLOTS as usize {
            b[256 + 64 * slot] &= !1;
        }
    }
    let sum = blake3::hash(&b[..superblock::SUM_AT]);
    b[superblock::SUM_AT..].copy_from_slice(sum.as_bytes());
    let decoded = Superblock::decode(&b);
    let ok = decoded.is_ok();
    if let Ok(sb) = decoded {
        let geo = sb
            .geometry()
            .expect("a decoded superblock has a valid layout");
        assert!(geo.file_len >= geo.bitmap_offset + geo.bitmap_slot_len);
        assert!(geo.bitmap_slot_len <= crate::layout::MAX_BITMAP_BYTES + PAGE);
        assert_eq!(Superblock::decode(&sb.encode()), Ok(sb));
    }
    // The raw bytes (checksum as given) against the fixed ones.
    let raw = page(bytes);
    let _ = superblock::pick([&raw, &b]);
    ok
}

/// An AL transaction made of `bytes` with its checksum fixed, and a ring of such
/// transactions: what decodes round-trips; a scan names only extents below the bound.
/// Returns whether the transaction decoded.
pub fn activity_log(bytes: &[u8]) -> bool {
    let id = [7u8; 16];
    let mut b = page(bytes);
    if bytes.first().is_some_and(|m| m & 1 != 0) {
        b[0..4].copy_from_slice(al::MAGIC);
        b[4..6].copy_from_slice(&al::VERSION.to_le_bytes());
        // Counts within bounds more often than not.
        b[7] = 0;
        b[21] &= 3;
    }
    let sum = al::checksum(&id, &b[..al::SUM_AT]);
    b[al::SUM_AT..].copy_from_slice(sum.as_bytes());
    let decoded = Transaction::decode(&b, &id);
    let ok = decoded.is_some();
    if let Some(t) = decoded {
        assert!(t.updates.len() <= al::UPDATES_PER_TRANSACTION);
        assert!(t.context.len() <= al::CONTEXT_PER_TRANSACTION);
        assert_eq!(Transaction::decode(&t.encode(&id), &id), Some(t));
    }
    let ring = (bytes.len() / PAGE as usize).max(1) as u32;
    let bound = u64::from(bytes.first().copied().unwrap_or(0)) * 1000;
    let s = al::scan(bytes, ring, 0, bound, &id);
    assert!(s.extents.iter().all(|&e| u64::from(e) < bound));
    let s = al::scan(&b, 1, 0, u64::from(u32::MAX), &id);
    assert!(s.transactions <= 1);
    ok
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    /// The entry points on random bytes (what the fuzz target does without coverage):
    /// they reach decodable superblocks and transactions and hold their checks.
    #[test]
    fn random_bytes_reach_the_checks() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (mut sbs, mut ts) = (0, 0);
        for _ in 0..3000 {
            let mut bytes = vec![0u8; rng.random_range(0..9000)];
            rng.fill(&mut bytes[..]);
            if let Some(m) = bytes.first_mut() {
                *m |= 3;
            }
            sbs += usize::from(super::superblock(&bytes));
            ts += usize::from(super::activity_log(&bytes));
        }
        assert!(
            sbs > 300 && ts > 300,
            "{sbs} superblocks, {ts} transactions decoded"
        );
    }
}
