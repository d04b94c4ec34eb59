//! Lying and broken peers (issue 4, item 6), in both directions, speaking the real frames:
//! a data block that does not match the digest its `FileEnd` claims, a `FileEnd` whose size
//! is not what the frames delivered, a copy from beyond the basis, a small file whose digest
//! is wrong, and a peer that hangs up in the middle of a frame.
//!
//! Push: a hand-made client (real TLS handshake and token proof, frames written by this test)
//! lies to a real daemon whose module holds good files. Pull: a fake daemon on a loopback
//! listener (plaintext, which the real client speaks with `--insecure-plaintext`) lies to the
//! real `cutover` binary. Either way the good file must keep its old bytes, nothing may stand
//! at its name but the old file, the lie must be reported as a failure of that file (a pull
//! that swallowed it would exit 0 over a file it never got), and the next honest sync must
//! finish exact.

use crate::hostile::{await_fds_at_most, drain, file, open_fds, open_push, FD_SLACK};
use crate::util::*;
use proto::{
    CopyOp, EntryKind, FileResult, FrameReader, Hello, Msg, Need, SmallFile, SyncOptions, Welcome,
    WireCounter,
};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

const LEAF: usize = chunk::hash::LEAF;
/// How long the lying side waits for one answer of its honest peer.
const ANSWER: Duration = Duration::from_secs(20);

/// One way of lying (or breaking down) while sending one file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lie {
    /// The data frames carry the new content; `FileEnd`'s digest is of other bytes.
    WrongDigest,
    /// One data block has a flipped byte; `FileEnd`'s digest is of the true content.
    FlippedBlock,
    /// `FileEnd` claims a leaf more than the frames delivered, with the digest of the content
    /// plus that many zeros: the digest alone would pass (unwritten ranges read as zeros).
    SizeLarger,
    /// `FileEnd` claims fewer bytes than the frames delivered, with the whole content's digest.
    SizeSmaller,
    /// A copy frame that reads beyond the end of the receiver's basis.
    CopyPastBasis,
    /// A small file sent whole whose digest does not match its bytes.
    SmallWrongDigest,
    /// Hangs up in the middle of a data frame (the control connection stays open until then).
    CutMidFrame,
}

const LIES: [Lie; 7] = [
    Lie::WrongDigest,
    Lie::FlippedBlock,
    Lie::SizeLarger,
    Lie::SizeSmaller,
    Lie::CopyPastBasis,
    Lie::SmallWrongDigest,
    Lie::CutMidFrame,
];

impl Lie {
    fn name(self) -> String {
        format!("{self:?}.bin").to_lowercase()
    }

    fn small(self) -> bool {
        self == Lie::SmallWrongDigest
    }

    /// The good file the receiver has (and must keep), and the content the liar claims.
    fn contents(self, seed: u64) -> (Vec<u8>, Vec<u8>) {
        if self.small() {
            (random_bytes(seed, 5000), random_bytes(seed + 1, 3000))
        } else {
            (
                random_bytes(seed, 2 * LEAF + 123),
                random_bytes(seed + 1, 3 * LEAF + 77),
            )
        }
    }
}

/// The whole-file digest the receiver checks (1 MiB leaves).
fn digest(data: &[u8]) -> [u8; 32] {
    crate::hostile::small_digest(data)
}

fn frame(msg: &Msg) -> Vec<u8> {
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    proto::frame::encode_frame(msg, false, &mut None, &mut plain, &mut out)
        .expect("encode a test frame");
    out
}

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

/// The lying side of a session: it plays the sender on a control and one data connection.
struct Liar {
    control: FrameReader<Reader>,
    control_w: Writer,
    data_w: Writer,
}

impl Liar {
    async fn send(&mut self, msg: &Msg) {
        self.control_w
            .write_all(&frame(msg))
            .await
            .expect("send on the control connection");
    }

    async fn send_data(&mut self, msg: &Msg) {
        self.data_w
            .write_all(&frame(msg))
            .await
            .expect("send on the data connection");
    }

    /// The next control message that says something (keepalives, progress and signatures,
    /// which a liar ignores, are skipped); `None` once the peer hung up.
    async fn next(&mut self) -> Option<Msg> {
        loop {
            let got = tokio::time::timeout(ANSWER, self.control.recv::<Msg>())
                .await
                .expect("the honest side did not answer within 20 s");
            match got {
                Ok(Some(Msg::KeepAlive | Msg::Progress { .. } | Msg::Signature { .. })) => {}
                Ok(Some(m)) => return Some(m),
                Ok(None) | Err(_) => return None,
            }
        }
    }

    /// Tell one lie about one file (id 0) and return what the receiver answered
    /// (`None` for a hang-up, which gets no answer).
    async fn lie(mut self, lie: Lie, new: &[u8]) -> Option<FileResult> {
        let mut entry = file(&lie.name(), EntryKind::File, new.len() as u64);
        // Not the good file's mtime, so the receiver does not skip it as unchanged.
        entry.mtime_sec = 1_000_000;
        self.send(&Msg::FileList {
            batch: 0,
            first_id: 0,
            entries: vec![entry],
            rescan: false,
            implied: Vec::new(),
        })
        .await;
        // Frames for a file the receiver has not listed yet are dropped: wait for its needs.
        match self.next().await {
            Some(Msg::Needs { needs, .. }) => {
                assert!(
                    matches!(
                        needs[..],
                        [Need::Full | Need::Chunks | Need::Positional | Need::Verify { .. }]
                    ),
                    "{lie:?}: the receiver needs {needs:?}"
                );
            }
            other => panic!("{lie:?}: expected needs, got {other:?}"),
        }
        let blocks: Vec<Msg> = new
            .chunks(LEAF)
            .enumerate()
            .map(|(i, b)| Msg::Data {
                id: 0,
                offset: (i * LEAF) as u64,
                data: b.to_vec(),
            })
            .collect();
        let frames = blocks.len() as u64;
        let size = new.len() as u64;
        let end = |size, frames, digest| Msg::FileEnd {
            id: 0,
            size,
            frames,
            digest,
        };
        match lie {
            Lie::WrongDigest | Lie::FlippedBlock | Lie::SizeLarger | Lie::SizeSmaller => {
                for (i, mut b) in blocks.into_iter().enumerate() {
                    if let (Lie::FlippedBlock, 1, Msg::Data { data, .. }) = (lie, i, &mut b) {
                        data[100] ^= 0x40;
                    }
                    self.send_data(&b).await;
                }
                let last = new.len() - 1;
                let claim = match lie {
                    Lie::WrongDigest => {
                        let mut other = new.to_vec();
                        other[last] ^= 1;
                        end(size, frames, digest(&other))
                    }
                    Lie::FlippedBlock => end(size, frames, digest(new)),
                    Lie::SizeLarger => {
                        let mut longer = new.to_vec();
                        longer.resize(new.len() + LEAF, 0);
                        end(longer.len() as u64, frames, digest(&longer))
                    }
                    _ => end(size - 1000, frames, digest(new)),
                };
                self.send(&claim).await;
            }
            Lie::CopyPastBasis => {
                let ops = vec![CopyOp {
                    src: 64 * LEAF as u64,
                    len: LEAF as u64,
                    dst: 0,
                }];
                self.send_data(&Msg::Copy { id: 0, ops }).await;
                for b in &blocks[1..] {
                    self.send_data(b).await;
                }
                self.send(&end(size, frames, digest(new))).await;
            }
            Lie::SmallWrongDigest => {
                let mut other = new.to_vec();
                other[0] ^= 1;
                let files = vec![SmallFile {
                    id: 0,
                    data: new.to_vec(),
                    digest: digest(&other),
                }];
                self.send_data(&Msg::SmallFiles { files }).await;
            }
            Lie::CutMidFrame => {
                self.send_data(&blocks[0]).await;
                let second = frame(&blocks[1]);
                self.data_w
                    .write_all(&second[..second.len() / 2])
                    .await
                    .expect("send half a frame");
                let _ = self.data_w.flush().await;
                let _ = self.data_w.shutdown().await;
                let _ = self.control_w.shutdown().await;
                return None;
            }
        }
        let result = loop {
            match self.next().await {
                Some(Msg::FileDone { id: 0, result }) => break result,
                Some(Msg::Fatal { message }) => panic!("{lie:?}: the receiver gave up: {message}"),
                Some(_) => {}
                None => panic!("{lie:?}: the receiver hung up before answering"),
            }
        };
        // End the session the way an honest sender does, so the receiver finishes its pass.
        self.send(&Msg::EndOfList {
            batches: 1,
            entries: 1,
        })
        .await;
        while let Some(m) = self.next().await {
            if matches!(m, Msg::Report(_)) {
                break;
            }
        }
        let _ = self.data_w.shutdown().await;
        let _ = self.control_w.shutdown().await;
        Some(result)
    }
}

/// The receiver must have answered the lie with a failure of that file (the hang-up ends the
/// session instead, with no answer).
fn assert_refused(lie: Lie, result: &Option<FileResult>) {
    match (lie, result) {
        (Lie::CutMidFrame, None) => {}
        (_, Some(FileResult::Failed { reason, .. })) => {
            eprintln!("{lie:?}: refused: {reason}");
        }
        other => panic!("{lie:?}: the receiver accepted a lie: {other:?}"),
    }
}

/// The good file is still there, byte for byte, and nothing but it (and at most its hidden
/// partial file, a resume basis the next run verifies by hash) stands in `dir` for it.
fn assert_good_file_kept(dir: &Path, lie: Lie, old: &[u8]) {
    let target = dir.join(lie.name());
    let now = std::fs::read(&target)
        .unwrap_or_else(|e| panic!("{lie:?}: the good file {} is gone: {e}", target.display()));
    assert!(
        now == old,
        "{lie:?}: the good file {} was overwritten ({} bytes, was {})",
        target.display(),
        now.len(),
        old.len()
    );
}

/// A daemon module with one good file per lie; a hand-made client lies about each in its own
/// session. The files keep their bytes, the daemon keeps serving and gives back its
/// descriptors, and a normal push afterwards lands exact.
#[test]
fn a_lying_client_cannot_replace_good_files_on_a_daemon() {
    let t = tmp();
    let module = t.path().join("module");
    let src = t.path().join("src");
    let mut olds = Vec::new();
    for (i, lie) in LIES.iter().enumerate() {
        let (old, new) = lie.contents(100 + 10 * i as u64);
        write(&module.join(lie.name()), &old);
        write(&src.join(lie.name()), &new);
        olds.push((*lie, old, new));
    }
    let mut d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    // One normal session first, so whatever the daemon opens once is open when counting.
    let probe = t.path().join("probe");
    write(&probe.join("p"), b"probe");
    sync(&[&slash(&probe), &d.url("m/probe/")]).ok();
    let idle_fds = open_fds(d.pid());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for (lie, old, new) in &olds {
        let result = rt.block_on(async {
            let (control, data) = open_push(d.port, SyncOptions::default(), true).await;
            let data = data.expect("the daemon refused the data connection");
            let (cr, cw) = tokio::io::split(control);
            let (dr, dw) = tokio::io::split(data);
            // Nothing comes back on a data connection; reading it notices the hang-up.
            tokio::spawn(drain(dr));
            let liar = Liar {
                control: FrameReader::new(Box::new(cr), Arc::new(WireCounter::default())),
                control_w: Box::new(cw),
                data_w: Box::new(dw),
            };
            liar.lie(*lie, new).await
        });
        assert_refused(*lie, &result);
        assert!(d.alive(), "{lie:?}: the daemon died:\n{}", d.log());
        // The session is over (its descriptors, the destination lock among them, are back)
        // before the next one starts.
        await_fds_at_most(&d, idle_fds + FD_SLACK, &format!("after {lie:?}"));
        assert_good_file_kept(&module, *lie, old);
    }
    assert!(!d.log().contains("panicked"), "{}", d.log());
    // Still serving: an honest push replaces every file, resuming from whatever partial a
    // liar left (it is hashed, never trusted), and leaves no partial behind.
    sync(&[&slash(&src), &d.url("m/")]).ok();
    assert_same(&src, &module);
    assert!(
        partials_in(&module).is_empty(),
        "{:?}",
        partials_in(&module)
    );
}

/// The fake daemon's side of the handshake on one accepted connection: read the hello,
/// accept it. Returns the connection's halves.
async fn accept_hello(
    listener: &tokio::net::TcpListener,
    new_session: bool,
) -> (FrameReader<Reader>, Writer) {
    let (tcp, _) = tokio::time::timeout(ANSWER, listener.accept())
        .await
        .expect("the client did not connect")
        .expect("accept");
    let (r, mut w) = tcp.into_split();
    let mut reader: FrameReader<Reader> =
        FrameReader::new(Box::new(r), Arc::new(WireCounter::default()));
    let hello = reader
        .recv::<Hello>()
        .await
        .expect("read the hello")
        .expect("the client hung up before its hello");
    assert_eq!(
        matches!(hello, Hello::New(_)),
        new_session,
        "unexpected hello {hello:?}"
    );
    let welcome = Welcome::Accepted {
        session: 1,
        secret: [7; 16],
    };
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    proto::frame::encode_frame(&welcome, false, &mut None, &mut plain, &mut out).unwrap();
    w.write_all(&out).await.expect("send the welcome");
    (reader, Box::new(w))
}

/// Pull from a fake daemon that lies about one file: the real client keeps its good file,
/// reports the file as failed (exit 3; a hang-up is a fatal error, exit 1), and leaves
/// nothing at the file's name but the good file.
#[test]
fn a_lying_daemon_cannot_replace_good_files_on_a_pulling_client() {
    let t = tmp();
    let dst = t.path().join("dst");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for (i, lie) in LIES.iter().enumerate() {
        let (old, new) = lie.contents(200 + 10 * i as u64);
        write(&dst.join(lie.name()), &old);
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let url = format!("cutover://127.0.0.1:{port}/m/");
        let client = spawn_sync(&[
            "--json",
            "--insecure-plaintext",
            "-j",
            "1",
            "--timeout",
            "10",
            // The fake daemon serves one session: a hang-up mid-frame looks like a network
            // cut, which a real run would retry; here the one session must show the lie.
            "--retry-for",
            "0",
            &url,
            &slash(&dst),
        ]);
        let result = rt.block_on(async {
            let (control, control_w) = accept_hello(&listener, true).await;
            let (data, data_w) = accept_hello(&listener, false).await;
            tokio::spawn(drain_frames(data));
            Liar {
                control,
                control_w,
                data_w,
            }
            .lie(*lie, &new)
            .await
        });
        let out = client.wait();
        assert_refused(*lie, &result);
        assert_good_file_kept(&dst, *lie, &old);
        let expected = if *lie == Lie::CutMidFrame { 1 } else { 3 };
        assert_eq!(
            out.code(),
            expected,
            "{lie:?}: a pull the daemon lied to must not claim success\n{out}"
        );
        if expected == 3 {
            let errors = out.events("error");
            assert!(
                errors
                    .iter()
                    .any(|e| e["message"].as_str().unwrap_or("").contains(&lie.name())),
                "{lie:?}: no error names {}\n{out}",
                lie.name()
            );
        }
    }
}

/// Read and drop frames until the peer hangs up.
async fn drain_frames(mut r: FrameReader<Reader>) {
    while let Ok(Some(_)) = r.recv::<Msg>().await {}
}

/// The same gap with an honest daemon: a pull whose own side cannot write a file (its disk is
/// full) reported success before, because only the receiver knew. It must end with one line
/// naming the destination and "file system is full", exit 1, keep the good file, skip
/// `--delete`, and finish after space is freed.
#[test]
fn a_pull_into_a_full_disk_ends_with_one_line_and_exit_1() {
    let t = tmp();
    let module = t.path().join("module");
    write(&module.join("keep.bin"), random_bytes(41, 3 << 20));
    write(&module.join("sibling.bin"), random_bytes(42, 4 << 20));
    let d = Daemon::start(&t.path().join("d"), &[Module::rw("m", &module)]);
    let fs = Tmpfs::mount(&t.path().join("small_fs"), "2m");
    let keep = random_bytes(43, 100 << 10);
    write(&fs.path.join("keep.bin"), &keep);
    write(
        &fs.path.join("extra"),
        b"deleted only by a pass without errors",
    );
    let out = sync(&["--delete", "-j", "2", &d.url("m/"), &slash(&fs.path)]);
    out.expect_code(1);
    assert_one_line_error(&out, &[s(&fs.path), "file system is full"]);
    assert_eq!(std::fs::read(fs.path.join("keep.bin")).unwrap(), keep);
    assert!(!fs.path.join("sibling.bin").exists(), "{out}");
    assert!(
        fs.path.join("extra").exists(),
        "--delete ran despite errors"
    );
    fs.resize("32m");
    sync(&["--delete", "-j", "2", &d.url("m/"), &slash(&fs.path)]).ok();
    assert_same(&module, &fs.path);
}
