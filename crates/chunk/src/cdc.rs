//! Content-defined chunking: FastCDC (v2020, from the `fastcdc` crate) parameters and a
//! streaming chunker whose cut points are exactly those of chunking the whole input at once.

use fastcdc::v2020;
use rayon::prelude::*;

/// FastCDC size parameters in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CdcParams {
    pub min: u32,
    pub avg: u32,
    pub max: u32,
}

/// Cap on the expected chunk count of one file, so the receiver's chunk list stays bounded
/// (about 1.5 MiB on the wire at 12 bytes per chunk).
const MAX_EXPECTED_CHUNKS: u64 = 131_072;
/// Smallest average `for_size` picks: below it the signature outweighs the literal savings.
const MIN_AUTO_AVG: u32 = 2048;

impl CdcParams {
    /// Average about sqrt(size)/4 as a power of two, at least 2 KiB (8 KiB for 1 GiB, 2 KiB
    /// for 8 MiB), then doubled until `file_size / avg <= 131072` so a signature stays small;
    /// min = avg / 4, max = avg * 4.
    ///
    /// Why: the wire cost of a chunk delta is about (size / avg) * 10 bytes of signature plus
    /// about 1.5 * avg of literal per edit. For a few hundred scattered edits the sum is lowest
    /// near sqrt(size)/4 (rsync picks its block size by the same square-root argument); see
    /// BENCH.md W5.
    pub fn for_size(file_size: u64) -> Self {
        let root = (file_size as f64).sqrt() / 4.0;
        let mut avg = MIN_AUTO_AVG;
        while f64::from(avg) * 1.5 < root && avg < v2020::AVERAGE_MAX {
            avg *= 2;
        }
        while file_size / u64::from(avg) > MAX_EXPECTED_CHUNKS && avg < v2020::AVERAGE_MAX {
            avg *= 2;
        }
        Self::from_avg(avg)
    }

    /// min = avg / 4, max = avg * 4, with `avg` clamped to what the `fastcdc` crate accepts
    /// (256 B ..= 4 MiB); within that range min and max are also within the crate's limits.
    pub fn from_avg(avg: u32) -> Self {
        let avg = avg.clamp(v2020::AVERAGE_MIN, v2020::AVERAGE_MAX);
        Self {
            min: avg / 4,
            avg,
            max: avg * 4,
        }
    }

    /// Each field clamped to the `fastcdc` crate's limits, and `max` raised to at least `avg`.
    /// Identity for any sensible parameters; keeps hand-built ones from panicking inside the
    /// crate (a mask table index out of range, or `cut` reading past its input when
    /// `avg > max`, which the crate's own constructor does not reject either).
    fn sanitized(self) -> Self {
        let avg = self.avg.clamp(v2020::AVERAGE_MIN, v2020::AVERAGE_MAX);
        Self {
            min: self.min.clamp(v2020::MINIMUM_MIN, v2020::MINIMUM_MAX),
            avg,
            max: self
                .max
                .clamp(v2020::MAXIMUM_MIN, v2020::MAXIMUM_MAX)
                .max(avg),
        }
    }
}

/// One content-defined chunk of the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkRef {
    pub offset: u64,
    pub len: u32,
    /// First 8 bytes (little-endian) of the chunk's BLAKE3 hash. Paired with `len` this is the
    /// chunk's identity on the wire; the whole-file digest catches the rare collision.
    pub hash: u64,
}

/// Hash of a chunk as carried in [`ChunkRef::hash`].
pub(crate) fn chunk_hash(data: &[u8]) -> u64 {
    let h = blake3::hash(data);
    let mut first = [0u8; 8];
    first.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(first)
}

/// Chunks of at least this many bytes in total, found in one step, are hashed on all cores.
const PAR_HASH_BYTES: usize = 256 << 10;

/// Streaming FastCDC chunker.
///
/// Why it can stream with the crate's own cut function: `v2020::cut` on a prefix of the data
/// from a chunk start scans exactly the bytes the whole-input call would scan, in the same
/// order and with the same masks, as long as the prefix is at least `max` bytes long, or it
/// found a cut strictly before the prefix's end (a mask hit; with fewer bytes than `avg` the
/// prefix uses the small mask over a range the whole input also scans with the small mask).
/// Only "no cut before the end of a short prefix" is uncertain, and that needs more bytes.
/// So the chunker never re-implements the algorithm, it only waits for enough bytes.
pub struct StreamChunker {
    p: CdcParams,
    mask_s: u64,
    mask_l: u64,
    /// Unchunked tail of the input (always shorter than `max` between pushes), plus during a
    /// push at most `max` bytes borrowed from the new piece to complete chunks started in it.
    buf: Vec<u8>,
    /// Input offset of the first byte not yet in an emitted chunk, i.e. of `buf[0]`.
    consumed: u64,
}

impl StreamChunker {
    pub fn new(params: CdcParams) -> Self {
        let p = params.sanitized();
        // Normalisation level 1, as `v2020::FastCDC::new` uses, so one-shot and streaming agree.
        let bits = v2020::logarithm2(p.avg);
        let level = v2020::Normalization::Level1.bits();
        Self {
            p,
            mask_s: v2020::MASKS[(bits + level) as usize],
            mask_l: v2020::MASKS[(bits - level) as usize],
            buf: Vec::new(),
            consumed: 0,
        }
    }

    /// Feeds the next piece of input; appends every chunk whose end is now certain.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<ChunkRef>) {
        let max = self.p.max as usize;
        let mut data = data;
        if !self.buf.is_empty() {
            // A chunk starting in the carried tail is at most `max` long, so `max` bytes of the
            // new piece are enough to settle every such chunk; the rest of the piece is then
            // chunked in place, without copying it.
            let old = self.buf.len();
            let take = data.len().min(max);
            if self.buf.capacity() < old + take {
                self.buf.reserve_exact((2 * max).saturating_sub(old));
            }
            self.buf.extend_from_slice(&data[..take]);
            let used = self.scan(&self.buf, old, false, out);
            self.consumed += used as u64;
            if used < old {
                // A chunk from the tail is still open, which means even `take` bytes did not
                // reach `max`: the whole piece is in `buf` already.
                self.buf.drain(..used);
                return;
            }
            data = &data[used - old..];
            self.buf.clear();
        }
        let used = self.scan(data, data.len(), false, out);
        self.consumed += used as u64;
        self.buf.extend_from_slice(&data[used..]);
    }

    /// Flushes the tail: the chunks left in the buffer, the last one possibly short.
    pub fn finish(mut self, out: &mut Vec<ChunkRef>) {
        let buf = std::mem::take(&mut self.buf);
        self.scan(&buf, buf.len(), true, out);
    }

    /// Emits the certain chunks of `src` (which starts at input offset `self.consumed`) that
    /// start before `stop_at`; returns the offset in `src` after the last emitted chunk.
    /// With `at_end`, `src` is the end of the input, so every cut is certain.
    fn scan(&self, src: &[u8], stop_at: usize, at_end: bool, out: &mut Vec<ChunkRef>) -> usize {
        let (min, avg, max) = (
            self.p.min as usize,
            self.p.avg as usize,
            self.p.max as usize,
        );
        let first = out.len();
        let mut pos = 0;
        while pos < stop_at {
            let avail = src.len() - pos;
            let (_, n) = v2020::cut(
                &src[pos..],
                min,
                avg,
                max,
                self.mask_s,
                self.mask_l,
                self.mask_s << 1,
                self.mask_l << 1,
            );
            if n == 0 || (!at_end && n == avail && avail < max) {
                break;
            }
            out.push(ChunkRef {
                offset: self.consumed + pos as u64,
                // `cut` never returns more than `max`, which is at most 16 MiB.
                len: n as u32,
                hash: 0,
            });
            pos += n;
        }
        // Boundaries first, hashes after: the cut scan is sequential, hashing need not be.
        let base = self.consumed;
        let new = &mut out[first..];
        let fill = |c: &mut ChunkRef| {
            let s = (c.offset - base) as usize;
            c.hash = chunk_hash(&src[s..s + c.len as usize]);
        };
        if pos >= PAR_HASH_BYTES && new.len() > 1 {
            new.par_iter_mut().for_each(fill);
        } else {
            new.iter_mut().for_each(fill);
        }
        pos
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{rngs::StdRng, Rng, RngCore, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut v = vec![0u8; len];
        StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    /// Reference: the crate's own one-shot iterator over the whole input.
    fn one_shot(data: &[u8], p: CdcParams) -> Vec<ChunkRef> {
        v2020::FastCDC::new(data, p.min, p.avg, p.max)
            .map(|c| ChunkRef {
                offset: c.offset as u64,
                len: c.length as u32,
                hash: chunk_hash(&data[c.offset..c.offset + c.length]),
            })
            .collect()
    }

    fn streamed(data: &[u8], p: CdcParams, pieces: &[usize]) -> Vec<ChunkRef> {
        let mut c = StreamChunker::new(p);
        let mut out = Vec::new();
        let mut at = 0;
        let mut i = 0;
        while at < data.len() {
            let n = pieces[i % pieces.len()].min(data.len() - at);
            c.push(&data[at..at + n], &mut out);
            at += n;
            i += 1;
            // Memory bound: at most `max` bytes left over between pushes.
            assert!(c.buf.len() < p.max as usize, "buffered {}", c.buf.len());
        }
        c.push(&[], &mut out);
        c.finish(&mut out);
        out
    }

    #[test]
    fn params_for_size() {
        assert_eq!(
            CdcParams::for_size(0),
            CdcParams {
                min: 512,
                avg: 2 << 10,
                max: 8 << 10
            }
        );
        assert_eq!(CdcParams::for_size(8 << 20).avg, 2 << 10);
        assert_eq!(CdcParams::for_size(1 << 30).avg, 8 << 10);
        // 2 GiB at 8 KiB would be 256 Ki chunks: doubled to stay within 128 Ki.
        assert_eq!(CdcParams::for_size(2 << 30).avg, 16 << 10);
        assert_eq!(CdcParams::for_size(1 << 40).avg, 4 << 20);
        assert_eq!(CdcParams::for_size(u64::MAX).avg, v2020::AVERAGE_MAX);
        for size in [0u64, 1 << 30, 100 << 30, 1 << 50] {
            let p = CdcParams::for_size(size);
            assert!(size / u64::from(p.avg) <= MAX_EXPECTED_CHUNKS || p.avg == v2020::AVERAGE_MAX);
            assert_eq!((p.min, p.max), (p.avg / 4, p.avg * 4));
        }
    }

    #[test]
    fn params_from_avg_clamps() {
        assert_eq!(
            CdcParams::from_avg(0),
            CdcParams {
                min: 64,
                avg: 256,
                max: 1024
            }
        );
        assert_eq!(CdcParams::from_avg(u32::MAX).avg, 4 << 20);
        assert_eq!(
            CdcParams::from_avg(8192),
            CdcParams {
                min: 2048,
                avg: 8192,
                max: 32768
            }
        );
        // Hand-built out-of-range parameters must not panic.
        let mut out = Vec::new();
        let mut c = StreamChunker::new(CdcParams {
            min: 0,
            avg: u32::MAX,
            max: 0,
        });
        c.push(&random(10_000, 9), &mut out);
        c.finish(&mut out);
        assert_eq!(out.iter().map(|c| c.len as usize).sum::<usize>(), 10_000);
    }

    #[test]
    fn empty_input_has_no_chunks() {
        let mut out = Vec::new();
        let c = StreamChunker::new(CdcParams::from_avg(1024));
        c.finish(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn zeros_and_big_pushes_match_one_shot() {
        // All zeroes never hit a mask: every chunk is `max` long (the fall-through path).
        let p = CdcParams::from_avg(4096);
        let z = vec![0u8; 100_000];
        assert_eq!(streamed(&z, p, &[777]), one_shot(&z, p));
        // Big pushes take the parallel hashing path.
        let d = random(3 << 20, 5);
        let p = CdcParams::for_size(d.len() as u64);
        assert_eq!(streamed(&d, p, &[1 << 20]), one_shot(&d, p));
        assert_eq!(streamed(&d, p, &[d.len()]), one_shot(&d, p));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn stream_boundaries_equal_one_shot(
            len in 0usize..200_000,
            seed in any::<u64>(),
            avg_bits in 8u32..14,
            pieces in proptest::collection::vec(1usize..40_000, 1..10),
            low_entropy in any::<bool>(),
        ) {
            let mut d = random(len, seed);
            if low_entropy {
                // Few distinct byte values and long runs: exercises max-length chunks.
                let mut rng = StdRng::seed_from_u64(seed ^ 1);
                for b in d.iter_mut() {
                    *b = if rng.random_ratio(1, 50) { *b & 3 } else { 0 };
                }
            }
            let p = CdcParams::from_avg(1 << avg_bits);
            let want = one_shot(&d, p);
            let got = streamed(&d, p, &pieces);
            prop_assert_eq!(got, want);
        }
    }
}
