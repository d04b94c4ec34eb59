//! The dialling side of a daemon session: open the control connection with `Hello::New`, join
//! data connections with `Hello::Join`, and (in auto mode) keep opening more while the
//! aggregate rate keeps rising, so a link whose single flows are capped gets filled without
//! the user knowing its round-trip time or window.

use crate::{Conn, ConnError};
use proto::{Hello, NewSession, Welcome, WireCounter};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Data connections an auto session starts with.
pub const AUTO_START: usize = 16;
/// Most data connections an auto session opens.
pub const AUTO_MAX: usize = 64;
/// The aggregate rate must grow by this factor after a step for auto to take another.
const AUTO_GAIN: f64 = 1.2;
const AUTO_STEP: Duration = Duration::from_millis(500);
/// Below this delivered rate (bytes/s) there is no data flow to judge.
const AUTO_IDLE_RATE: f64 = 256.0 * 1024.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connections {
    Fixed(usize),
    Auto,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr}: {source}")]
    Conn {
        addr: String,
        #[source]
        source: ConnError,
    },
    #[error("{addr} refused the session: {reason}")]
    Refused { addr: String, reason: String },
    #[error("{addr}: the daemon closed the connection during the handshake")]
    Handshake { addr: String },
}

pub struct Dialed {
    pub control: Conn,
    pub data: mpsc::Receiver<Conn>,
    pub wire: Arc<WireCounter>,
}

async fn dial(addr: &str, wire: &Arc<WireCounter>) -> Result<Conn, ClientError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    Ok(Conn::tcp(stream, wire.clone()))
}

async fn hello(addr: &str, conn: &mut Conn, hello: Hello) -> Result<(u64, [u8; 16]), ClientError> {
    let err = |source| ClientError::Conn {
        addr: addr.to_string(),
        source,
    };
    conn.writer.send_value(&hello).await.map_err(err)?;
    let welcome: Option<Welcome> = conn.reader.recv_value().await.map_err(err)?;
    match welcome {
        Some(Welcome::Accepted { session, secret }) => Ok((session, secret)),
        Some(Welcome::Refused { reason }) => Err(ClientError::Refused {
            addr: addr.to_string(),
            reason,
        }),
        None => Err(ClientError::Handshake {
            addr: addr.to_string(),
        }),
    }
}

/// Bytes that have reached the receiving side so far (not merely been handed to a socket,
/// whose buffers would make a new connection look faster than it is).
pub type Delivered = Arc<dyn Fn() -> u64 + Send + Sync>;

/// Open `n` data connections of a session at once (each costs a round trip).
async fn join_many(
    addr: &str,
    session: u64,
    secret: [u8; 16],
    wire: &Arc<WireCounter>,
    n: usize,
) -> Result<Vec<Conn>, ClientError> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let addr = addr.to_string();
        let wire = wire.clone();
        set.spawn(async move {
            let mut c = dial(&addr, &wire).await?;
            hello(&addr, &mut c, Hello::Join { session, secret }).await?;
            Ok::<_, ClientError>(c)
        });
    }
    let mut out = Vec::with_capacity(n);
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(c)) => out.push(c),
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                return Err(ClientError::Connect {
                    addr: addr.to_string(),
                    source: std::io::Error::other(e.to_string()),
                })
            }
        }
    }
    Ok(out)
}

/// Open a session with its data connections and, in auto mode, grow it in the background.
pub async fn open_session(
    addr: &str,
    new: NewSession,
    connections: Connections,
    delivered: Delivered,
) -> Result<Dialed, ClientError> {
    let wire = Arc::new(WireCounter::default());
    let mut control = dial(addr, &wire).await?;
    let (session, secret) = hello(addr, &mut control, Hello::New(new)).await?;
    let (tx, rx) = mpsc::channel(AUTO_MAX + 1);
    let start = match connections {
        Connections::Fixed(n) => n.max(1),
        Connections::Auto => AUTO_START,
    };
    for c in join_many(addr, session, secret, &wire, start).await? {
        let _ = tx.send(c).await;
    }
    if connections == Connections::Auto {
        let addr = addr.to_string();
        let wire = wire.clone();
        tokio::spawn(async move { grow(addr, session, secret, tx, wire, start, delivered).await });
    }
    Ok(Dialed {
        control,
        data: rx,
        wire,
    })
}

/// Double the data connections while each doubling still raises the delivered rate.
async fn grow(
    addr: String,
    session: u64,
    secret: [u8; 16],
    tx: mpsc::Sender<Conn>,
    wire: Arc<WireCounter>,
    mut count: usize,
    delivered: Delivered,
) {
    let mut last = delivered();
    let mut base_rate = 0.0f64;
    let mut settling = false;
    loop {
        tokio::time::sleep(AUTO_STEP).await;
        if tx.is_closed() {
            return;
        }
        let now = delivered();
        let rate = now.saturating_sub(last) as f64 / AUTO_STEP.as_secs_f64();
        last = now;
        // Nothing flowing (scanning, hashing, or a delta with little to send): no verdict.
        if rate < AUTO_IDLE_RATE {
            continue;
        }
        // The step right after opening connections mixes old and new rates: skip it.
        if settling {
            settling = false;
            continue;
        }
        if base_rate > 0.0 && rate < base_rate * AUTO_GAIN {
            tracing::debug!(count, rate, "auto connections: rate stopped rising");
            return;
        }
        base_rate = rate;
        let more = count.min(AUTO_MAX - count);
        if more == 0 {
            return;
        }
        match join_many(&addr, session, secret, &wire, more).await {
            Ok(conns) => {
                for c in conns {
                    if tx.send(c).await.is_err() {
                        return;
                    }
                }
            }
            Err(e) => {
                tracing::debug!("auto connections: cannot open more: {e}");
                return;
            }
        }
        count += more;
        settling = true;
        tracing::debug!(count, rate, "auto connections: opened more");
    }
}
