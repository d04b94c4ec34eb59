//! The server driven byte by byte over an in-memory pipe (`serve_connection` on a tokio
//! duplex stream): what no real client will send on purpose. Unknown options, overlong
//! options, replies out of order, refused writes whose payload is skipped, writes too long
//! to skip (the connection closes), bad magic, block status without negotiation, the
//! in-flight and byte bounds, and the handshake timeout.

use crate::common::*;
use nbd::request::{encode_header, RawRequest};
use nbd::wire::*;
use nbd::{Backend, Config, Export, Server};
use std::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

/// A raw client: the client end of a duplex pipe whose other end a server serves.
pub struct Raw {
    pub io: DuplexStream,
    pub server: tokio::task::JoinHandle<Result<(), nbd::Error>>,
}

impl Raw {
    pub fn start(server: Server) -> Raw {
        let (client, conn) = tokio::io::duplex(1 << 20);
        let server = tokio::spawn(async move { server.serve_connection(conn).await });
        Raw { io: client, server }
    }

    pub async fn greeting(&mut self, client_flags: u32) {
        let mut g = [0u8; 18];
        self.io.read_exact(&mut g).await.unwrap();
        assert_eq!(&g[..8], &INIT_PASSWD.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        self.io
            .write_all(&client_flags.to_be_bytes())
            .await
            .unwrap();
    }

    pub async fn option(&mut self, option: u32, data: &[u8]) {
        let mut b = IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.io.write_all(&b).await.unwrap();
    }

    /// One option reply: (option, type, data).
    pub async fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.io.read_exact(&mut h).await.unwrap();
        assert_eq!(&h[..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let w = |at: usize| u32::from_be_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let mut data = vec![0u8; w(16) as usize];
        self.io.read_exact(&mut data).await.unwrap();
        (w(8), w(12), data)
    }

    /// Replies up to and including the final one (ACK or an error).
    pub async fn opt_replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply().await;
            let last = r.1 == REP_ACK || r.1 & (1 << 31) != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// NBD_OPT_GO to `name`, optionally after STRUCTURED_REPLY and SET_META_CONTEXT.
    pub async fn go(&mut self, name: &str, structured: bool, contexts: &[&str]) {
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]).await;
            assert_eq!(self.opt_replies().await[0].1, REP_ACK);
        }
        if !contexts.is_empty() {
            let mut d = (name.len() as u32).to_be_bytes().to_vec();
            d.extend_from_slice(name.as_bytes());
            d.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for c in contexts {
                d.extend_from_slice(&(c.len() as u32).to_be_bytes());
                d.extend_from_slice(c.as_bytes());
            }
            self.option(OPT_SET_META_CONTEXT, &d).await;
            let r = self.opt_replies().await;
            assert_eq!(r.len(), contexts.len() + 1, "{r:?}");
        }
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.option(OPT_GO, &d).await;
        let r = self.opt_replies().await;
        assert_eq!(r.last().unwrap().1, REP_ACK, "{r:?}");
    }

    pub async fn request(&mut self, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let h = encode_header(&RawRequest {
            flags,
            kind,
            cookie,
            offset,
            length,
        });
        self.io.write_all(&h).await.unwrap();
    }

    /// A simple reply: (error, cookie), `data_len` data bytes read after it on success.
    pub async fn simple_reply(&mut self, data_len: usize) -> (u32, u64, Vec<u8>) {
        let mut h = [0u8; 16];
        self.io.read_exact(&mut h).await.unwrap();
        assert_eq!(&h[..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        let error = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let mut data = vec![0u8; if error == 0 { data_len } else { 0 }];
        self.io.read_exact(&mut data).await.unwrap();
        (error, cookie, data)
    }

    /// One structured chunk: (flags, type, cookie, payload).
    pub async fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut h = [0u8; 20];
        self.io.read_exact(&mut h).await.unwrap();
        assert_eq!(&h[..4], &STRUCTURED_REPLY_MAGIC.to_be_bytes());
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let kind = u16::from_be_bytes([h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]);
        let mut data = vec![0u8; len as usize];
        self.io.read_exact(&mut data).await.unwrap();
        (flags, kind, cookie, data)
    }

    /// Whether the server closed its end (EOF within a second).
    pub async fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), self.io.read(&mut b)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// Wait (up to 20 s, for loaded machines) until `cond` holds.
async fn wait_for(cond: impl Fn() -> bool) {
    for _ in 0..2000 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("condition not reached in 20 s");
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn mem_server(size: u64) -> (Server, Arc<MemBackend>) {
    let mem = Arc::new(MemBackend::new(size));
    (Server::new(vec![Export::new("m", mem.clone())]), mem)
}

#[test]
fn unknown_and_overlong_options_are_answered_and_haggling_goes_on() {
    rt().block_on(async {
        let (server, _) = mem_server(1 << 20);
        let mut c = Raw::start(server);
        c.greeting(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        c.option(0xdead, b"whatever").await;
        assert_eq!(c.opt_replies().await[0].1, REP_ERR_UNSUP);
        c.option(OPT_STARTTLS, &[]).await;
        assert_eq!(c.opt_replies().await[0].1, REP_ERR_UNSUP);
        // Longer than the in-memory limit: read, dropped, refused.
        c.option(OPT_LIST, &vec![0u8; (MAX_OPTION_LEN + 1) as usize])
            .await;
        assert_eq!(c.opt_replies().await[0].1, REP_ERR_TOO_BIG);
        c.option(OPT_LIST, &[]).await;
        let r = c.opt_replies().await;
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].2, b"\0\0\0\x01m");
        // EXPORT_NAME with NO_ZEROES: size and flags, nothing more, then transmission.
        c.option(OPT_EXPORT_NAME, b"m").await;
        let mut info = [0u8; 10];
        c.io.read_exact(&mut info).await.unwrap();
        assert_eq!(&info[..8], &(1u64 << 20).to_be_bytes());
        c.request(CMD_READ, 0, 1, 0, 16).await;
        assert_eq!(c.simple_reply(16).await, (0, 1, vec![0; 16]));
        c.request(CMD_DISC, 0, 2, 0, 0).await;
        assert!(c.closed().await);
        c.server.await.unwrap().unwrap();
    });
}

#[test]
fn handshake_violations_close_the_connection() {
    rt().block_on(async {
        // Unknown client flags.
        let mut c = Raw::start(mem_server(4096).0);
        c.greeting(1 << 7).await;
        assert!(c.closed().await);
        assert!(matches!(
            c.server.await.unwrap(),
            Err(nbd::Error::ClientFlags(_))
        ));
        // Bad option magic.
        let mut c = Raw::start(mem_server(4096).0);
        c.greeting(FLAG_C_FIXED_NEWSTYLE).await;
        c.io.write_all(&[0u8; 16]).await.unwrap();
        assert!(c.closed().await);
        assert!(matches!(
            c.server.await.unwrap(),
            Err(nbd::Error::BadMagic(..))
        ));
        // Option too long to skip: closed without reading 4 GiB.
        let mut c = Raw::start(mem_server(4096).0);
        c.greeting(FLAG_C_FIXED_NEWSTYLE).await;
        let mut h = IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&OPT_GO.to_be_bytes());
        h.extend_from_slice(&u32::MAX.to_be_bytes());
        c.io.write_all(&h).await.unwrap();
        assert!(c.closed().await);
        // EXPORT_NAME of an unknown export.
        let mut c = Raw::start(mem_server(4096).0);
        c.greeting(FLAG_C_FIXED_NEWSTYLE).await;
        c.option(OPT_EXPORT_NAME, b"nope").await;
        assert!(c.closed().await);
    });
}

#[test]
fn transmission_errors_and_the_payload_rules() {
    rt().block_on(async {
        let (server, mem) = mem_server(1 << 20);
        let mut c = Raw::start(server);
        c.greeting(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        c.go("m", false, &[]).await;

        // A write past the end: its payload is skipped and the next request is read.
        c.request(CMD_WRITE, 0, 10, (1 << 20) - 8, 16).await;
        c.io.write_all(&[0xee; 16]).await.unwrap();
        assert_eq!(c.simple_reply(0).await, (Errno::NoSpc as u32, 10, vec![]));
        // Unknown flag on a write: same.
        c.request(CMD_WRITE, 1 << 9, 11, 0, 4).await;
        c.io.write_all(&[0xee; 4]).await.unwrap();
        assert_eq!(c.simple_reply(0).await.0, Errno::Inval as u32);
        // Block status without structured replies.
        c.request(CMD_BLOCK_STATUS, 0, 12, 0, 512).await;
        assert_eq!(c.simple_reply(0).await.0, Errno::Inval as u32);
        // Unknown command, oversize read, cache (not advertised).
        c.request(42, 0, 13, 0, 1).await;
        assert_eq!(c.simple_reply(0).await.0, Errno::Inval as u32);
        c.request(CMD_READ, 0, 14, 0, MAX_PAYLOAD + 1).await;
        assert_eq!(c.simple_reply(0).await.0, Errno::Inval as u32);
        c.request(CMD_CACHE, 0, 15, 0, 1).await;
        assert_eq!(c.simple_reply(0).await.0, Errno::Inval as u32);
        // Still in step: a good write and read.
        c.request(CMD_WRITE, CMD_FLAG_FUA, 16, 100, 4).await;
        c.io.write_all(b"abcd").await.unwrap();
        assert_eq!(c.simple_reply(0).await, (0, 16, vec![]));
        c.request(CMD_READ, 0, 17, 98, 8).await;
        assert_eq!(c.simple_reply(8).await.2, b"\0\0abcd\0\0");

        // A write longer than the maximum payload cannot be skipped: the server closes.
        c.request(CMD_WRITE, 0, 18, 0, MAX_PAYLOAD + 1).await;
        assert!(c.closed().await);
        assert!(matches!(
            c.server.await.unwrap(),
            Err(nbd::Error::Protocol(_))
        ));
        assert!(mem.violations.lock().unwrap().is_empty());
        assert!(mem.guard_intact());
    });
}

#[test]
fn bad_request_magic_closes_after_replies_in_flight() {
    rt().block_on(async {
        let (server, _) = mem_server(1 << 20);
        let mut c = Raw::start(server);
        c.greeting(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        c.go("m", true, &[]).await;
        c.request(CMD_FLUSH, 0, 1, 0, 0).await;
        c.io.write_all(&[0x77; 28]).await.unwrap();
        let (flags, kind, cookie, _) = c.chunk_or_simple().await;
        assert_eq!((flags, kind, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1));
        assert!(c.closed().await);
        assert!(matches!(
            c.server.await.unwrap(),
            Err(nbd::Error::BadMagic(..))
        ));
    });
}

/// Reads block until released; writes go through. Lets a test hold one request while
/// later ones complete.
struct Gate {
    inner: MemBackend,
    open: Mutex<bool>,
    cv: Condvar,
    blocked: Mutex<u32>,
}

impl Gate {
    fn release(&self) {
        *self.open.lock().unwrap() = true;
        self.cv.notify_all();
    }
}

impl Backend for Gate {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        *self.blocked.lock().unwrap() += 1;
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.cv.wait(open).unwrap();
        }
        drop(open);
        self.inner.read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn replies_come_out_of_order_and_in_flight_is_bounded() {
    rt().block_on(async {
        let gate = Arc::new(Gate {
            inner: MemBackend::new(1 << 20),
            open: Mutex::new(false),
            cv: Condvar::new(),
            blocked: Mutex::new(0),
        });
        let server = Server::new(vec![Export::new("g", gate.clone())]).with_config(Config {
            max_in_flight: 4,
            ..Config::default()
        });
        let mut c = Raw::start(server);
        c.greeting(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        c.go("g", false, &[]).await;

        // Two reads block in the backend; a write sent after them is answered first.
        c.request(CMD_READ, 0, 1, 0, 8).await;
        c.request(CMD_READ, 0, 2, 8, 8).await;
        c.request(CMD_WRITE, 0, 3, 512, 4).await;
        c.io.write_all(b"wxyz").await.unwrap();
        assert_eq!(c.simple_reply(0).await, (0, 3, vec![]));
        // Two more requests fill the four slots; a fifth is not even read.
        c.request(CMD_READ, 0, 4, 16, 8).await;
        c.request(CMD_READ, 0, 5, 24, 8).await;
        c.request(CMD_FLUSH, 0, 6, 0, 0).await;
        wait_for(|| *gate.blocked.lock().unwrap() == 4).await;
        let mut b = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(300), c.io.read(&mut b))
                .await
                .is_err(),
            "the flush was served with every slot taken"
        );
        gate.release();
        let mut cookies = Vec::new();
        for _ in 0..5 {
            let (err, cookie, _) = c.simple_reply(0).await;
            assert_eq!(err, 0);
            cookies.push(cookie);
            if cookie != 6 {
                let mut data = [0u8; 8];
                c.io.read_exact(&mut data).await.unwrap();
            }
        }
        cookies.sort();
        assert_eq!(cookies, vec![1, 2, 4, 5, 6]);
        c.request(CMD_DISC, 0, 7, 0, 0).await;
        assert!(c.closed().await);
    });
}

#[test]
fn block_status_of_a_custom_context_over_the_wire() {
    rt().block_on(async {
        let mem = Arc::new(MemBackend::new(1 << 20));
        let dirty = DirtyMap::new(mem.clone());
        let mut e = Export::new("d", mem.clone());
        e.meta.push(dirty.clone());
        e.observer = Some(dirty.clone());
        let mut c = Raw::start(Server::new(vec![e]));
        c.greeting(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        c.go("d", true, &["cutover:dirty", "base:allocation"]).await;

        c.request(CMD_WRITE_ZEROES, 0, 1, BLOCK, 10).await;
        let (flags, _, cookie, _) = c.chunk_or_simple().await;
        assert_eq!((flags, cookie), (REPLY_FLAG_DONE, 1));
        c.request(CMD_BLOCK_STATUS, 0, 2, 0, 4 * BLOCK as u32).await;
        let mut got = Vec::new();
        loop {
            let (flags, kind, cookie, data) = c.chunk().await;
            assert_eq!((kind, cookie), (REPLY_TYPE_BLOCK_STATUS, 2));
            let id = u32::from_be_bytes(data[..4].try_into().unwrap());
            let ext: Vec<u32> = data[4..]
                .chunks(4)
                .map(|w| u32::from_be_bytes(w.try_into().unwrap()))
                .collect();
            got.push((id, ext));
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        got.sort();
        let b = BLOCK as u32;
        assert_eq!(
            got,
            vec![(1, vec![4 * b, 0]), (2, vec![b, 0, b, 1, 2 * b, 0]),]
        );
    });
}

impl Raw {
    /// A reply to a non-read command, simple or structured, as (flags, type, cookie, data):
    /// a simple success reads as a DONE chunk of type NONE.
    pub async fn chunk_or_simple(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let mut m = [0u8; 4];
        self.io.read_exact(&mut m).await.unwrap();
        let mut rest = vec![
            0u8;
            if m == SIMPLE_REPLY_MAGIC.to_be_bytes() {
                12
            } else {
                16
            }
        ];
        self.io.read_exact(&mut rest).await.unwrap();
        if m == SIMPLE_REPLY_MAGIC.to_be_bytes() {
            let err = u32::from_be_bytes(rest[..4].try_into().unwrap());
            assert_eq!(err, 0);
            let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
            return (REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, Vec::new());
        }
        let flags = u16::from_be_bytes([rest[0], rest[1]]);
        let kind = u16::from_be_bytes([rest[2], rest[3]]);
        let cookie = u64::from_be_bytes(rest[4..12].try_into().unwrap());
        let len = u32::from_be_bytes(rest[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        self.io.read_exact(&mut data).await.unwrap();
        (flags, kind, cookie, data)
    }
}

#[test]
fn the_byte_budget_holds_back_big_requests() {
    rt().block_on(async {
        const MIB: u32 = 1 << 20;
        let gate = Arc::new(Gate {
            inner: MemBackend::new(48 << 20),
            open: Mutex::new(false),
            cv: Condvar::new(),
            blocked: Mutex::new(0),
        });
        // A budget below the maximum payload is raised to it: 32 MiB here.
        let server = Server::new(vec![Export::new("g", gate.clone())]).with_config(Config {
            max_in_flight_bytes: 1,
            ..Config::default()
        });
        let mut c = Raw::start(server);
        c.greeting(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).await;
        c.go("g", false, &[]).await;

        // 20 MiB fits; a second 20 MiB read waits for its bytes before reaching the
        // backend, and a flush behind it waits too (requests are read in order).
        c.request(CMD_READ, 0, 1, 0, 20 * MIB).await;
        c.request(CMD_READ, 0, 2, (20 * MIB).into(), 20 * MIB).await;
        c.request(CMD_FLUSH, 0, 3, 0, 0).await;
        wait_for(|| *gate.blocked.lock().unwrap() >= 1).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            *gate.blocked.lock().unwrap(),
            1,
            "the second read got its bytes"
        );
        gate.release();
        let mut cookies = Vec::new();
        for _ in 0..3 {
            let mut h = [0u8; 16];
            c.io.read_exact(&mut h).await.unwrap();
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            if cookie != 3 {
                let mut data = vec![0u8; 20 * MIB as usize];
                c.io.read_exact(&mut data).await.unwrap();
            }
            cookies.push(cookie);
        }
        // Nothing behind the first read started before its reply was written.
        assert_eq!(cookies[0], 1);
        cookies.sort();
        assert_eq!(cookies, vec![1, 2, 3]);
        assert_eq!(*gate.blocked.lock().unwrap(), 2);
    });
}

#[test]
fn a_silent_client_is_dropped_after_the_handshake_timeout() {
    rt().block_on(async {
        let (server, _) = mem_server(4096);
        let server = server.with_config(Config {
            handshake_timeout: Duration::from_millis(200),
            ..Config::default()
        });
        let mut c = Raw::start(server);
        c.greeting(FLAG_C_FIXED_NEWSTYLE).await;
        assert!(c.closed().await);
        assert!(matches!(
            c.server.await.unwrap(),
            Err(nbd::Error::HandshakeTimeout(_))
        ));
    });
}
