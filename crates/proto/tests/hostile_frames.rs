//! Hostile input for the framing layer: random byte strings, valid frames with bit flips,
//! truncated streams, oversized length prefixes and zstd bombs, fed to `FrameReader` and
//! `decode_payload`. Each must end in a value or an error, never a panic, and never make the
//! decoder allocate ahead of the bytes a peer actually sent.
//!
//! This test binary counts the largest single allocation per thread (see `PeakAlloc`) so that
//! "refused before allocating" is checked, not assumed.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proto::frame::{decode_payload, encode_frame};
use proto::{
    CopyOp, Entry, EntryKind, FileResult, FrameError, FrameReader, Hello, Msg, Need, Signature,
    SmallFile, Welcome, WireCounter, MAX_FRAME,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, ReadBuf};

// ---- allocation accounting

/// The system allocator, noting the largest single request made on the current thread.
struct PeakAlloc;

thread_local! {
    static PEAK: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: the slot may be gone while a thread shuts down.
    let _ = PEAK.try_with(|p| p.set(p.get().max(size)));
}

// SAFETY: every call is passed straight to `System`; only a thread-local counter is added,
// which is const-initialised and never allocates.
unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// Run `f` and return its result with the largest single allocation it made on this thread.
fn peak_alloc<T>(f: impl FnOnce() -> T) -> (T, usize) {
    PEAK.with(|p| p.set(0));
    let out = f();
    (out, PEAK.with(Cell::get))
}

// ---- an in-memory stream polled without a runtime

/// Hands out at most `step` bytes per read (frames arrive split anywhere); always ready.
struct Trickle {
    data: Vec<u8>,
    pos: usize,
    step: usize,
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let start = self.pos;
        let n = (self.data.len() - start)
            .min(self.step)
            .min(buf.remaining());
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

fn block_on<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("an in-memory reader never waits"),
    }
}

/// Every message of `stream` up to the first error or the end, and how the stream ended.
fn read_stream(stream: &[u8], step: usize) -> (Vec<Msg>, Result<(), FrameError>, u64) {
    let counter = Arc::new(WireCounter::default());
    let reader = Trickle {
        data: stream.to_vec(),
        pos: 0,
        step,
    };
    let mut r = FrameReader::new(reader, counter.clone());
    let mut got = Vec::new();
    // A frame takes at least 5 bytes, so the stream ends within this many reads.
    for _ in 0..=stream.len() / 5 + 1 {
        match block_on(r.recv::<Msg>()) {
            Ok(Some(m)) => got.push(m),
            Ok(None) => return (got, Ok(()), counter.received.load(Ordering::Relaxed)),
            Err(e) => return (got, Err(e), counter.received.load(Ordering::Relaxed)),
        }
    }
    panic!("{} bytes gave more than {} frames", stream.len(), got.len());
}

fn encode_stream(msgs: &[Msg], compress: bool) -> (Vec<u8>, Vec<usize>) {
    let (mut compressor, mut plain, mut out) = (None, Vec::new(), Vec::new());
    let mut stream = Vec::new();
    let mut ends = Vec::new();
    for m in msgs {
        encode_frame(m, compress, &mut compressor, &mut plain, &mut out).unwrap();
        stream.extend_from_slice(&out);
        ends.push(stream.len());
    }
    (stream, ends)
}

fn decode_every_type(flag: u8, body: &[u8]) {
    let _ = decode_payload::<Hello>(flag, body);
    let _ = decode_payload::<Welcome>(flag, body);
    let _ = decode_payload::<Msg>(flag, body);
}

// ---- strategies

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    vec(any::<u8>(), 0..max)
}

fn entry() -> impl Strategy<Value = Entry> {
    let kind = prop_oneof![
        Just(EntryKind::File),
        Just(EntryKind::Dir),
        bytes(32).prop_map(|target| EntryKind::Symlink { target }),
        bytes(32).prop_map(|first| EntryKind::HardLink { first }),
        any::<u64>().prop_map(|rdev| EntryKind::CharDevice { rdev }),
        Just(EntryKind::Volume),
    ];
    (bytes(48), kind, any::<(u64, i64, u32, u32, u32, u32)>()).prop_map(
        |(path, kind, (size, mtime_sec, mtime_nsec, mode, uid, gid))| Entry {
            path,
            kind,
            size,
            mtime_sec,
            mtime_nsec,
            mode,
            uid,
            gid,
            xattrs: Vec::new(),
        },
    )
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), bytes(2048)).prop_map(|(id, offset, data)| Msg::Data {
            id,
            offset,
            data
        }),
        // Long and repetitive: goes through zstd when compression is asked for.
        (any::<u8>(), 512..6000usize).prop_map(|(b, n)| Msg::Data {
            id: 1,
            offset: 0,
            data: (0..n).map(|i| b.wrapping_add((i % 7) as u8)).collect(),
        }),
        (any::<u64>(), vec(any::<u128>(), 0..64)).prop_map(|(id, hashes)| Msg::Hashes {
            id,
            block: 4096,
            hashes
        }),
        (any::<u64>(), vec(any::<(u32, u64)>(), 0..64)).prop_map(|(id, chunks)| {
            Msg::Signature {
                id,
                signature: Signature::Chunks {
                    basis_size: 1 << 20,
                    avg: 16384,
                    chunks,
                },
            }
        }),
        (any::<u64>(), vec(entry(), 0..8)).prop_map(|(batch, entries)| Msg::FileList {
            batch,
            first_id: batch.wrapping_mul(1000),
            entries,
            rescan: false,
            implied: Vec::new(),
        }),
        vec(
            prop_oneof![Just(Need::Skip), Just(Need::Full), Just(Need::Chunks)],
            0..64
        )
        .prop_map(|needs| Msg::Needs { batch: 3, needs }),
        (any::<u64>(), vec(any::<(u64, u64, u64)>(), 0..16)).prop_map(|(id, ops)| Msg::Copy {
            id,
            ops: ops
                .into_iter()
                .map(|(src, len, dst)| CopyOp { src, len, dst })
                .collect(),
        }),
        (any::<u64>(), bytes(600), any::<[u8; 32]>()).prop_map(|(id, data, digest)| {
            Msg::SmallFiles {
                files: vec![SmallFile { id, data, digest }],
            }
        }),
        ".{0,40}".prop_map(|reason| Msg::FileDone {
            id: 9,
            result: FileResult::Failed {
                reason,
                retry: true
            },
        }),
        ".{0,40}".prop_map(|message| Msg::Fatal { message }),
        any::<(u64, u64)>().prop_map(|(batches, entries)| Msg::EndOfList { batches, entries }),
    ]
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 256,
        max_shrink_iters: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Arbitrary bytes as a stream and as a frame body: a value or an error, nothing else.
    #[test]
    fn random_bytes_end_in_a_value_or_an_error(
        data in bytes(4096),
        step in 1..64usize,
        flag in any::<u8>(),
    ) {
        for step in [usize::MAX, step] {
            let (_, _, counted) = read_stream(&data, step);
            prop_assert!(counted <= data.len() as u64);
        }
        decode_every_type(flag, &data);
        decode_every_type(0, &data);
        decode_every_type(1, &data);
        // The zstd branch with arbitrary content behind it.
        let packed = zstd::bulk::compress(&data, 1).unwrap();
        decode_every_type(1, &packed);
        prop_assert_eq!(
            decode_payload::<Msg>(1, &packed).ok(),
            decode_payload::<Msg>(0, &data).ok()
        );
    }

    /// Valid streams decode to what was sent; with bits flipped they still end cleanly.
    #[test]
    fn valid_frames_with_bit_flips_end_in_values_or_errors(
        msgs in vec(msg(), 1..6),
        compress in any::<bool>(),
        flips in vec((any::<Index>(), 0..8u8), 0..8),
        step in 1..64usize,
    ) {
        let (mut stream, _) = encode_stream(&msgs, compress);
        let (got, end, counted) = read_stream(&stream, step);
        prop_assert_eq!(&got, &msgs);
        prop_assert!(end.is_ok(), "{:?}", end);
        prop_assert_eq!(counted, stream.len() as u64);

        for (at, bit) in &flips {
            let i = at.index(stream.len());
            stream[i] ^= 1 << bit;
        }
        let ((_, end, counted), peak) = peak_alloc(|| read_stream(&stream, step));
        prop_assert!(counted <= stream.len() as u64);
        if let Err(FrameError::TooLarge(n, _)) = end {
            // Either a length prefix over the limit, or a zstd header announcing more.
            prop_assert!(n > MAX_FRAME);
        }
        // Never more than one frame's worth at once. (A flipped zstd header may announce up to
        // `MAX_FRAME`, which is reserved but, as nothing inflates into it, never touched.)
        prop_assert!(peak <= MAX_FRAME + 4096, "{} bytes allocated at once", peak);
    }

    /// A stream cut anywhere yields every complete frame, then a clean end (at a frame boundary)
    /// or `Truncated` (inside a frame, its length prefix included).
    #[test]
    fn truncated_streams_yield_the_complete_frames_then_truncated(
        msgs in vec(msg(), 1..6),
        compress in any::<bool>(),
        cut in any::<Index>(),
        step in 1..64usize,
    ) {
        let (stream, ends) = encode_stream(&msgs, compress);
        let cut = cut.index(stream.len() + 1);
        let complete = ends.iter().take_while(|&&e| e <= cut).count();
        let (got, end, counted) = read_stream(&stream[..cut], step);
        prop_assert_eq!(&got[..], &msgs[..complete]);
        prop_assert_eq!(counted, if complete == 0 { 0 } else { ends[complete - 1] as u64 });
        if cut == 0 || ends.contains(&cut) {
            prop_assert!(end.is_ok(), "cut at a boundary: {:?}", end);
        } else {
            prop_assert!(matches!(end, Err(FrameError::Truncated)), "cut at {}: {:?}", cut, end);
        }
    }

    /// A length over `MAX_FRAME` is refused from the prefix alone: no body read, nothing
    /// allocated for it.
    #[test]
    fn oversized_length_prefixes_are_refused_before_allocating(
        len in (MAX_FRAME as u32 + 1)..=u32::MAX,
        tail in bytes(64),
    ) {
        let mut stream = len.to_le_bytes().to_vec();
        stream.extend_from_slice(&tail);
        let ((got, end, counted), peak) = peak_alloc(|| read_stream(&stream, usize::MAX));
        prop_assert!(got.is_empty());
        prop_assert!(matches!(end, Err(FrameError::TooLarge(n, _)) if n == len as usize));
        prop_assert_eq!(counted, 0);
        prop_assert!(peak < 4096, "{} bytes allocated for a refused frame", peak);
    }

    /// A length within the limit, but a peer that sends only part of the body: the buffer
    /// follows what arrived, not what was announced.
    #[test]
    fn announced_lengths_are_not_allocated_ahead_of_the_data(
        len in (1u32 << 20)..=MAX_FRAME as u32,
        sent in 0..4096usize,
    ) {
        let mut stream = len.to_le_bytes().to_vec();
        stream.resize(4 + sent, 0);
        let ((_, end, _), peak) = peak_alloc(|| read_stream(&stream, usize::MAX));
        prop_assert!(matches!(end, Err(FrameError::Truncated)), "{:?}", end);
        prop_assert!(peak <= 256 << 10, "{} bytes allocated for {} received", peak, sent);
    }
}

// ---- zstd bombs: a few KiB that inflate past MAX_FRAME

/// A `Msg::Data` whose postcard encoding is just over `MAX_FRAME`, compressed; with or without
/// the inflated size in the zstd frame header.
fn bomb(announce_size: bool) -> Vec<u8> {
    let msg = Msg::Data {
        id: 1,
        offset: 0,
        data: vec![0; MAX_FRAME],
    };
    let plain = postcard::to_allocvec(&msg).unwrap();
    assert!(plain.len() > MAX_FRAME);
    let mut c = zstd::bulk::Compressor::new(1).unwrap();
    c.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(announce_size))
        .unwrap();
    let packed = c.compress(&plain).unwrap();
    assert!(packed.len() < 4096, "bomb is {} bytes", packed.len());
    packed
}

fn framed(flag: u8, body: &[u8]) -> Vec<u8> {
    let mut stream = ((body.len() + 1) as u32).to_le_bytes().to_vec();
    stream.push(flag);
    stream.extend_from_slice(body);
    stream
}

#[test]
fn zstd_bomb_announcing_its_size_is_refused_before_inflating() {
    let body = bomb(true);
    let (res, peak) = peak_alloc(|| decode_payload::<Msg>(1, &body));
    assert!(
        matches!(res, Err(FrameError::TooLarge(n, _)) if n > MAX_FRAME),
        "{res:?}"
    );
    assert!(peak < 64 << 10, "{peak} bytes allocated for a refused bomb");

    let ((got, end, _), peak) = peak_alloc(|| read_stream(&framed(1, &body), usize::MAX));
    assert!(got.is_empty());
    assert!(matches!(end, Err(FrameError::TooLarge(..))), "{end:?}");
    assert!(peak < 64 << 10, "{peak} bytes allocated for a refused bomb");
    decode_every_type(1, &body);
}

#[test]
fn zstd_bomb_hiding_its_size_stops_at_max_frame() {
    let body = bomb(false);
    assert_eq!(
        zstd::zstd_safe::get_frame_content_size(&body).unwrap(),
        None
    );
    let (res, peak) = peak_alloc(|| decode_payload::<Msg>(1, &body));
    assert!(matches!(res, Err(FrameError::Malformed(_))), "{res:?}");
    assert!(peak <= MAX_FRAME + 4096, "{peak} bytes allocated");

    let (got, end, _) = read_stream(&framed(1, &body), usize::MAX);
    assert!(got.is_empty());
    assert!(matches!(end, Err(FrameError::Malformed(_))), "{end:?}");
}

/// Our own compressed frames announce their size, so honest frames take the exact-size path.
#[test]
fn compressed_frames_announce_their_inflated_size() {
    let msg = Msg::Data {
        id: 1,
        offset: 0,
        data: b"abc".repeat(10_000),
    };
    let (stream, _) = encode_stream(std::slice::from_ref(&msg), true);
    assert_eq!(stream[4], 1, "frame was not compressed");
    let plain = postcard::to_allocvec(&msg).unwrap();
    assert_eq!(
        zstd::zstd_safe::get_frame_content_size(&stream[5..]).unwrap(),
        Some(plain.len() as u64)
    );
    let (got, end, _) = read_stream(&stream, 1000);
    assert_eq!(got, vec![msg]);
    assert!(end.is_ok());
}
