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
pub const AUTO_START: usize = 8;
/// Most data connections an auto session opens.
pub const AUTO_MAX: usize = 64;
/// The aggregate rate must grow by this factor after a step for auto to take another.
const AUTO_GAIN: f64 = 1.2;
const AUTO_STEP: Duration = Duration::from_secs(1);

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

/// Open a session with `count` data connections and, in auto mode, grow it in the background.
pub async fn open_session(
    addr: &str,
    new: NewSession,
    connections: Connections,
) -> Result<Dialed, ClientError> {
    let wire = Arc::new(WireCounter::default());
    let mut control = dial(addr, &wire).await?;
    let (session, secret) = hello(addr, &mut control, Hello::New(new)).await?;
    let (tx, rx) = mpsc::channel(AUTO_MAX + 1);
    let start = match connections {
        Connections::Fixed(n) => n.max(1),
        Connections::Auto => AUTO_START,
    };
    for _ in 0..start {
        let mut c = dial(addr, &wire).await?;
        hello(addr, &mut c, Hello::Join { session, secret }).await?;
        let _ = tx.send(c).await;
    }
    if connections == Connections::Auto {
        let addr = addr.to_string();
        let wire = wire.clone();
        tokio::spawn(async move { grow(addr, session, secret, tx, wire, start).await });
    }
    Ok(Dialed {
        control,
        data: rx,
        wire,
    })
}

/// Double the data connections while each doubling still raises the aggregate rate.
async fn grow(
    addr: String,
    session: u64,
    secret: [u8; 16],
    tx: mpsc::Sender<Conn>,
    wire: Arc<WireCounter>,
    mut count: usize,
) {
    let mut last_total = wire.total();
    let mut last_rate = 0.0f64;
    loop {
        tokio::time::sleep(AUTO_STEP).await;
        if tx.is_closed() {
            return;
        }
        let total = wire.total();
        let rate = (total - last_total) as f64 / AUTO_STEP.as_secs_f64();
        last_total = total;
        // Nothing flowing yet (scanning, hashing): wait for data before judging.
        if rate < 64.0 * 1024.0 {
            continue;
        }
        if last_rate > 0.0 && rate < last_rate * AUTO_GAIN {
            tracing::debug!(count, rate, "auto connections: rate stopped rising");
            return;
        }
        last_rate = rate;
        let more = count.min(AUTO_MAX - count);
        if more == 0 {
            return;
        }
        for _ in 0..more {
            let Ok(mut c) = dial(&addr, &wire).await else {
                return;
            };
            if hello(&addr, &mut c, Hello::Join { session, secret })
                .await
                .is_err()
            {
                return;
            }
            if tx.send(c).await.is_err() {
                return;
            }
        }
        count += more;
        tracing::debug!(count, rate, "auto connections: opened more");
    }
}
