//! The handlers: one checked request against the backend, the observer and the metadata
//! contexts, run on tokio's blocking pool, ending in the whole [`Reply`]. A WRITE without
//! FUA may send its reply before it touches the backend (see `behind.rs`); every other
//! request first waits for the earlier writes done behind whose range it overlaps.

use crate::backend::Zeroing;
use crate::behind::Ticket;
use crate::direct::Payload;
use crate::export::{Extent, WriteEvent, WriteKind};
use crate::options::ContextKind;
use crate::reply::{self, Reply};
use crate::request::{Command, Request};
use crate::server::Conn;
use crate::wire::*;
use std::io;

/// The error message and value for a failed backend or observer call.
fn failure(what: &str, e: &io::Error) -> (Errno, String) {
    (Errno::from_io(e), format!("{what}: {e}"))
}

/// The reply to a request that returns no data: done, or the error and its message.
fn answer(cookie: u64, structured: bool, r: Result<(), (Errno, String)>) -> Reply {
    match r {
        Ok(()) => reply::simple(cookie, None),
        Err((errno, msg)) => reply::error(cookie, structured, errno, &msg),
    }
}

/// Serve one checked request (on the blocking pool): its reply, or None when `early`
/// was given it before the write was made (a write done behind its reply, `ticket.own`).
pub(crate) fn serve(
    conn: &Conn,
    req: &Request,
    payload: Option<Payload>,
    ticket: Ticket,
    early: &dyn Fn(Reply),
) -> Option<Reply> {
    let Some(own) = ticket.own else {
        let behind = &conn.behind;
        match req.command {
            Command::Flush | Command::Disc => {}
            _ => behind.wait_overlapping(ticket.before, req.offset, u64::from(req.length)),
        }
        return Some(handle(conn, req, payload, ticket.before));
    };
    // Unless this ends normally, the write is counted as failed (a panic in the backend).
    let mut finished = Finished {
        conn,
        own,
        failure: Some("internal error while writing".into()),
    };
    conn.behind
        .wait_overlapping(ticket.before, req.offset, u64::from(req.length));
    let data = payload.unwrap_or_else(|| Payload::new(0));
    let (offset, length) = (req.offset, u64::from(req.length));
    let ev = WriteEvent {
        offset,
        length,
        kind: WriteKind::Data,
        data: Some(data.as_slice()),
        fua: false,
    };
    // Replication that waits for the peer per write (protocol C) must answer after it.
    let may = conn
        .export
        .observer
        .as_ref()
        .is_none_or(|o| o.may_answer_early());
    let answered = std::cell::Cell::new(false);
    let recorded = || {
        if may {
            early(reply::simple(req.cookie, None));
            answered.set(true);
        }
    };
    let r = observed(conn, &ev, recorded, || {
        conn.export.backend.write_at(data.as_slice(), offset)
    });
    finished.failure = None;
    if !answered.get() {
        let r = r.map_err(|e| failure("write", &e));
        return Some(answer(req.cookie, conn.structured, r));
    }
    if let Err(e) = r {
        finished.failure = Some(format!(
            "a write of {length} bytes at offset {offset}, answered before it was made, failed: {e}"
        ));
    }
    None
}

/// Tells the export's write-behind bookkeeping that write `own` is over, when dropped.
struct Finished<'a> {
    conn: &'a Conn,
    own: u64,
    failure: Option<String>,
}

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.conn.behind.finish(self.own, self.failure.take());
    }
}

/// Serve a request that is answered once done. `before`: the writes done behind that a
/// FLUSH waits for.
fn handle(conn: &Conn, req: &Request, payload: Option<Payload>, before: u64) -> Reply {
    let (c, s) = (req.cookie, conn.structured);
    let backend = &*conn.export.backend;
    let (offset, length) = (req.offset, u64::from(req.length));
    let done = |r| answer(c, s, r);
    let event = |kind, data, fua| WriteEvent {
        offset,
        length,
        kind,
        data,
        fua,
    };
    let fua_flush = |fua: bool| if fua { backend.flush() } else { Ok(()) };
    let nothing = || {};
    match req.command {
        Command::Read { df } => read(conn, req, df),
        Command::Write { fua } => {
            let data = payload.unwrap_or_else(|| Payload::new(0));
            let ev = event(WriteKind::Data, Some(data.as_slice()), fua);
            done(
                observed(conn, &ev, nothing, || {
                    backend.write_at(data.as_slice(), offset)?;
                    fua_flush(fua)
                })
                .map_err(|e| failure("write", &e)),
            )
        }
        Command::Trim { fua } => done(
            observed(conn, &event(WriteKind::Trim, None, fua), nothing, || {
                backend.trim(offset, length)?;
                fua_flush(fua)
            })
            .map_err(|e| failure("trim", &e)),
        ),
        Command::WriteZeroes { fua, no_hole, fast } => {
            let how = Zeroing {
                may_trim: !no_hole,
                fast_only: fast,
            };
            let r = observed(conn, &event(WriteKind::Zeroes, None, fua), nothing, || {
                backend.write_zeroes(offset, length, how)?;
                fua_flush(fua)
            });
            done(r.map_err(|e| {
                if fast && e.kind() == io::ErrorKind::Unsupported {
                    (
                        Errno::NotSup,
                        "zeroing would not be faster than writing".into(),
                    )
                } else {
                    failure("write zeroes", &e)
                }
            }))
        }
        Command::Flush => done(flush(conn, before)),
        Command::BlockStatus { req_one } => block_status(conn, req, req_one),
        // Never handed to a handler; answering it would be harmless.
        Command::Disc => reply::simple(c, None),
    }
}

/// A FLUSH: once the writes done behind before it are made, the backend's flush, then the
/// observer's. A write done behind that failed fails the flush (its reply had gone).
fn flush(conn: &Conn, before: u64) -> Result<(), (Errno, String)> {
    let lost = conn.behind.wait_all(before);
    conn.export
        .backend
        .flush()
        .map_err(|e| failure("flush", &e))?;
    if let Some(o) = &conn.export.observer {
        o.flushed().map_err(|e| failure("flush (observer)", &e))?;
    }
    match lost {
        Some(why) => Err((Errno::Io, why)),
        None => Ok(()),
    }
}

/// Run a change of the export between the observer's two calls, timed into the export's
/// write latency histogram (a refused write too: the client waited for its answer).
/// `recorded` runs once the observer recorded the change, before it is made.
fn observed(
    conn: &Conn,
    ev: &WriteEvent<'_>,
    recorded: impl FnOnce(),
    op: impl FnOnce() -> io::Result<()>,
) -> io::Result<()> {
    let started = std::time::Instant::now();
    let r = match &conn.export.observer {
        None => {
            recorded();
            op()
        }
        Some(o) => o.before_write(ev).and_then(|()| {
            recorded();
            let r = op();
            o.after_write(ev, &r);
            r
        }),
    };
    conn.export.write_latency.record(started.elapsed());
    r
}

/// A READ: simple reply with the data, or structured chunks with holes as `OFFSET_HOLE`.
fn read(conn: &Conn, req: &Request, df: bool) -> Reply {
    let backend = &*conn.export.backend;
    let (c, offset, len) = (req.cookie, req.offset, req.length as usize);
    let mut buf = vec![0u8; len];
    if !conn.structured {
        return match backend.read_at(&mut buf, offset) {
            Ok(()) => reply::simple_read(c, buf),
            Err(e) => reply::simple(c, Some(Errno::from_io(&e))),
        };
    }
    if len == 0 {
        return reply::structured_done(c);
    }
    let runs = if df {
        // One content chunk: holes are sent as the zeroes they read as.
        vec![(len, false)]
    } else {
        match backend.allocation(offset, len as u64, MAX_EXTENTS) {
            Ok(runs) => read_runs(runs.iter().map(|r| (r.length, r.hole)), len),
            Err(e) => {
                tracing::debug!("NBD: allocation map failed, reading all: {e}");
                vec![(len, false)]
            }
        }
    };
    let mut at = 0usize;
    for &(n, hole) in &runs {
        if !hole {
            if let Err(e) = backend.read_at(&mut buf[at..at + n], offset + at as u64) {
                let (errno, msg) = failure("read", &e);
                return reply::structured_error(c, errno, &msg);
            }
        }
        at += n;
    }
    reply::structured_read(c, offset, buf, &runs)
}

/// Turn a backend's runs into runs that cover exactly `len` bytes: cut what goes past,
/// count what is missing as data, drop empty runs and merge neighbours of a kind.
pub(crate) fn read_runs(runs: impl Iterator<Item = (u64, bool)>, len: usize) -> Vec<(usize, bool)> {
    let mut out: Vec<(usize, bool)> = Vec::new();
    let mut covered = 0usize;
    let push = |n: usize, hole: bool, out: &mut Vec<(usize, bool)>| match out.last_mut() {
        Some(last) if last.1 == hole => last.0 += n,
        _ => out.push((n, hole)),
    };
    for (n, hole) in runs {
        let n = usize::try_from(n).unwrap_or(usize::MAX).min(len - covered);
        if n > 0 {
            push(n, hole, &mut out);
            covered += n;
        }
        if covered == len {
            break;
        }
    }
    if covered < len {
        push(len - covered, false, &mut out);
    }
    out
}

/// A BLOCK_STATUS: one chunk per selected context.
fn block_status(conn: &Conn, req: &Request, req_one: bool) -> Reply {
    let (c, offset, len) = (req.cookie, req.offset, req.length);
    let mut chunks = Vec::with_capacity(conn.contexts.len());
    for sel in &conn.contexts {
        let extents = match sel.kind {
            ContextKind::Allocation => conn
                .export
                .backend
                .allocation(offset, u64::from(len), MAX_EXTENTS)
                .map(|runs| {
                    runs.iter()
                        .map(|r| Extent {
                            length: u32::try_from(r.length).unwrap_or(u32::MAX),
                            flags: if r.hole { STATE_HOLE | STATE_ZERO } else { 0 },
                        })
                        .collect()
                }),
            ContextKind::Custom(i) => match conn.export.meta.get(i) {
                Some(m) => m.extents(offset, len, MAX_EXTENTS),
                None => Err(io::Error::other("metadata context vanished")),
            },
        };
        match extents {
            Ok(e) => match fit_extents(e, len, req_one) {
                Some(e) => chunks.push((sel.id, e)),
                None => {
                    return reply::structured_error(
                        c,
                        Errno::Io,
                        "metadata context gave no extents",
                    )
                }
            },
            Err(e) => {
                let (errno, msg) = failure("block status", &e);
                return reply::structured_error(c, errno, &msg);
            }
        }
    }
    reply::block_status(c, &chunks)
}

/// Make a context's answer valid for a request of `len` bytes: no zero-length extents,
/// nothing past the request (hence nothing past the export), neighbours with the same
/// flags merged, at most `MAX_EXTENTS` (one with REQ_ONE). `None` if nothing is left.
pub(crate) fn fit_extents(extents: Vec<Extent>, len: u32, req_one: bool) -> Option<Vec<Extent>> {
    let mut out: Vec<Extent> = Vec::new();
    let mut covered = 0u32;
    for e in extents {
        if covered == len {
            break;
        }
        let n = e.length.min(len - covered);
        if n == 0 {
            continue;
        }
        covered += n;
        match out.last_mut() {
            Some(last) if last.flags == e.flags => last.length += n,
            _ => out.push(Extent {
                length: n,
                flags: e.flags,
            }),
        }
    }
    out.truncate(if req_one { 1 } else { MAX_EXTENTS });
    if out.is_empty() {
        None
    } else {
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_runs_cover_exactly() {
        assert_eq!(read_runs([].into_iter(), 10), vec![(10, false)]);
        assert_eq!(
            read_runs(
                [(4, true), (0, false), (2, true), (100, false)].into_iter(),
                10
            ),
            vec![(6, true), (4, false)]
        );
        assert_eq!(
            read_runs([(3, false), (3, false)].into_iter(), 10),
            vec![(10, false)]
        );
        assert_eq!(
            read_runs([(u64::MAX, true)].into_iter(), 10),
            vec![(10, true)]
        );
    }

    #[test]
    fn extents_are_cut_merged_and_limited() {
        let e = |length, flags| Extent { length, flags };
        assert_eq!(fit_extents(vec![], 10, false), None);
        assert_eq!(fit_extents(vec![e(0, 1)], 10, false), None);
        assert_eq!(
            fit_extents(
                vec![e(4, 1), e(0, 0), e(4, 1), e(u32::MAX, 0), e(5, 1)],
                10,
                false
            ),
            Some(vec![e(8, 1), e(2, 0)])
        );
        assert_eq!(
            fit_extents(vec![e(4, 1), e(4, 0)], 10, true),
            Some(vec![e(4, 1)])
        );
        assert_eq!(fit_extents(vec![e(40, 1)], 10, true), Some(vec![e(10, 1)]));
        let many: Vec<_> = (0..MAX_EXTENTS as u32 + 10).map(|i| e(1, i % 2)).collect();
        assert_eq!(
            fit_extents(many, u32::MAX, false).map(|v| v.len()),
            Some(MAX_EXTENTS)
        );
    }
}
