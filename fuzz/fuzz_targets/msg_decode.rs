//! Fuzz target: `postcard::from_bytes` of every wire type in `proto::msg` on arbitrary bytes,
//! and of the packed hash lists (block hashes, chunk lists) behind `Msg::Hashes` and
//! `Signature::Chunks`. Whatever decodes must re-encode to something that decodes to an equal
//! value, also through a whole frame (plain and zstd). Owns nothing but this harness.

#![no_main]

use libfuzzer_sys::fuzz_target;
use proto::frame::{decode_payload, encode_frame};
use proto::{
    CopyOp, Entry, EntryKind, FileResult, FilterRule, Hello, Msg, Need, NewSession, ReceiverReport,
    Role, Signature, SmallFile, SyncOptions, Welcome, Xattr,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;

/// Decode `bytes` as `T`; if that works, the value must survive a round trip.
fn check<T>(bytes: &[u8]) -> Option<T>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let value: T = postcard::from_bytes(bytes).ok()?;
    let again = postcard::to_allocvec(&value).expect("a decoded value re-encodes");
    let back: T = postcard::from_bytes(&again).expect("a re-encoded value decodes");
    assert_eq!(back, value, "postcard round trip");
    // Canonical bytes are a fixed point.
    assert_eq!(postcard::to_allocvec(&back).expect("re-encodes"), again);
    Some(value)
}

/// The same through a complete frame, raw and compressed.
fn check_frame<T>(value: &T)
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let (mut compressor, mut plain, mut out) = (None, Vec::new(), Vec::new());
    for compress in [false, true] {
        encode_frame(value, compress, &mut compressor, &mut plain, &mut out)
            .expect("a decoded value fits a frame");
        let (header, body) = out.split_at(5);
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        assert_eq!(len, out.len() - 4, "frame length prefix");
        let back: Option<T> = decode_payload(header[4], body).expect("an encoded frame decodes");
        assert_eq!(
            back.as_ref(),
            Some(value),
            "frame round trip (compress {compress})"
        );
    }
}

/// Postcard prefix of `value` with its trailing empty byte string (length 0) removed, so that
/// appending a length and bytes yields the same message carrying those bytes.
fn prefix_before_empty_bytes<T: Serialize>(value: &T) -> Vec<u8> {
    let mut bytes = postcard::to_allocvec(value).expect("encodes");
    assert_eq!(
        bytes.pop(),
        Some(0),
        "the value ends with an empty byte string"
    );
    bytes
}

fn with_bytes(mut prefix: Vec<u8>, data: &[u8]) -> Vec<u8> {
    let mut n = data.len();
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            prefix.push(b);
            break;
        }
        prefix.push(b | 0x80);
    }
    prefix.extend_from_slice(data);
    prefix
}

fuzz_target!(|data: &[u8]| {
    // Handshake values only decode here; nothing constructs a `Hello`.
    if let Some(h) = check::<Hello>(data) {
        check_frame(&h);
    }
    if let Some(w) = check::<Welcome>(data) {
        check_frame(&w);
    }
    check::<NewSession>(data);
    check::<Role>(data);
    check::<SyncOptions>(data);
    check::<FilterRule>(data);
    check::<Entry>(data);
    check::<Xattr>(data);
    check::<EntryKind>(data);
    check::<Need>(data);
    check::<Signature>(data);
    check::<CopyOp>(data);
    check::<SmallFile>(data);
    check::<FileResult>(data);
    check::<ReceiverReport>(data);
    if let Some(m) = check::<Msg>(data) {
        check_frame(&m);
    }

    // The packed decoders, fed the raw input as their byte string.
    let hashes = Msg::Hashes {
        id: 1,
        block: 4096,
        hashes: Vec::new(),
    };
    let decoded = check::<Msg>(&with_bytes(prefix_before_empty_bytes(&hashes), data));
    if data.len().is_multiple_of(16) {
        match decoded {
            Some(Msg::Hashes { hashes, .. }) => assert_eq!(hashes.len(), data.len() / 16),
            other => panic!(
                "{} whole block hashes did not decode: {other:?}",
                data.len() / 16
            ),
        }
    } else {
        assert!(decoded.is_none(), "a partial block hash decoded");
    }
    let chunks = Signature::Chunks {
        basis_size: 0,
        avg: 8192,
        chunks: Vec::new(),
    };
    if let Some(Signature::Chunks { chunks, .. }) =
        check::<Signature>(&with_bytes(prefix_before_empty_bytes(&chunks), data))
    {
        // Each chunk takes 1-5 length bytes and 8 hash bytes.
        assert!(chunks.len() * 9 <= data.len() && data.len() <= chunks.len() * 13);
    }
});
