//! `cutover serve`: accepts connections, opens sessions on named modules, routes joining data
//! connections to their session, and runs the engine's sender or receiver for each session.
//!
//! Until TLS lands the daemon refuses to listen anywhere but loopback. Paths from clients are
//! validated lexically (relative, no `..`, no NUL) before they are joined to a module root.

pub mod config;

pub use config::{Config, ConfigError, Module};

use engine::{Destination, NoEvents, Session, Source, Stats};
use net::{Conn, RateLimiter};
use proto::{Hello, NewSession, Role, Welcome, WireCounter, PROTOCOL_VERSION};
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

/// How long a new connection may take to say hello.
const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(
        "refusing to listen on {0}: only loopback addresses are allowed until TLS is configured"
    )]
    NotLoopback(std::net::SocketAddr),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
}

struct Joinable {
    secret: [u8; 16],
    tx: mpsc::Sender<Conn>,
}

/// Shared state of a running daemon.
pub struct Server {
    config: Config,
    sessions: Mutex<HashMap<u64, Joinable>>,
}

/// Bind the configured (or given) address, refusing anything but loopback.
pub async fn bind(addr: &str) -> Result<TcpListener, DaemonError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| DaemonError::Bind {
            addr: addr.to_string(),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| DaemonError::Bind {
        addr: addr.to_string(),
        source,
    })?;
    if !local.ip().is_loopback() {
        return Err(DaemonError::NotLoopback(local));
    }
    Ok(listener)
}

/// Serve until `shutdown` completes.
pub async fn serve(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) {
    let server = Arc::new(Server {
        config,
        sessions: Mutex::new(HashMap::new()),
    });
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let wire = Arc::new(WireCounter::default());
                    let conn = Conn::tcp(stream, wire);
                    tokio::spawn(handle(server.clone(), conn, peer.to_string()));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

async fn refuse(conn: &mut Conn, reason: String) {
    let _ = conn.writer.send_value(&Welcome::Refused { reason }).await;
    conn.writer.close().await;
}

/// Read the hello of one connection and open or join a session.
async fn handle(server: Arc<Server>, mut conn: Conn, peer: String) {
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, conn.reader.recv_value::<Hello>()).await {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::info!(%peer, "bad hello: {e}");
            return;
        }
        Err(_) => {
            tracing::info!(%peer, "no hello within {HELLO_TIMEOUT:?}");
            return;
        }
    };
    match hello {
        Hello::Join { session, secret } => {
            let tx = {
                let sessions = server.sessions.lock().unwrap_or_else(|p| p.into_inner());
                sessions
                    .get(&session)
                    .filter(|j| j.secret == secret)
                    .map(|j| j.tx.clone())
            };
            match tx {
                Some(tx) => {
                    if conn
                        .writer
                        .send_value(&Welcome::Accepted { session, secret })
                        .await
                        .is_ok()
                    {
                        let _ = tx.send(conn).await;
                    }
                }
                None => refuse(&mut conn, "unknown session".into()).await,
            }
        }
        Hello::New(new) => {
            if let Err(reason) = open(&server, conn, new, &peer).await {
                tracing::info!(%peer, "session refused: {reason}");
            }
        }
    }
}

async fn open(
    server: &Arc<Server>,
    mut conn: Conn,
    new: NewSession,
    peer: &str,
) -> Result<(), String> {
    if new.version != PROTOCOL_VERSION {
        let reason = format!(
            "protocol version {} is not supported (this daemon speaks {PROTOCOL_VERSION}); use the same cutover version on both sides",
            new.version
        );
        refuse(&mut conn, reason.clone()).await;
        return Err(reason);
    }
    let resolved = resolve(&server.config, &new);
    let root = match resolved {
        Ok(r) => r,
        Err(reason) => {
            refuse(&mut conn, reason.clone()).await;
            return Err(reason);
        }
    };
    let session: u64 = rand::random();
    let secret: [u8; 16] = rand::random();
    let (tx, rx) = mpsc::channel(128);
    server
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(session, Joinable { secret, tx });
    if conn
        .writer
        .send_value(&Welcome::Accepted { session, secret })
        .await
        .is_err()
    {
        server
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&session);
        return Err("client went away during the handshake".into());
    }
    tracing::info!(%peer, module = %new.module, path = %new.path, role = ?new.server_role, "session opened");
    let mut opts = new.options.clone();
    let sess = Session {
        control: conn,
        data: rx,
        limiter: opts.bwlimit.and_then(RateLimiter::new).map(Arc::new),
    };
    let stats = Arc::new(Stats::default());
    let result = match new.server_role {
        Role::Receiver => {
            opts.owners = rustix::process::geteuid().is_root();
            let dest = Destination {
                root,
                is_dir_hint: new.path.ends_with('/') || new.path.is_empty(),
            };
            engine::run_receiver(sess, dest, opts, Arc::new(NoEvents), stats).await
        }
        Role::Sender => {
            engine::run_sender(sess, Source { root }, opts, Arc::new(NoEvents), stats).await
        }
    };
    server
        .sessions
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&session);
    match result {
        Ok(_) => {
            tracing::info!(%peer, "session finished");
            Ok(())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Map a session request to a path beneath its module root, or say why not.
fn resolve(config: &Config, new: &NewSession) -> Result<PathBuf, String> {
    let module = config
        .modules
        .iter()
        .find(|m| m.name == new.module)
        .ok_or_else(|| {
            let names: Vec<&str> = config.modules.iter().map(|m| m.name.as_str()).collect();
            format!(
                "unknown module {:?} (this daemon serves: {})",
                new.module,
                names.join(", ")
            )
        })?;
    if new.server_role == Role::Receiver && module.read_only {
        return Err(format!("module {:?} is read-only", module.name));
    }
    let rel = new.path.trim_end_matches('/').trim_start_matches("./");
    cofs::validate_rel(rel.as_bytes())
        .map_err(|why| format!("path {:?} refused: {why}", new.path))?;
    let path = cofs::join(&module.path, rel.as_bytes());
    if new.server_role == Role::Sender && std::fs::symlink_metadata(&path).is_err() {
        return Err(format!(
            "path {:?} does not exist in module {:?}",
            new.path, module.name
        ));
    }
    Ok(path)
}
