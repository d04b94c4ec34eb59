//! Peer links over ssh (`address = "ssh://[USER@]HOST"`): each connection of the link is
//! one `ssh HOST cutover serve --peer-relay` process, whose stdin and stdout the relay on
//! the peer's host joins to that host's daemon through its local peer socket
//! (`state_dir/peer.sock`, mode 0600, answering only root and the daemon's own user). ssh
//! encrypts and authenticates the dialler (as sync over ssh does: no TLS inside); the
//! dialler names its certificate's fingerprint in its hello, and the daemon believes it
//! there because only someone who could log in as the daemon's user reaches that socket.
//! The peer is found by that fingerprint as for TLS links, so the same config entry serves
//! both.

use crate::peering::{self, PeerHub, PeerLink};
use net::tls::Fingerprint;
use net::Conn;
use proto::{Hello, WireCounter};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};

/// The local peer socket's name in the state directory.
pub const PEER_SOCKET: &str = "peer.sock";
/// Time a relayed connection has to say hello.
const HELLO_PATIENCE: Duration = Duration::from_secs(10);

/// Serve the local peer socket until aborted: every connection is a relayed peer
/// connection, handed to the same acceptance as a TLS one.
pub(crate) async fn serve(listener: UnixListener, hub: Arc<PeerHub>) {
    let failures = Arc::new(AtomicU64::new(0));
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(relayed(stream, hub.clone(), failures.clone()));
            }
            Err(e) => {
                tracing::warn!("peer socket: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn relayed(stream: UnixStream, hub: Arc<PeerHub>, failures: Arc<AtomicU64>) {
    let me = rustix::process::geteuid().as_raw();
    match stream.peer_cred() {
        Ok(c) if c.uid() == 0 || c.uid() == me => {}
        Ok(c) => {
            tracing::warn!(
                uid = c.uid(),
                "peer socket: refused a client that is neither root nor the daemon's user"
            );
            return;
        }
        Err(e) => {
            tracing::warn!("peer socket: no peer credentials: {e}");
            return;
        }
    }
    let (r, w) = stream.into_split();
    let mut conn = Conn::framed(r, w, Arc::new(WireCounter::default()));
    let hello = match tokio::time::timeout(HELLO_PATIENCE, conn.reader.recv_value::<Hello>()).await
    {
        Ok(Ok(Some(Hello::Peer(h)))) => h,
        Ok(Ok(Some(_))) => {
            crate::refuse(&mut conn, "the peer socket takes peer links only".into()).await;
            return;
        }
        _ => return,
    };
    let claimed = Fingerprint(hello.sender);
    peering::accept(&hub, conn, Some(claimed), hello, &failures, "ssh relay").await;
}

/// The command line that reaches the peer's relay: (local program and arguments, remote
/// command).
pub(crate) fn command(link: &PeerLink) -> Result<(Vec<String>, String), String> {
    let via = &link.cfg.ssh;
    let program = shlex::split(&via.command)
        .filter(|p| !p.is_empty())
        .ok_or_else(|| format!("ssh_command {:?} is not a command line", via.command))?;
    let mut remote = format!(
        "{} serve --peer-relay",
        shlex::try_quote(&via.remote_cutover).map_err(|e| e.to_string())?
    );
    if let Some(c) = &via.remote_config {
        remote.push_str(" --config ");
        remote.push_str(&shlex::try_quote(c).map_err(|e| e.to_string())?);
    }
    Ok((program, remote))
}

/// Open connection `index` of link `id` over ssh to `dest`.
pub(crate) async fn dial_one(
    link: &PeerLink,
    dest: &str,
    (program, remote): &(Vec<String>, String),
    hello: ([u8; 32], u64, u32, u32),
    wire: Arc<WireCounter>,
) -> Result<Conn, String> {
    let (own, id, index, count) = hello;
    let (conn, child) = net::ssh::spawn_remote(program, dest, remote, wire)
        .map_err(|e| format!("ssh://{dest}: {e}"))?;
    match peering::greet(conn, link, id, index, count, own).await {
        Ok(c) => Ok(c),
        Err(why) => {
            // ssh's own complaint (no route, key refused, no cutover there) says more.
            tokio::time::sleep(Duration::from_millis(200)).await;
            let said = child.stderr_line();
            Err(if said.is_empty() {
                format!("ssh://{dest}: {why}")
            } else {
                format!("ssh://{dest}: {why} ({said})")
            })
        }
    }
}

/// `cutover serve --peer-relay [--config FILE]`, run by ssh on the peer's host: join
/// stdin and stdout to the local daemon's peer socket until either side closes.
pub async fn relay(config: Option<&Path>) -> Result<(), String> {
    let state_dir: PathBuf = match config {
        Some(c) => {
            let cfg = crate::Config::load(c).map_err(|e| e.to_string())?;
            cfg.state_dir().ok_or_else(|| {
                format!("{}: no state_dir (and no HOME for a default)", c.display())
            })?
        }
        None => crate::config::default_state_dir()
            .ok_or("no state directory (no HOME); pass --config")?,
    };
    let path = state_dir.join(PEER_SOCKET);
    let sock = UnixStream::connect(&path).await.map_err(|e| {
        format!(
            "{}: {e}; is `cutover serve` running there with a [[volume.peer]]? (pass the daemon's --config)",
            path.display()
        )
    })?;
    let (mut sr, mut sw) = sock.into_split();
    let (mut stdin, mut stdout) = (tokio::io::stdin(), tokio::io::stdout());
    let up = async {
        let _ = tokio::io::copy(&mut stdin, &mut sw).await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut sw).await;
    };
    let down = async {
        let _ = tokio::io::copy(&mut sr, &mut stdout).await;
    };
    // The link is over when the daemon closes its end; stdin may stay open until ssh goes.
    tokio::select! {
        () = down => {}
        () = async { up.await; std::future::pending::<()>().await } => {}
    }
    Ok(())
}
