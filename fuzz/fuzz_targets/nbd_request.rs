//! Fuzz target: arbitrary bytes as NBD transmission requests and handshake options for
//! the `nbd` crate. Request headers go through `decode_header` and `validate` under limits
//! chosen by the first byte, and what passes must be within the export and the payload
//! limit; the same bytes as option payloads go through `options::handle_option`, whose
//! replies must parse as well-formed option replies. Owns nothing but this harness.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nbd::options::{handle_option, Next, OptState};
use nbd::request::{decode_header, validate, Command, Limits, Rejection, HEADER_LEN};
use nbd::wire::*;
use nbd::{Backend, Export, Extent, MetaContext};
use std::io;
use std::sync::Arc;

struct Null(u64);

impl Backend for Null {
    fn size(&self) -> u64 {
        self.0
    }
    fn read_at(&self, buf: &mut [u8], _: u64) -> io::Result<()> {
        buf.fill(0);
        Ok(())
    }
    fn write_at(&self, _: &[u8], _: u64) -> io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

struct Dirty;

impl MetaContext for Dirty {
    fn name(&self) -> &str {
        "cutover:dirty"
    }
    fn extents(&self, _: u64, length: u32, _: usize) -> io::Result<Vec<Extent>> {
        Ok(vec![Extent { length, flags: 0 }])
    }
}

fn requests(selector: u8, data: &[u8]) {
    let size = match selector & 3 {
        0 => 0,
        1 => 4096,
        2 => (1 << 40) + 7,
        _ => u64::MAX,
    };
    let limits = Limits {
        size,
        read_only: selector & 4 != 0,
        structured: selector & 8 != 0,
        contexts: usize::from(selector >> 4 & 3),
        max_payload: MAX_PAYLOAD,
    };
    for chunk in data.chunks_exact(HEADER_LEN) {
        let mut header = [0u8; HEADER_LEN];
        header.copy_from_slice(chunk);
        // Force the magic now and then so validation sees most headers.
        if selector & 0x40 != 0 {
            header[..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        let Ok(raw) = decode_header(&header) else {
            continue;
        };
        match validate(&raw, &limits) {
            Ok(req) => {
                assert_eq!((req.cookie, req.offset, req.length), (raw.cookie, raw.offset, raw.length));
                if req.command != Command::Disc && req.command != Command::Flush {
                    let end = req.offset.checked_add(u64::from(req.length));
                    assert!(end.is_some_and(|e| e <= size), "{raw:?} passed out of range");
                }
                if matches!(req.command, Command::Read { .. } | Command::Write { .. }) {
                    assert!(req.length <= MAX_PAYLOAD);
                }
                if limits.read_only {
                    assert!(!matches!(
                        req.command,
                        Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }
                    ));
                }
                if matches!(req.command, Command::BlockStatus { .. }) {
                    assert!(limits.structured && limits.contexts > 0);
                }
            }
            Err(Rejection::Error { discard, .. }) => {
                if discard > 0 {
                    assert_eq!(raw.kind, CMD_WRITE);
                    assert_eq!(discard, raw.length);
                    assert!(discard <= MAX_PAYLOAD);
                }
            }
            Err(Rejection::Fatal(_)) => assert!(raw.kind == CMD_WRITE && raw.length > MAX_PAYLOAD),
        }
    }
}

/// Option replies must each be magic, option, type, length and that many bytes.
fn check_replies(mut out: &[u8], option: u32) {
    while !out.is_empty() {
        assert!(out.len() >= 20, "truncated option reply");
        assert_eq!(&out[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        assert_eq!(&out[8..12], &option.to_be_bytes());
        let len = u32::from_be_bytes([out[16], out[17], out[18], out[19]]) as usize;
        assert!(out.len() >= 20 + len, "option reply longer than its bytes");
        out = &out[20 + len..];
    }
}

fn options(data: &[u8]) {
    let mut dirty = Export::new("disk", Arc::new(Null(1 << 20)));
    dirty.meta.push(Arc::new(Dirty));
    let exports = vec![dirty, Export::new("other", Arc::new(Null(512)))];
    let mut state = OptState::default();
    let mut out = Vec::new();
    // Options as (number: 1 byte, length: 1 byte, payload) records.
    let mut rest = data;
    while let [number, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        let (payload, next) = tail.split_at(n);
        rest = next;
        let option = u32::from(*number % 12);
        out.clear();
        match handle_option(&mut state, &exports, option, payload, &mut out) {
            Next::Go(s) => {
                assert!(s.export < exports.len());
                if option == OPT_EXPORT_NAME {
                    assert!(out.len() == 10 || out.len() == 134);
                    return;
                }
                check_replies(&out, option);
                return;
            }
            Next::Close(_) => {
                assert_eq!(option, OPT_EXPORT_NAME);
                return;
            }
            Next::Abort | Next::Continue => check_replies(&out, option),
        }
    }
    // The whole input as one payload of each option.
    for option in 0..12 {
        let mut state = OptState {
            structured: true,
            ..OptState::default()
        };
        out.clear();
        if !matches!(
            handle_option(&mut state, &exports, option, data, &mut out),
            Next::Close(_)
        ) && option != OPT_EXPORT_NAME
        {
            check_replies(&out, option);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some((&selector, rest)) = data.split_first() {
        requests(selector, rest);
    }
    options(data);
});
