//! Delta planning: the index of the receiver's basis chunks, the ops that rebuild a file from
//! basis ranges and literal source bytes, their coalescing, and in-memory plan/apply helpers.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use crate::cdc::{CdcParams, StreamChunker};

/// Map key: the chunk hash is already BLAKE3 output, so it is used as the table hash directly
/// (mixed with the length) instead of running SipHash over it again.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Key {
    len: u32,
    hash: u64,
}

impl std::hash::Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash ^ u64::from(self.len).rotate_left(32));
    }
}

/// Passes through the one u64 a [`Key`] writes.
#[derive(Default)]
struct PassHasher(u64);

impl Hasher for PassHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Not reached for `Key`; kept correct (FNV-1a) for any other use.
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// Index of the receiver's basis chunks: (len, hash) to the basis offset of its first
/// occurrence.
pub struct ChunkIndex {
    map: HashMap<Key, u64, BuildHasherDefault<PassHasher>>,
}

impl ChunkIndex {
    /// `basis` is the receiver's chunk list in file order, as sent on the wire; offsets are
    /// the running sum of the lengths.
    pub fn new(basis: &[(u32, u64)]) -> Self {
        let mut map = HashMap::with_capacity_and_hasher(basis.len(), Default::default());
        let mut offset = 0u64;
        for &(len, hash) in basis {
            map.entry(Key { len, hash }).or_insert(offset);
            offset += u64::from(len);
        }
        Self { map }
    }

    /// Basis offset of a chunk with this length and hash, if the basis has one.
    pub fn lookup(&self, len: u32, hash: u64) -> Option<u64> {
        self.map.get(&Key { len, hash }).copied()
    }

    /// Number of distinct chunks.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// One instruction to build the new file: copy a range of the receiver's basis, or take
/// literal bytes of the source (which the caller reads and sends).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeltaOp {
    Copy { src: u64, len: u64, dst: u64 },
    Literal { dst: u64, len: u64 },
}

fn op_len(op: &DeltaOp) -> u64 {
    match *op {
        DeltaOp::Copy { len, .. } | DeltaOp::Literal { len, .. } => len,
    }
}

/// Merges adjacent ops as they arrive, so a run of unchanged chunks becomes one copy and a
/// run of new chunks one literal; splits literals so none exceeds `max_literal` (the caller
/// sends each literal as one frame).
pub struct OpCoalescer {
    max_literal: u64,
    pending: Option<DeltaOp>,
}

impl OpCoalescer {
    /// A `max_literal` of 0 means no limit (0 could not be honoured by any literal).
    pub fn new(max_literal: u64) -> Self {
        Self {
            max_literal: if max_literal == 0 {
                u64::MAX
            } else {
                max_literal
            },
            pending: None,
        }
    }

    /// Adds `op`; ops that can no longer grow are appended to `out`. Empty ops are dropped.
    pub fn push(&mut self, op: DeltaOp, out: &mut Vec<DeltaOp>) {
        if op_len(&op) == 0 {
            return;
        }
        self.pending = match (self.pending.take(), op) {
            (
                Some(DeltaOp::Copy { src, len, dst }),
                DeltaOp::Copy {
                    src: s2,
                    len: l2,
                    dst: d2,
                },
            ) if src.checked_add(len) == Some(s2) && dst.checked_add(len) == Some(d2) => {
                Some(DeltaOp::Copy {
                    src,
                    len: len + l2,
                    dst,
                })
            }
            (Some(DeltaOp::Literal { dst, len }), DeltaOp::Literal { dst: d2, len: l2 })
                if dst.checked_add(len) == Some(d2) =>
            {
                Some(DeltaOp::Literal { dst, len: len + l2 })
            }
            (prev, op) => {
                out.extend(prev);
                Some(op)
            }
        };
        // A literal that reached the limit cannot grow any further: emit full-size pieces now.
        while let Some(DeltaOp::Literal { dst, len }) = self.pending {
            if len < self.max_literal {
                break;
            }
            out.push(DeltaOp::Literal {
                dst,
                len: self.max_literal,
            });
            let rest = len - self.max_literal;
            self.pending = (rest > 0).then_some(DeltaOp::Literal {
                dst: dst + self.max_literal,
                len: rest,
            });
        }
    }

    /// Emits the last pending op.
    pub fn finish(self, out: &mut Vec<DeltaOp>) {
        out.extend(self.pending);
    }
}

/// Plans the ops that turn the basis (given as its chunk list) into `source`, chunking
/// `source` with `params`: chunks the basis has become copies, the rest literals.
pub fn plan_chunks(
    basis: &[(u32, u64)],
    source: &[u8],
    params: CdcParams,
    max_literal: u64,
) -> Vec<DeltaOp> {
    let index = ChunkIndex::new(basis);
    let mut chunker = StreamChunker::new(params);
    let mut chunks = Vec::new();
    chunker.push(source, &mut chunks);
    chunker.finish(&mut chunks);
    let mut co = OpCoalescer::new(max_literal);
    let mut ops = Vec::new();
    for c in &chunks {
        let len = u64::from(c.len);
        let op = match index.lookup(c.len, c.hash) {
            Some(src) => DeltaOp::Copy {
                src,
                len,
                dst: c.offset,
            },
            None => DeltaOp::Literal { dst: c.offset, len },
        };
        co.push(op, &mut ops);
    }
    co.finish(&mut ops);
    ops
}

/// Builds the new file from `basis` and `source` bytes (literals are read from `source` at
/// their `dst` offset). Bytes no op covers are zero. A test helper for in-memory checks.
///
/// # Panics
/// If an op reads past the end of `basis` or `source`: ops come from [`plan_chunks`] over
/// these same buffers, so that is a bug in the caller, not bad input from the wire.
pub fn apply_ops(basis: &[u8], source: &[u8], ops: &[DeltaOp]) -> Vec<u8> {
    fn range(at: u64, len: u64, limit: usize, what: &str) -> std::ops::Range<usize> {
        let end = at.checked_add(len).filter(|&e| e <= limit as u64);
        match end {
            Some(end) => at as usize..end as usize,
            None => panic!("apply_ops: {what} range {at}+{len} beyond {limit} bytes"),
        }
    }
    let size = ops
        .iter()
        .map(|op| match *op {
            DeltaOp::Copy { len, dst, .. } | DeltaOp::Literal { dst, len } => {
                dst.saturating_add(len)
            }
        })
        .max()
        .unwrap_or(0);
    let size = usize::try_from(size).unwrap_or(usize::MAX);
    let mut out = vec![0u8; size];
    for op in ops {
        match *op {
            DeltaOp::Copy { src, len, dst } => {
                let from = range(src, len, basis.len(), "copy source");
                out[range(dst, len, size, "copy dst")].copy_from_slice(&basis[from]);
            }
            DeltaOp::Literal { dst, len } => {
                let from = range(dst, len, source.len(), "literal source");
                out[range(dst, len, size, "literal dst")].copy_from_slice(&source[from]);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cdc::ChunkRef;
    use proptest::prelude::*;
    use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    /// Text-like data: words from a small vocabulary, spaces and newlines.
    fn text(len: usize, seed: u64) -> Vec<u8> {
        const WORDS: &[&str] = &[
            "the",
            "quick",
            "brown",
            "fox",
            "jumps",
            "over",
            "lazy",
            "dog",
            "fn",
            "let",
            "mut",
            "return",
            "impl",
            "struct",
            "{",
            "}",
            "(",
            ")",
            ";",
            "migration",
            "cutover",
            "chunk",
        ];
        let mut rng = StdRng::seed_from_u64(seed);
        let mut v = Vec::with_capacity(len + 16);
        while v.len() < len {
            v.extend_from_slice(WORDS[rng.random_range(0..WORDS.len())].as_bytes());
            v.push(if rng.random_ratio(1, 12) { b'\n' } else { b' ' });
        }
        v.truncate(len);
        v
    }

    fn basis_chunks(basis: &[u8], p: CdcParams) -> Vec<(u32, u64)> {
        let mut c = StreamChunker::new(p);
        let mut out: Vec<ChunkRef> = Vec::new();
        c.push(basis, &mut out);
        c.finish(&mut out);
        out.iter().map(|c| (c.len, c.hash)).collect()
    }

    fn literal_bytes(ops: &[DeltaOp]) -> u64 {
        ops.iter()
            .map(|op| match *op {
                DeltaOp::Literal { len, .. } => len,
                DeltaOp::Copy { .. } => 0,
            })
            .sum()
    }

    /// Ops must tile `0..len` in order, without gaps or overlaps, literals within the limit.
    fn check_ops(ops: &[DeltaOp], len: usize, max_literal: u64) {
        let mut at = 0u64;
        for op in ops {
            let (dst, l) = match *op {
                DeltaOp::Copy { dst, len, .. } => (dst, len),
                DeltaOp::Literal { dst, len } => {
                    assert!(len <= max_literal, "literal {len} > {max_literal}");
                    (dst, len)
                }
            };
            assert_eq!(dst, at);
            assert!(l > 0);
            at += l;
        }
        assert_eq!(at, len as u64);
    }

    fn roundtrip(basis: &[u8], source: &[u8], p: CdcParams, max_literal: u64) -> Vec<DeltaOp> {
        let ops = plan_chunks(&basis_chunks(basis, p), source, p, max_literal);
        check_ops(&ops, source.len(), max_literal);
        assert!(
            apply_ops(basis, source, &ops) == source,
            "rebuilt file differs"
        );
        ops
    }

    #[derive(Debug, Clone)]
    enum Edit {
        Insert(usize, usize),
        Delete(usize, usize),
        Overwrite(usize, usize),
        Append(usize),
    }

    fn edit_strategy() -> impl Strategy<Value = Edit> {
        prop_oneof![
            (any::<usize>(), 1usize..3000).prop_map(|(a, n)| Edit::Insert(a, n)),
            (any::<usize>(), 1usize..3000).prop_map(|(a, n)| Edit::Delete(a, n)),
            (any::<usize>(), 1usize..3000).prop_map(|(a, n)| Edit::Overwrite(a, n)),
            (1usize..5000).prop_map(Edit::Append),
        ]
    }

    fn apply_edits(base: &[u8], edits: &[Edit], seed: u64) -> Vec<u8> {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut v = base.to_vec();
        for e in edits {
            let at = |a: usize, v: &Vec<u8>| if v.is_empty() { 0 } else { a % (v.len() + 1) };
            match *e {
                Edit::Insert(a, n) => {
                    let a = at(a, &v);
                    let mut ins = vec![0u8; n];
                    rng.fill_bytes(&mut ins);
                    v.splice(a..a, ins);
                }
                Edit::Delete(a, n) => {
                    let a = at(a, &v);
                    let end = (a + n).min(v.len());
                    v.drain(a..end);
                }
                Edit::Overwrite(a, n) => {
                    let a = at(a, &v);
                    let end = (a + n).min(v.len());
                    rng.fill_bytes(&mut v[a..end]);
                }
                Edit::Append(n) => {
                    let mut tail = vec![0u8; n];
                    rng.fill_bytes(&mut tail);
                    v.extend_from_slice(&tail);
                }
            }
        }
        v
    }

    #[test]
    fn index_first_occurrence_and_len() {
        let idx = ChunkIndex::new(&[(10, 1), (20, 2), (10, 1), (5, 2)]);
        assert_eq!(idx.lookup(10, 1), Some(0));
        assert_eq!(idx.lookup(20, 2), Some(10));
        assert_eq!(idx.lookup(5, 2), Some(40));
        assert_eq!(idx.lookup(20, 1), None);
        assert_eq!(idx.len(), 3);
        assert!(!idx.is_empty());
        assert!(ChunkIndex::new(&[]).is_empty());
    }

    #[test]
    fn coalescer_merges_and_splits() {
        let mut out = Vec::new();
        let mut co = OpCoalescer::new(100);
        co.push(
            DeltaOp::Copy {
                src: 0,
                len: 10,
                dst: 0,
            },
            &mut out,
        );
        co.push(
            DeltaOp::Copy {
                src: 10,
                len: 10,
                dst: 10,
            },
            &mut out,
        );
        assert!(out.is_empty(), "a contiguous copy can still grow");
        // dst contiguous but src not: a new copy.
        co.push(
            DeltaOp::Copy {
                src: 50,
                len: 5,
                dst: 20,
            },
            &mut out,
        );
        assert_eq!(
            out,
            vec![DeltaOp::Copy {
                src: 0,
                len: 20,
                dst: 0
            }]
        );
        co.push(DeltaOp::Literal { dst: 25, len: 0 }, &mut out);
        co.push(DeltaOp::Literal { dst: 25, len: 60 }, &mut out);
        co.push(DeltaOp::Literal { dst: 85, len: 150 }, &mut out);
        co.push(
            DeltaOp::Copy {
                src: 0,
                len: 1,
                dst: 235,
            },
            &mut out,
        );
        co.finish(&mut out);
        assert_eq!(
            out,
            vec![
                DeltaOp::Copy {
                    src: 0,
                    len: 20,
                    dst: 0
                },
                DeltaOp::Copy {
                    src: 50,
                    len: 5,
                    dst: 20
                },
                DeltaOp::Literal { dst: 25, len: 100 },
                DeltaOp::Literal { dst: 125, len: 100 },
                DeltaOp::Literal { dst: 225, len: 10 },
                DeltaOp::Copy {
                    src: 0,
                    len: 1,
                    dst: 235
                },
            ]
        );
        // Non-contiguous literals stay apart; 0 means unlimited.
        let mut out = Vec::new();
        let mut co = OpCoalescer::new(0);
        co.push(
            DeltaOp::Literal {
                dst: 0,
                len: 1 << 40,
            },
            &mut out,
        );
        co.push(
            DeltaOp::Literal {
                dst: (1 << 40) + 1,
                len: 1,
            },
            &mut out,
        );
        co.finish(&mut out);
        assert_eq!(
            out,
            vec![
                DeltaOp::Literal {
                    dst: 0,
                    len: 1 << 40
                },
                DeltaOp::Literal {
                    dst: (1 << 40) + 1,
                    len: 1
                }
            ]
        );
    }

    #[test]
    fn identical_and_empty_files() {
        let p = CdcParams::from_avg(1024);
        let d = random(100_000, 1);
        let ops = roundtrip(&d, &d, p, 1 << 20);
        assert_eq!(
            ops,
            vec![DeltaOp::Copy {
                src: 0,
                len: d.len() as u64,
                dst: 0
            }]
        );
        assert!(roundtrip(&d, &[], p, 1 << 20).is_empty());
        let ops = roundtrip(&[], &d, p, 30_000);
        assert_eq!(literal_bytes(&ops), d.len() as u64);
        assert_eq!(ops.len(), 4, "100000 bytes in literals of at most 30000");
    }

    #[test]
    fn text_like_edits_roundtrip() {
        let p = CdcParams::from_avg(2048);
        let base = text(300_000, 7);
        let edits = [
            Edit::Insert(1000, 40),
            Edit::Delete(50_000, 300),
            Edit::Overwrite(120_000, 20),
            Edit::Insert(200_000, 5),
            Edit::Append(700),
        ];
        let new = apply_edits(&base, &edits, 8);
        let ops = roundtrip(&base, &new, p, 64 << 10);
        assert!(literal_bytes(&ops) < new.len() as u64 / 10);
        // Reversed direction too (deletes become inserts).
        roundtrip(&new, &base, p, 64 << 10);
    }

    #[test]
    fn hundred_short_inserts_send_little() {
        // 4 MiB of random data, 100 inserts of 1..=64 bytes at random places. Each insert
        // costs about one chunk of literals (plus occasionally its neighbour when the insert
        // moves a cut point), so literal bytes ~ 100 x mean chunk size. With 1 KiB average
        // chunks this measured 4.4% of the file (2 KiB: 7.0%, 4 KiB: 13.4%). With `for_size`'s
        // 16 KiB average the same edits cost 43% of the file: edits 40 KiB apart touch most 16 KiB chunks, which is
        // inherent to chunk size, not a planner fault, so the test uses 1 KiB chunks.
        let base = random(4 << 20, 11);
        let mut rng = StdRng::seed_from_u64(12);
        let edits: Vec<Edit> = (0..100)
            .map(|_| Edit::Insert(rng.random_range(0..base.len()), rng.random_range(1..=64)))
            .collect();
        let new = apply_edits(&base, &edits, 13);
        let p = CdcParams::from_avg(1024);
        let ops = roundtrip(&base, &new, p, 1 << 20);
        let lit = literal_bytes(&ops);
        assert!(
            lit * 10 < new.len() as u64,
            "literal {lit} of {}",
            new.len()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        #[test]
        fn random_edits_rebuild_source(
            len in 0usize..150_000,
            seed in any::<u64>(),
            edits in proptest::collection::vec(edit_strategy(), 0..12),
            avg_bits in 8u32..13,
            max_literal in prop_oneof![1u64..5000, Just(1u64 << 20)],
            textlike in any::<bool>(),
        ) {
            let base = if textlike { text(len, seed) } else { random(len, seed) };
            let new = apply_edits(&base, &edits, seed ^ 0x55);
            let p = CdcParams::from_avg(1 << avg_bits);
            roundtrip(&base, &new, p, max_literal);
        }
    }
}
