//! Random requests against a live in-process export (a memory backend with guard bytes
//! past its end, plus the test `cutover:dirty` context and observer): whatever the
//! client sends (any command number, flags, offsets near the end or far past it, lengths
//! up to `u32::MAX`, garbage headers), the server must not panic, must touch nothing
//! outside the export, must answer only cookies it was sent, each at most once, with
//! well-formed replies, and must end the connection when told to or when it has to.

use crate::common::*;
use crate::raw::Raw;
use nbd::request::{encode_header, RawRequest};
use nbd::wire::*;
use nbd::{Export, Server};
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 65536 + 7;

#[derive(Clone, Debug)]
enum Op {
    Request(RawRequest),
    Garbage([u8; 28]),
}

fn op() -> impl Strategy<Value = Op> {
    let offset = prop_oneof![
        0..SIZE + 2,
        (SIZE - 16)..(SIZE + 16),
        Just(u64::MAX),
        any::<u64>(),
    ];
    let length = prop_oneof![
        8 => 0u32..9000,
        1 => Just(MAX_PAYLOAD),
        1 => Just(MAX_PAYLOAD + 1),
        1 => any::<u32>(),
    ];
    // DISC ends a session: rare, so that sessions are long.
    let kind = prop_oneof![
        30 => prop::sample::select(vec![0u16, 1, 3, 4, 5, 6, 7, 8]),
        1 => Just(CMD_DISC),
        2 => any::<u16>(),
    ];
    let flags = prop_oneof![3 => Just(0u16), 3 => 0u16..32, 1 => any::<u16>()];
    prop_oneof![
        40 => (kind, flags, offset, length).prop_map(|(kind, flags, offset, mut length)| {
            // Keep write payloads small unless they are too long to be read at all.
            if kind == CMD_WRITE && length > 9000 && length <= MAX_PAYLOAD {
                length %= 9000;
            }
            Op::Request(RawRequest { flags, kind, cookie: 0, offset, length })
        }),
        1 => any::<[u8; 28]>().prop_map(Op::Garbage),
    ]
}

/// Parse the server's output: every reply must be well formed and name a cookie we sent;
/// returns how many requests were completed.
fn check_replies(mut out: &[u8], sent: &HashMap<u64, RawRequest>) -> Result<usize, String> {
    let mut done: HashMap<u64, bool> = HashMap::new();
    let be32 = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    while !out.is_empty() {
        if out.len() < 16 {
            return Err(format!("{} stray bytes", out.len()));
        }
        let magic = be32(out);
        let cookie = u64::from_be_bytes(out[8..16].try_into().unwrap());
        let Some(req) = sent.get(&cookie) else {
            return Err(format!("reply to unknown cookie {cookie}"));
        };
        if done.insert(cookie, true).is_some() {
            return Err(format!("second reply to cookie {cookie}"));
        }
        if magic == SIMPLE_REPLY_MAGIC {
            let error = be32(&out[4..]);
            let data = if error == 0 && req.kind == CMD_READ {
                req.length as usize
            } else {
                0
            };
            if out.len() < 16 + data {
                return Err("truncated simple reply".into());
            }
            out = &out[16 + data..];
            continue;
        }
        if magic != STRUCTURED_REPLY_MAGIC {
            return Err(format!("bad reply magic {magic:#x}"));
        }
        // Chunks of one structured reply until DONE (we never interleave replies).
        done.remove(&cookie);
        loop {
            if out.len() < 20 || be32(out) != STRUCTURED_REPLY_MAGIC {
                return Err("bad or truncated chunk".into());
            }
            let flags = u16::from_be_bytes([out[4], out[5]]);
            let kind = u16::from_be_bytes([out[6], out[7]]);
            let c = u64::from_be_bytes(out[8..16].try_into().unwrap());
            let len = be32(&out[16..]) as usize;
            if c != cookie || out.len() < 20 + len {
                return Err("chunk of another cookie or truncated".into());
            }
            let payload = &out[20..20 + len];
            match kind {
                REPLY_TYPE_NONE if len == 0 => {}
                REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                    let at = u64::from_be_bytes(payload[..8].try_into().unwrap());
                    let n = if kind == REPLY_TYPE_OFFSET_HOLE {
                        u64::from(be32(&payload[8..]))
                    } else {
                        len as u64 - 8
                    };
                    let end = req.offset + u64::from(req.length);
                    if at < req.offset || at + n > end || n == 0 {
                        return Err(format!("content chunk {at}+{n} outside the request"));
                    }
                }
                REPLY_TYPE_BLOCK_STATUS if len >= 12 && (len - 4) & 7 == 0 => {}
                REPLY_TYPE_ERROR if len >= 6 => {
                    if be32(payload) == 0 {
                        return Err("error chunk with error 0".into());
                    }
                }
                _ => return Err(format!("unexpected chunk type {kind} of {len} bytes")),
            }
            out = &out[20 + len..];
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        done.insert(cookie, true);
    }
    Ok(done.len())
}

async fn session(ops: Vec<Op>, structured: bool, contexts: bool) -> Result<(), TestCaseError> {
    let mem = Arc::new(MemBackend::new(SIZE));
    let dirty = DirtyMap::new(mem.clone());
    let mut e = Export::new("p", mem.clone());
    e.meta.push(dirty.clone());
    e.observer = Some(dirty.clone());
    let mut c = Raw::start(Server::new(vec![e]));
    c.greeting(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
    let ctx: &[&str] = if contexts && structured {
        &["base:allocation", "cutover:dirty"]
    } else {
        &[]
    };
    c.go("p", structured, ctx).await;

    let (mut rd, mut wr) = tokio::io::split(c.io);
    let drain = tokio::spawn(async move {
        let mut v = Vec::new();
        let _ = rd.read_to_end(&mut v).await;
        v
    });
    let mut sent = HashMap::new();
    let mut ended = false;
    for (i, op) in ops.into_iter().enumerate() {
        let cookie = i as u64 + 1;
        let r = match op {
            Op::Garbage(g) => {
                let _ = wr.write_all(&g).await;
                if g[..4] != REQUEST_MAGIC.to_be_bytes() {
                    ended = true;
                    break;
                }
                continue;
            }
            Op::Request(r) => RawRequest { cookie, ..r },
        };
        sent.insert(cookie, r);
        if wr.write_all(&encode_header(&r)).await.is_err() {
            break;
        }
        if r.kind == CMD_DISC {
            ended = true;
            break;
        }
        if r.kind == CMD_WRITE {
            if r.length > MAX_PAYLOAD {
                ended = true;
                break;
            }
            let payload = vec![(cookie % 251) as u8; r.length as usize];
            if wr.write_all(&payload).await.is_err() {
                break;
            }
        }
    }
    if !ended {
        let disc = RawRequest {
            flags: 0,
            kind: CMD_DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        let _ = wr.write_all(&encode_header(&disc)).await;
    }
    // EOF after the last request, whatever the server made of the bytes before it.
    let _ = wr.shutdown().await;
    let finished = tokio::time::timeout(Duration::from_secs(20), c.server).await;
    let joined = finished.map_err(|_| TestCaseError::fail("server did not finish"))?;
    if let Err(e) = &joined {
        prop_assert!(!e.is_panic(), "server panicked: {e}");
    }
    let out = tokio::time::timeout(Duration::from_secs(20), drain)
        .await
        .map_err(|_| TestCaseError::fail("output not closed"))?
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    check_replies(&out, &sent).map_err(TestCaseError::fail)?;
    prop_assert!(
        mem.violations.lock().unwrap().is_empty(),
        "backend called out of range: {:?}",
        mem.violations.lock().unwrap()
    );
    prop_assert!(mem.guard_intact(), "bytes past the export were written");
    prop_assert_eq!(*dirty.out_of_order.lock().unwrap(), 0);
    prop_assert_eq!(
        SERVER_PANICS.load(Ordering::SeqCst),
        0,
        "a server thread panicked"
    );
    Ok(())
}

/// Panics on the server's threads, counted by a panic hook: a handler's panic is caught
/// and answered with NBD_EIO, so the task never shows it, but the hook still runs.
static SERVER_PANICS: AtomicUsize = AtomicUsize::new(0);
const THREAD_NAME: &str = "nbd-props-server";

fn count_server_panics() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if std::thread::current().name() == Some(THREAD_NAME) {
                SERVER_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info)
        }));
    });
}

#[test]
fn random_requests_never_panic_or_stray() {
    count_server_panics();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(THREAD_NAME)
        .enable_all()
        .build()
        .unwrap();
    let config = ProptestConfig {
        cases: 512,
        ..ProptestConfig::default()
    };
    proptest!(config, |(ops in prop::collection::vec(op(), 1..64),
                        structured in any::<bool>(),
                        contexts in any::<bool>())| {
        rt.block_on(session(ops, structured, contexts))?;
    });
}
