//! Fuzz target: arbitrary bytes as a stream of frames (`proto::FrameReader` decoding `Msg`
//! until an error or the end), and as a frame body for `decode_payload` of every handshake and
//! message type with both flag values. Owns nothing but this harness.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::frame::decode_payload;
use proto::{FrameError, FrameReader, Hello, Msg, Welcome, WireCounter};
use std::future::Future;
use std::pin::{pin, Pin};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use tokio::io::{AsyncRead, ReadBuf};

/// An in-memory stream that hands out at most `step` bytes per read, so frames arrive split
/// at every possible point. It is always ready, which lets the harness poll without a runtime.
struct Trickle<'a> {
    data: &'a [u8],
    step: usize,
}

impl AsyncRead for Trickle<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let n = self.data.len().min(self.step).min(buf.remaining());
        let (head, tail) = self.data.split_at(n);
        buf.put_slice(head);
        self.data = tail;
        Poll::Ready(Ok(()))
    }
}

/// Poll a future over an always-ready reader to completion.
fn run<F: Future>(fut: F) -> F::Output {
    let mut fut = pin!(fut);
    let mut cx = Context::from_waker(Waker::noop());
    match fut.as_mut().poll(&mut cx) {
        Poll::Ready(v) => v,
        Poll::Pending => panic!("an in-memory reader never waits"),
    }
}

fn read_all(data: &[u8], step: usize) {
    let counter = Arc::new(WireCounter::default());
    let mut reader = FrameReader::new(Trickle { data, step }, counter.clone());
    // Every frame consumes at least 5 bytes, so this loop ends; the bound is a backstop.
    for _ in 0..=data.len() {
        match run(reader.recv::<Msg>()) {
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(FrameError::TooLarge(n, limit)) => {
                assert!(n > limit, "TooLarge({n}) is within the limit {limit}");
                break;
            }
            Err(_) => break,
        }
    }
    let counted = counter.received.load(Ordering::Relaxed);
    assert!(
        counted <= data.len() as u64,
        "counted {counted} of {} bytes",
        data.len()
    );
}

fn payload_all(body: &[u8]) {
    for flag in [0u8, 1] {
        let _ = decode_payload::<Hello>(flag, body);
        let _ = decode_payload::<Welcome>(flag, body);
        let _ = decode_payload::<Msg>(flag, body);
    }
}

fuzz_target!(|data: &[u8]| {
    // The stream as one piece, and split into reads of 1..=16 bytes chosen by the first byte.
    read_all(data, usize::MAX);
    if let Some((&first, rest)) = data.split_first() {
        read_all(rest, usize::from(first % 16) + 1);
    }

    payload_all(data);
    // Random bytes almost never pass zstd's magic check; compress them so the postcard decoders
    // behind the zstd branch see arbitrary input too.
    if data.len() >= proto::MAX_FRAME {
        return;
    }
    if let Ok(packed) = zstd::bulk::compress(data, 1) {
        for flag in [0u8, 1] {
            let _ = decode_payload::<Hello>(flag, &packed);
            let _ = decode_payload::<Welcome>(flag, &packed);
        }
        match decode_payload::<Msg>(1, &packed) {
            Ok(via_zstd) => assert_eq!(via_zstd, decode_payload::<Msg>(0, data).ok().flatten()),
            Err(_) => assert!(decode_payload::<Msg>(0, data).is_err()),
        }
    }
});
