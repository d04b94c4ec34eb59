//! Option haggling, one option at a time: [`handle_option`] takes an option's number and
//! payload (already read, and bounded by `MAX_OPTION_LEN`), updates the negotiation state,
//! appends the encoded replies to a buffer and says what happens next (another option,
//! transmission, or the end).
//!
//! No I/O here (that is `handshake.rs`), so unit tests and the fuzz target can drive it.
//! Options handled: EXPORT_NAME, ABORT, LIST, INFO, GO, STRUCTURED_REPLY,
//! LIST_META_CONTEXT, SET_META_CONTEXT; anything else (STARTTLS included: this server
//! runs in the protocol's NOTLS mode) gets `NBD_REP_ERR_UNSUP`.

use crate::export::Export;
use crate::wire::*;

/// A metadata context of an export, as a client can select it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextKind {
    /// `base:allocation`, answered from the backend's holes.
    Allocation,
    /// `Export::meta[i]`.
    Custom(usize),
}

/// A selected context: the id the client was given for it, and which it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Selected {
    pub id: u32,
    pub kind: ContextKind,
}

/// Negotiation state carried from option to option.
#[derive(Clone, Debug, Default)]
pub struct OptState {
    /// `NBD_FLAG_C_NO_ZEROES` was set by the client.
    pub no_zeroes: bool,
    pub structured: bool,
    /// The export (index) the last SET_META_CONTEXT named, and what it selected.
    pub meta: Option<(usize, Vec<Selected>)>,
}

/// What the transmission phase is entered with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// Index into the export list.
    pub export: usize,
    pub structured: bool,
    /// Empty unless SET_META_CONTEXT named this export last.
    pub contexts: Vec<Selected>,
    pub flags: u16,
}

/// What follows an option.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Next {
    /// Read the next option.
    Continue,
    /// The client aborted (and was answered): close.
    Abort,
    /// Enter transmission with this session.
    Go(Session),
    /// Close without entering transmission (EXPORT_NAME of an unknown export).
    Close(&'static str),
}

/// Append one option reply.
pub fn put_reply(out: &mut Vec<u8>, option: u32, kind: u32, data: &[u8]) {
    out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// The transmission flags of `export` for a connection that did (or did not) negotiate
/// structured replies.
pub fn transmission_flags(export: &Export, structured: bool) -> u16 {
    let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA;
    if export.read_only {
        f |= FLAG_READ_ONLY;
    } else {
        f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
    }
    if structured {
        f |= FLAG_SEND_DF;
    }
    // Safe only when a flush on one connection persists what every connection wrote: the
    // backend knows (FileBackend: one shared file, and fdatasync covers the inode).
    if export.backend.flush_covers_all_connections() {
        f |= FLAG_CAN_MULTI_CONN;
    }
    f
}

/// The export a client's name selects: the empty name is the first export.
pub fn find_export(exports: &[Export], name: &[u8]) -> Option<usize> {
    if name.is_empty() && !exports.is_empty() {
        return Some(0);
    }
    exports.iter().position(|e| e.name.as_bytes() == name)
}

/// Every context `export` offers, with the id SET_META_CONTEXT gives it.
fn contexts_of(export: &Export) -> Vec<(String, Selected)> {
    let mut all = vec![(
        BASE_ALLOCATION.to_string(),
        Selected {
            id: 1,
            kind: ContextKind::Allocation,
        },
    )];
    for (i, m) in export.meta.iter().enumerate() {
        all.push((
            m.name().to_string(),
            Selected {
                id: u32::try_from(i + 2).unwrap_or(u32::MAX),
                kind: ContextKind::Custom(i),
            },
        ));
    }
    all
}

/// A cursor over an option payload; every read is bounds-checked.
struct Cursor<'a> {
    data: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.data.len() {
            return None;
        }
        let (head, tail) = self.data.split_at(n);
        self.data = tail;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    /// A string with a 32-bit length before it, no longer than the protocol allows.
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > MAX_STRING {
            return None;
        }
        self.take(n)
    }
}

/// An INFO or GO payload: the export name and the information types asked for.
fn parse_info(data: &[u8]) -> Option<(&[u8], Vec<u16>)> {
    let mut c = Cursor { data };
    let name = c.string()?;
    let n = c.u16()?;
    if c.data.len() != 2 * usize::from(n) {
        return None;
    }
    let mut wanted = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        wanted.push(c.u16()?);
    }
    Some((name, wanted))
}

/// A LIST_META_CONTEXT or SET_META_CONTEXT payload: the export name and the queries.
/// `None` when it is malformed, or a query is not UTF-8 or has no namespace.
fn parse_meta(data: &[u8]) -> Option<(&[u8], Vec<&str>)> {
    let mut c = Cursor { data };
    let name = c.string()?;
    let n = c.u32()?;
    let mut queries = Vec::new();
    for _ in 0..n {
        let q = std::str::from_utf8(c.string()?).ok()?;
        if !q.contains(':') {
            return None;
        }
        queries.push(q);
    }
    if !c.data.is_empty() {
        return None;
    }
    Some((name, queries))
}

/// Handle one option: update `state`, append the replies to `out`, say what follows.
pub fn handle_option(
    state: &mut OptState,
    exports: &[Export],
    option: u32,
    data: &[u8],
    out: &mut Vec<u8>,
) -> Next {
    let invalid = |out: &mut Vec<u8>, why: &str| {
        put_reply(out, option, REP_ERR_INVALID, why.as_bytes());
        Next::Continue
    };
    match option {
        OPT_EXPORT_NAME => {
            let Some(i) = find_export(exports, data) else {
                return Next::Close("NBD_OPT_EXPORT_NAME of an unknown export");
            };
            let e = &exports[i];
            let flags = transmission_flags(e, state.structured);
            out.extend_from_slice(&e.backend.size().to_be_bytes());
            out.extend_from_slice(&flags.to_be_bytes());
            if !state.no_zeroes {
                out.extend_from_slice(&[0u8; 124]);
            }
            Next::Go(session(state, i, flags))
        }
        OPT_ABORT => {
            put_reply(out, option, REP_ACK, &[]);
            Next::Abort
        }
        OPT_LIST => {
            if !data.is_empty() {
                return invalid(out, "NBD_OPT_LIST takes no data");
            }
            for e in exports {
                let mut d = Vec::with_capacity(4 + e.name.len() + e.description.len());
                d.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                d.extend_from_slice(e.name.as_bytes());
                d.extend_from_slice(e.description.as_bytes());
                put_reply(out, option, REP_SERVER, &d);
            }
            put_reply(out, option, REP_ACK, &[]);
            Next::Continue
        }
        OPT_INFO | OPT_GO => {
            let Some((name, wanted)) = parse_info(data) else {
                return invalid(out, "malformed NBD_OPT_INFO/NBD_OPT_GO");
            };
            let Some(i) = find_export(exports, name) else {
                let msg = format!("no export named {:?}", String::from_utf8_lossy(name));
                put_reply(out, option, REP_ERR_UNKNOWN, msg.as_bytes());
                return Next::Continue;
            };
            let e = &exports[i];
            let flags = transmission_flags(e, state.structured);
            let mut info = Vec::with_capacity(12);
            info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
            info.extend_from_slice(&e.backend.size().to_be_bytes());
            info.extend_from_slice(&flags.to_be_bytes());
            put_reply(out, option, REP_INFO, &info);
            for kind in wanted {
                let mut d = kind.to_be_bytes().to_vec();
                match kind {
                    INFO_NAME => d.extend_from_slice(e.name.as_bytes()),
                    INFO_DESCRIPTION if !e.description.is_empty() => {
                        d.extend_from_slice(e.description.as_bytes())
                    }
                    INFO_BLOCK_SIZE => {
                        d.extend_from_slice(&1u32.to_be_bytes());
                        d.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                        d.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
                    }
                    _ => continue,
                }
                put_reply(out, option, REP_INFO, &d);
            }
            put_reply(out, option, REP_ACK, &[]);
            if option == OPT_GO {
                Next::Go(session(state, i, flags))
            } else {
                Next::Continue
            }
        }
        OPT_STRUCTURED_REPLY => {
            if !data.is_empty() {
                return invalid(out, "NBD_OPT_STRUCTURED_REPLY takes no data");
            }
            state.structured = true;
            put_reply(out, option, REP_ACK, &[]);
            Next::Continue
        }
        OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
            let set = option == OPT_SET_META_CONTEXT;
            if set {
                // Replaced even when this option fails.
                state.meta = None;
            }
            if !state.structured {
                return invalid(out, "metadata contexts need structured replies first");
            }
            let Some((name, queries)) = parse_meta(data) else {
                return invalid(out, "malformed metadata context option");
            };
            let Some(i) = find_export(exports, name) else {
                let msg = format!("no export named {:?}", String::from_utf8_lossy(name));
                put_reply(out, option, REP_ERR_UNKNOWN, msg.as_bytes());
                return Next::Continue;
            };
            let mut chosen: Vec<(String, Selected)> = Vec::new();
            for (ctx_name, sel) in contexts_of(&exports[i]) {
                let matches = if set {
                    queries.contains(&ctx_name.as_str())
                } else {
                    queries.is_empty()
                        || queries.iter().any(|q| {
                            *q == ctx_name || (q.ends_with(':') && ctx_name.starts_with(q))
                        })
                };
                if matches {
                    chosen.push((ctx_name, sel));
                }
            }
            for (ctx_name, sel) in &chosen {
                let id = if set { sel.id } else { 0 };
                let mut d = id.to_be_bytes().to_vec();
                d.extend_from_slice(ctx_name.as_bytes());
                put_reply(out, option, REP_META_CONTEXT, &d);
            }
            put_reply(out, option, REP_ACK, &[]);
            if set {
                state.meta = Some((i, chosen.into_iter().map(|(_, s)| s).collect()));
            }
            Next::Continue
        }
        _ => {
            put_reply(out, option, REP_ERR_UNSUP, b"option not supported");
            Next::Continue
        }
    }
}

fn session(state: &OptState, export: usize, flags: u16) -> Session {
    let contexts = match &state.meta {
        Some((i, sel)) if *i == export => sel.clone(),
        _ => Vec::new(),
    };
    Session {
        export,
        structured: state.structured,
        contexts,
        flags,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::export::{Extent, MetaContext};
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

    fn exports() -> Vec<Export> {
        let mut a = Export::new("a", Arc::new(Null(4096)));
        a.description = "first".into();
        a.meta.push(Arc::new(Dirty));
        vec![a, Export::new("b", Arc::new(Null(8192)))]
    }

    /// The replies in `out`: (option, type, data).
    fn replies(mut out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        while !out.is_empty() {
            assert_eq!(&out[..8], &OPT_REPLY_MAGIC.to_be_bytes());
            let w =
                |at: usize| u32::from_be_bytes([out[at], out[at + 1], out[at + 2], out[at + 3]]);
            let (opt, kind, len) = (w(8), w(12), w(16) as usize);
            v.push((opt, kind, out[20..20 + len].to_vec()));
            out = &out[20 + len..];
        }
        v
    }

    fn info_payload(name: &str, wanted: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(wanted.len() as u16).to_be_bytes());
        for w in wanted {
            d.extend_from_slice(&w.to_be_bytes());
        }
        d
    }

    fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            d.extend_from_slice(&(q.len() as u32).to_be_bytes());
            d.extend_from_slice(q.as_bytes());
        }
        d
    }

    #[test]
    fn unknown_options_are_unsupported_and_haggling_goes_on() {
        let (ex, mut st, mut out) = (exports(), OptState::default(), Vec::new());
        for opt in [OPT_STARTTLS, 4, 11, 0, u32::MAX] {
            out.clear();
            assert_eq!(
                handle_option(&mut st, &ex, opt, b"junk", &mut out),
                Next::Continue
            );
            assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);
        }
    }

    #[test]
    fn list_info_and_go() {
        let (ex, mut st, mut out) = (exports(), OptState::default(), Vec::new());
        assert_eq!(
            handle_option(&mut st, &ex, OPT_LIST, &[], &mut out),
            Next::Continue
        );
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        assert_eq!(r[0].2, b"\0\0\0\x01afirst");
        assert_eq!(r[2].1, REP_ACK);

        out.clear();
        let p = info_payload("nope", &[]);
        assert_eq!(
            handle_option(&mut st, &ex, OPT_GO, &p, &mut out),
            Next::Continue
        );
        assert_eq!(replies(&out)[0].1, REP_ERR_UNKNOWN);

        out.clear();
        let p = info_payload("b", &[INFO_BLOCK_SIZE, INFO_NAME, INFO_DESCRIPTION, 77]);
        assert_eq!(
            handle_option(&mut st, &ex, OPT_INFO, &p, &mut out),
            Next::Continue
        );
        let r = replies(&out);
        // EXPORT, BLOCK_SIZE, NAME (no description: "b" has none; 77 unknown), ACK.
        assert_eq!(r.len(), 4);
        assert_eq!(&r[0].2[..2], &INFO_EXPORT.to_be_bytes());
        assert_eq!(&r[0].2[2..10], &8192u64.to_be_bytes());
        assert_eq!(r[1].2.len(), 14);
        assert_eq!(&r[2].2[2..], b"b");
        assert_eq!(r[3].1, REP_ACK);

        out.clear();
        let p = info_payload("", &[]);
        match handle_option(&mut st, &ex, OPT_GO, &p, &mut out) {
            Next::Go(s) => {
                assert_eq!(s.export, 0);
                assert!(!s.structured && s.contexts.is_empty());
                assert_ne!(s.flags & FLAG_HAS_FLAGS, 0);
                assert_eq!(s.flags & FLAG_SEND_DF, 0);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn malformed_payloads_are_invalid() {
        let (ex, mut st, mut out) = (exports(), OptState::default(), Vec::new());
        let mut p = info_payload("a", &[INFO_NAME]);
        p.push(0);
        let bad: [(u32, &[u8]); 6] = [
            (OPT_GO, &[0, 0, 0, 9, b'a']),
            (OPT_INFO, &p),
            (OPT_INFO, &[0xff, 0xff, 0xff, 0xff, 0, 0]),
            (OPT_LIST, b"x"),
            (OPT_STRUCTURED_REPLY, b"x"),
            (OPT_GO, &[]),
        ];
        for (opt, data) in bad {
            out.clear();
            assert_eq!(
                handle_option(&mut st, &ex, opt, data, &mut out),
                Next::Continue
            );
            assert_eq!(replies(&out)[0].1, REP_ERR_INVALID, "option {opt}");
        }
        assert!(!st.structured);
    }

    #[test]
    fn meta_contexts() {
        let (ex, mut st, mut out) = (exports(), OptState::default(), Vec::new());
        let p = meta_payload("a", &["base:allocation"]);
        handle_option(&mut st, &ex, OPT_SET_META_CONTEXT, &p, &mut out);
        assert_eq!(
            replies(&out)[0].1,
            REP_ERR_INVALID,
            "needs structured replies"
        );

        out.clear();
        handle_option(&mut st, &ex, OPT_STRUCTURED_REPLY, &[], &mut out);
        out.clear();
        handle_option(
            &mut st,
            &ex,
            OPT_LIST_META_CONTEXT,
            &meta_payload("a", &[]),
            &mut out,
        );
        let names: Vec<_> = replies(&out).into_iter().map(|r| r.2).collect();
        assert_eq!(names[0], b"\0\0\0\0base:allocation");
        assert_eq!(names[1], b"\0\0\0\0cutover:dirty");
        assert_eq!(names.len(), 3);

        out.clear();
        let p = meta_payload("a", &["cutover:", "x-other:thing"]);
        handle_option(&mut st, &ex, OPT_LIST_META_CONTEXT, &p, &mut out);
        let r = replies(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].2, b"\0\0\0\0cutover:dirty");

        out.clear();
        let p = meta_payload("a", &["cutover:dirty", "base:", "base:nothing"]);
        handle_option(&mut st, &ex, OPT_SET_META_CONTEXT, &p, &mut out);
        let r = replies(&out);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].1, REP_META_CONTEXT);
        assert_eq!(&r[0].2[4..], b"cutover:dirty");

        // GO to another export: nothing selected there.
        out.clear();
        match handle_option(&mut st, &ex, OPT_GO, &info_payload("b", &[]), &mut out) {
            Next::Go(s) => {
                assert!(s.structured && s.contexts.is_empty());
                assert_ne!(s.flags & FLAG_SEND_DF, 0);
            }
            other => panic!("{other:?}"),
        }
        match handle_option(&mut st, &ex, OPT_GO, &info_payload("a", &[]), &mut out) {
            Next::Go(s) => assert_eq!(
                s.contexts,
                vec![Selected {
                    id: 2,
                    kind: ContextKind::Custom(0)
                }]
            ),
            other => panic!("{other:?}"),
        }

        // A query without a namespace is invalid, and clears the selection.
        out.clear();
        let p = meta_payload("a", &["nocolon"]);
        handle_option(&mut st, &ex, OPT_SET_META_CONTEXT, &p, &mut out);
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
        assert!(st.meta.is_none());
    }

    #[test]
    fn export_name_and_abort() {
        let (ex, mut st, mut out) = (exports(), OptState::default(), Vec::new());
        assert!(matches!(
            handle_option(&mut st, &ex, OPT_EXPORT_NAME, b"zz", &mut out),
            Next::Close(_)
        ));
        assert!(out.is_empty());
        assert!(matches!(
            handle_option(&mut st, &ex, OPT_EXPORT_NAME, b"b", &mut out),
            Next::Go(_)
        ));
        assert_eq!(out.len(), 8 + 2 + 124);
        st.no_zeroes = true;
        out.clear();
        handle_option(&mut st, &ex, OPT_EXPORT_NAME, b"b", &mut out);
        assert_eq!(out.len(), 10);
        out.clear();
        assert_eq!(
            handle_option(&mut st, &ex, OPT_ABORT, b"ignored", &mut out),
            Next::Abort
        );
        assert_eq!(replies(&out)[0].1, REP_ACK);
    }
}
