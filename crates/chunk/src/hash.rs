//! BLAKE3 hashing: truncated block hashes for positional compare, the leaf-based whole-file
//! digest (one-shot and streaming), and a fast all-zero test.

use rayon::prelude::*;

/// Whole-file digest leaf size; also the coarsest level of the positional descent.
pub const LEAF: usize = 1 << 20;

/// Block sizes of the positional descent, coarse to fine: compare 1 MiB segments first, then
/// 64 KiB blocks inside a differing segment, then 4 KiB blocks inside a differing block.
pub const LEVELS: [u32; 3] = [1 << 20, 64 << 10, 4 << 10];

/// A block hash: the first 16 bytes of the block's BLAKE3 hash, read little-endian.
/// 128 bits keep accidental collisions out of reach while halving what goes on the wire.
pub type BlockHash = u128;

/// Below this many bytes `block_hashes` stays on the calling thread: rayon's fork/join cost
/// would eat the gain, and the engine already hashes many small files in parallel.
const PAR_MIN_BYTES: usize = 1 << 20;

/// Truncated BLAKE3 of `data`.
pub fn block_hash(data: &[u8]) -> BlockHash {
    truncate(blake3::hash(data).as_bytes())
}

/// First 16 bytes of a full hash, little-endian, so `block_hash(d) == truncate(&leaf_hash(d))`.
pub fn truncate(h: &[u8; 32]) -> BlockHash {
    let mut first = [0u8; 16];
    first.copy_from_slice(&h[..16]);
    u128::from_le_bytes(first)
}

/// One hash per `block` bytes of `data`; the last block may be short, empty data has no blocks.
/// Large inputs (at least 4 blocks and 1 MiB) are hashed on all cores.
/// A `block` of 0 is treated as 1 rather than panicking.
pub fn block_hashes(data: &[u8], block: usize) -> Vec<BlockHash> {
    let block = block.max(1);
    if data.len() >= PAR_MIN_BYTES && data.len() / 4 >= block {
        data.par_chunks(block).map(block_hash).collect()
    } else {
        data.chunks(block).map(block_hash).collect()
    }
}

/// Full BLAKE3 of one leaf (at most [`LEAF`] bytes) of the whole-file digest.
pub fn leaf_hash(data: &[u8]) -> [u8; 32] {
    *blake3::hash(data).as_bytes()
}

/// Whole-file digest: BLAKE3 of the file size (u64 LE) followed by the leaf hashes of its
/// consecutive [`LEAF`]-sized pieces. Hashing leaves separately lets both sides hash pieces of
/// one big file on several cores, and lets a resumed transfer re-use leaves it already has.
/// The size prefix makes a file distinct from any other whose leaf list happens to match.
pub fn file_digest(size: u64, leaves: &[[u8; 32]]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&size.to_le_bytes());
    for leaf in leaves {
        h.update(leaf);
    }
    *h.finalize().as_bytes()
}

/// True if every byte of `data` is zero (used to keep holes sparse and skip zero blocks).
/// Compares 16-byte words, OR-ing four of them per step so the loop vectorises.
pub fn is_zero(data: &[u8]) -> bool {
    fn word(w: &[u8]) -> u128 {
        let mut a = [0u8; 16];
        a.copy_from_slice(w);
        u128::from_ne_bytes(a)
    }
    let mut blocks = data.chunks_exact(64);
    for b in &mut blocks {
        let acc = word(&b[..16]) | word(&b[16..32]) | word(&b[32..48]) | word(&b[48..]);
        if acc != 0 {
            return false;
        }
    }
    let rest = blocks.remainder();
    let mut words = rest.chunks_exact(16);
    for w in &mut words {
        if word(w) != 0 {
            return false;
        }
    }
    words.remainder().iter().all(|&b| b == 0)
}

/// Positional compare: indices of `ours` whose hash differs from `theirs` at the same index.
/// Blocks past the end of `theirs` always differ; extra blocks in `theirs` are ignored (the
/// receiver truncates).
pub fn differing_blocks(ours: &[BlockHash], theirs: &[BlockHash]) -> Vec<usize> {
    ours.iter()
        .enumerate()
        .filter(|&(i, h)| theirs.get(i) != Some(h))
        .map(|(i, _)| i)
        .collect()
}

/// Streaming whole-file digest: feed bytes in order, in pieces of any size; the result equals
/// [`file_digest`] over the leaves of the whole input.
pub struct DigestBuilder {
    /// Hasher of the current, incomplete leaf.
    cur: blake3::Hasher,
    /// Bytes already fed into `cur`, always `< LEAF`.
    cur_len: usize,
    total: u64,
    leaves: Vec<[u8; 32]>,
}

impl Default for DigestBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl DigestBuilder {
    pub fn new() -> Self {
        Self {
            cur: blake3::Hasher::new(),
            cur_len: 0,
            total: 0,
            leaves: Vec::new(),
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        // Top up the partial leaf first so whole leaves stay aligned to LEAF offsets.
        if self.cur_len > 0 {
            let take = data.len().min(LEAF - self.cur_len);
            self.cur.update(&data[..take]);
            self.cur_len += take;
            data = &data[take..];
            if self.cur_len == LEAF {
                self.leaves.push(*self.cur.finalize().as_bytes());
                self.cur.reset();
                self.cur_len = 0;
            }
        }
        // Whole leaves straight from the caller's slice, without copying; several at once are
        // hashed on all cores so one big file does not hash on one core.
        let whole = data.len() - data.len() % LEAF;
        let (full, tail) = data.split_at(whole);
        if full.len() >= 2 * LEAF {
            let hashed: Vec<[u8; 32]> = full.par_chunks(LEAF).map(leaf_hash).collect();
            self.leaves.extend_from_slice(&hashed);
        } else {
            self.leaves.extend(full.chunks(LEAF).map(leaf_hash));
        }
        if !tail.is_empty() {
            self.cur.update(tail);
            self.cur_len = tail.len();
        }
    }

    /// Leaves completed so far (whole [`LEAF`]-sized pieces only; the partial tail is not
    /// included until [`finish`](Self::finish)).
    pub fn leaves(&self) -> &[[u8; 32]] {
        &self.leaves
    }

    pub fn finish(mut self) -> [u8; 32] {
        if self.cur_len > 0 {
            self.leaves.push(*self.cur.finalize().as_bytes());
        }
        file_digest(self.total, &self.leaves)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{rngs::StdRng, RngCore, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    fn one_shot_digest(data: &[u8]) -> [u8; 32] {
        let leaves: Vec<[u8; 32]> = data.chunks(LEAF).map(leaf_hash).collect();
        file_digest(data.len() as u64, &leaves)
    }

    #[test]
    fn truncate_matches_block_hash() {
        let d = random(5000, 1);
        assert_eq!(block_hash(&d), truncate(&leaf_hash(&d)));
        let full = blake3::hash(&d);
        let mut first = [0u8; 16];
        first.copy_from_slice(&full.as_bytes()[..16]);
        assert_eq!(block_hash(&d), u128::from_le_bytes(first));
    }

    #[test]
    fn block_hashes_serial_and_parallel_agree() {
        let d = random(3 * LEAF + 123, 2);
        for block in [4096usize, 65536, LEAF, 5 * LEAF] {
            let got = block_hashes(&d, block);
            let want: Vec<BlockHash> = d.chunks(block).map(block_hash).collect();
            assert_eq!(got, want, "block {block}");
            assert_eq!(got.len(), d.len().div_ceil(block));
        }
        assert!(block_hashes(&[], 4096).is_empty());
        assert_eq!(block_hashes(&d[..10], 0).len(), 10);
    }

    #[test]
    fn empty_file_digest_has_no_leaves() {
        let b = DigestBuilder::new();
        assert!(b.leaves().is_empty());
        assert_eq!(b.finish(), file_digest(0, &[]));
        assert_eq!(
            file_digest(0, &[]),
            *blake3::hash(&0u64.to_le_bytes()).as_bytes()
        );
    }

    #[test]
    fn digest_exact_leaf_multiples_and_leaves_accessor() {
        let d = random(2 * LEAF, 3);
        let mut b = DigestBuilder::new();
        b.update(&d[..LEAF - 1]);
        assert!(b.leaves().is_empty());
        b.update(&d[LEAF - 1..LEAF]);
        assert_eq!(b.leaves(), &[leaf_hash(&d[..LEAF])]);
        b.update(&d[LEAF..]);
        assert_eq!(b.leaves().len(), 2);
        assert_eq!(b.finish(), one_shot_digest(&d));
        // Size is part of the digest: same single leaf, different claimed size.
        assert_ne!(
            file_digest(1, &[leaf_hash(b"a")]),
            file_digest(2, &[leaf_hash(b"a")])
        );
    }

    #[test]
    fn is_zero_edges() {
        for len in [0usize, 1, 7, 15, 16, 17, 31, 63, 64, 65, 127, 200] {
            let mut v = vec![0u8; len];
            assert!(is_zero(&v), "len {len}");
            if len > 0 {
                *v.last_mut().expect("len > 0") = 1;
                assert!(!is_zero(&v), "len {len} last byte");
                v[len - 1] = 0;
                v[0] = 0x80;
                assert!(!is_zero(&v), "len {len} first byte");
            }
        }
        // Every single position in a buffer spanning the 64-byte, 16-byte and byte paths.
        let mut v = vec![0u8; 64 + 16 + 5];
        for i in 0..v.len() {
            v[i] = 1;
            assert!(!is_zero(&v), "pos {i}");
            v[i] = 0;
        }
        // Unaligned start must not matter.
        let v = [0u8; 100];
        assert!(is_zero(&v[3..]));
    }

    #[test]
    fn differing_blocks_cases() {
        let a: Vec<BlockHash> = vec![1, 2, 3, 4];
        assert!(differing_blocks(&a, &a).is_empty());
        assert_eq!(differing_blocks(&a, &[1, 9, 3]), vec![1, 3]);
        assert_eq!(differing_blocks(&a, &[]), vec![0, 1, 2, 3]);
        assert_eq!(differing_blocks(&a[..2], &[1, 5, 6, 7]), vec![1]);
        assert_eq!(differing_blocks(&a[..2], &a), Vec::<usize>::new());
        assert!(differing_blocks(&[], &a).is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn digest_streaming_equals_one_shot(
            len in prop_oneof![0usize..5000, (LEAF - 3000)..(LEAF + 3000), (2 * LEAF)..(3 * LEAF + 7)],
            seed in any::<u64>(),
            pieces in proptest::collection::vec(1usize..(LEAF + LEAF / 2), 1..12),
        ) {
            let d = random(len, seed);
            let mut b = DigestBuilder::new();
            let mut at = 0;
            let mut i = 0;
            while at < d.len() {
                let n = pieces[i % pieces.len()].min(d.len() - at);
                b.update(&d[at..at + n]);
                at += n;
                i += 1;
                prop_assert_eq!(b.leaves().len(), at / LEAF);
            }
            b.update(&[]);
            prop_assert_eq!(b.finish(), one_shot_digest(&d));
        }
    }
}
