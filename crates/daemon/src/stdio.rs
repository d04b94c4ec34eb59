//! `cutover serve --stdio`: one connection on stdin/stdout, started by a client's ssh.
//!
//! The first process of a session (`Hello::New`) runs the engine and listens on a private
//! Unix socket named after the session; every later process of the session (`Hello::Join`)
//! relays its stdin/stdout to that socket, so all ssh connections of one session meet in one
//! engine. ssh has authenticated the user already: paths are the user's own (absolute, or
//! relative to the login directory), with the user's permissions, as with rsync over ssh.

use crate::{
    admit, refuse, refuse_join, run_engine, version_mismatch, SessionPlace, AUTH_FAILURE_DELAY,
    UNKNOWN_SESSION,
};
use net::tls::verify_join_proof;
use net::Conn;
use proto::{FrameReader, FrameWriter, Hello, NewSession, Role, Welcome, WireCounter};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;

/// Time a joining connection has to say hello on the session socket.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The directory of session sockets: `$XDG_RUNTIME_DIR/cutover`, else `/tmp/cutover-UID`;
/// made 0700 and refused if anyone else owns it or can enter it.
fn socket_dir() -> Result<PathBuf, String> {
    let uid = rustix::process::geteuid().as_raw();
    let dir = match std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty()) {
        Some(d) => PathBuf::from(d).join("cutover"),
        None => PathBuf::from(format!("/tmp/cutover-{uid}")),
    };
    match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    }
    let meta = std::fs::symlink_metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(format!(
            "{}: must be a directory owned by uid {uid} with mode 0700; remove it",
            dir.display()
        ));
    }
    Ok(dir)
}

fn socket_path(dir: &std::path::Path, session: u64) -> PathBuf {
    dir.join(format!("{session:016x}.sock"))
}

/// Serve one ssh connection until the session (or this relay) ends.
pub async fn serve_stdio() -> Result<(), String> {
    let wire = Arc::new(WireCounter::default());
    let mut stdin = tokio::io::stdin();
    let mut stdout = tokio::io::stdout();
    let mut reader = FrameReader::new(&mut stdin, wire.clone());
    reader.set_limit(proto::MAX_HANDSHAKE_FRAME);
    let hello: Option<Hello> = reader
        .recv()
        .await
        .map_err(|e| format!("bad hello on stdin: {e}"))?;
    match hello {
        None => Ok(()),
        Some(Hello::New(new)) => {
            let conn = Conn::framed(stdin, stdout, wire);
            open(conn, new).await
        }
        Some(Hello::Peer(_)) => {
            let mut conn = Conn::framed(stdin, stdout, wire);
            refuse(
                &mut conn,
                "volume peer links over ssh are not supported yet; give the peer's address as HOST:PORT".into(),
            )
            .await;
            Err("a volume peer link over stdio".into())
        }
        Some(Hello::Join { session, proof }) => {
            let dir = socket_dir()?;
            let mut sock = match UnixStream::connect(socket_path(&dir, session)).await {
                Ok(s) => s,
                Err(_) => {
                    // As late as the session's own refusal of a wrong proof: the two look
                    // the same from outside.
                    tokio::time::sleep(AUTH_FAILURE_DELAY).await;
                    let mut conn = Conn::framed(stdin, stdout, wire);
                    refuse(&mut conn, UNKNOWN_SESSION.into()).await;
                    return Err("join of an unknown session".into());
                }
            };
            // The session checks the proof: it alone knows the secret.
            FrameWriter::new(&mut sock, wire)
                .send(&Hello::Join { session, proof }, false)
                .await
                .map_err(|e| format!("session socket: {e}"))?;
            relay(stdin, &mut stdout, sock).await
        }
    }
}

/// Copy stdin → socket and socket → stdout until the session closes its side.
async fn relay(
    mut stdin: tokio::io::Stdin,
    stdout: &mut tokio::io::Stdout,
    sock: UnixStream,
) -> Result<(), String> {
    use tokio::io::AsyncWriteExt;
    let (mut from_session, mut to_session) = sock.into_split();
    let upstream = async {
        let _ = tokio::io::copy(&mut stdin, &mut to_session).await;
        let _ = to_session.shutdown().await;
    };
    let downstream = async {
        let r = tokio::io::copy(&mut from_session, stdout).await;
        let _ = stdout.flush().await;
        r
    };
    tokio::pin!(upstream);
    tokio::select! {
        r = downstream => return r.map(|_| ()).map_err(|e| format!("relay: {e}")),
        _ = &mut upstream => {}
    }
    // The client is done sending; what the session still has to say goes on.
    let r = tokio::io::copy(&mut from_session, stdout).await;
    let _ = stdout.flush().await;
    r.map(|_| ()).map_err(|e| format!("relay: {e}"))
}

/// The first connection of a session: check the request, listen for the others, run the
/// engine.
async fn open(mut conn: Conn, new: NewSession) -> Result<(), String> {
    if let Some(reason) = version_mismatch(&new) {
        refuse(&mut conn, reason.clone()).await;
        return Err(reason);
    }
    if !new.module.is_empty() {
        let reason = "ssh endpoints take a path, not a module".to_string();
        refuse(&mut conn, reason.clone()).await;
        return Err(reason);
    }
    let trimmed = new.path.trim_end_matches('/');
    let root = PathBuf::from(match (trimmed.is_empty(), new.path.starts_with('/')) {
        (true, true) => "/",
        (true, false) => ".",
        _ => trimmed,
    });
    if new.server_role == Role::Sender && std::fs::symlink_metadata(&root).is_err() {
        let reason = format!("{}: source does not exist", new.path);
        refuse(&mut conn, reason.clone()).await;
        return Err(reason);
    }
    let dir = match socket_dir() {
        Ok(d) => d,
        Err(reason) => {
            refuse(&mut conn, reason.clone()).await;
            return Err(reason);
        }
    };
    let session: u64 = rand::random();
    let secret: [u8; 16] = rand::random();
    let path = socket_path(&dir, session);
    let listener = UnixListener::bind(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let (tx, rx) = mpsc::channel(128);
    let accepting = tokio::spawn(accept_joins(listener, session, secret, tx));
    let result = async {
        conn.writer
            .send_value(&Welcome::Accepted { session, secret })
            .await
            .map_err(|e| format!("client went away during the handshake: {e}"))?;
        let place = SessionPlace {
            root,
            jail: None,
            devices: true,
            // The ssh login's own paths: the user named them.
            public_name: None,
        };
        let idle = std::time::Duration::from_secs(crate::config::DEFAULT_IDLE_TIMEOUT_SECS);
        run_engine(conn, rx, &new, place, idle).await
    }
    .await;
    accepting.abort();
    let _ = std::fs::remove_file(&path);
    result
}

/// Hand every relayed connection that names this session and proves its secret to the
/// engine. ssh carries no TLS keying material, so the proof binds to zeros (as over
/// plaintext); the socket's directory admits this user only.
async fn accept_joins(
    listener: UnixListener,
    session: u64,
    secret: [u8; 16],
    tx: mpsc::Sender<Conn>,
) {
    let failures = Arc::new(AtomicU64::new(0));
    while let Ok((stream, _)) = listener.accept().await {
        let tx = tx.clone();
        let failures = failures.clone();
        tokio::spawn(async move {
            let (r, w) = stream.into_split();
            let mut conn = Conn::framed(r, w, Arc::new(WireCounter::default()));
            let hello = tokio::time::timeout(JOIN_TIMEOUT, conn.reader.recv_value::<Hello>()).await;
            let proven = matches!(hello, Ok(Ok(Some(Hello::Join { session: s, proof })))
                if s == session && verify_join_proof(&secret, &[0; 32], &proof));
            if proven {
                admit(conn, session, secret, tx).await;
            } else {
                refuse_join(conn, &failures, "ssh session socket").await;
            }
        });
    }
}
