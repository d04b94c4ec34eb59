//! The dialling side of a daemon session: open the control connection with `Hello::New`, join
//! data connections with `Hello::Join`, and (in auto mode) keep opening more while the
//! aggregate rate keeps rising, so a link whose single flows are capped gets filled without
//! the user knowing its round-trip time or window.

use crate::conn::within;
use crate::remote_install::{self, InstallError, Installed};
use crate::secure::{connect, ConnectError};
use crate::ssh::{self, SshCommand};
use crate::tls::{client_config, join_proof, token_proof, Fingerprint, Identity, TlsError};
use crate::{Conn, ConnError};
use proto::{Hello, NewSession, Welcome, WireCounter};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Data connections an auto session starts with.
pub const AUTO_START: usize = 16;
/// Data connections an auto session over ssh starts with: each is a process and a login.
pub const AUTO_START_SSH: usize = 4;
/// ssh connections set up at the same time (sshd's MaxStartups begins dropping at 10).
const SSH_HANDSHAKES_AT_ONCE: usize = 6;
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
    #[error("{addr}: the session failed: {reason}")]
    SessionFailed { addr: String, reason: String },
    #[error("{addr}: the daemon closed the connection during the handshake")]
    Handshake { addr: String },
    #[error("{addr}: {source}")]
    Tls {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} presented certificate {seen}, but {expected} is pinned")]
    FingerprintMismatch {
        addr: String,
        seen: Fingerprint,
        expected: Fingerprint,
    },
    #[error(transparent)]
    Config(#[from] TlsError),
    #[error("{0}")]
    Ssh(String),
    /// The remote shell could not find or not run the remote cutover.
    #[error("{0}")]
    NoRemoteCutover(String),
    #[error(transparent)]
    Install(#[from] InstallError),
    #[error("{addr}: no answer for {secs} s while connecting (the peer or the path stalled)")]
    Stalled { addr: String, secs: u64 },
}

impl ClientError {
    /// Whether the session could not be opened because the path or the peer is down or
    /// stalled (refused, reset, silent), so that trying again later may work. A refusal, a
    /// wrong certificate or token, or a missing remote binary is not: it needs a fix.
    pub fn is_transport(&self) -> bool {
        match self {
            ClientError::Connect { source, .. } | ClientError::Tls { source, .. } => {
                crate::conn::io_is_transport(source)
            }
            ClientError::Conn { source, .. } => source.is_transport(),
            // The daemon closed the connection before answering: restarting, or at its
            // connection limit.
            ClientError::Handshake { .. } | ClientError::Stalled { .. } => true,
            _ => false,
        }
    }

    /// The remote cutover is missing, cannot run, or speaks another protocol version: what
    /// installing this binary there fixes.
    pub fn wants_remote_install(&self) -> bool {
        match self {
            ClientError::NoRemoteCutover(_) => true,
            ClientError::Refused { reason, .. } => reason.starts_with(proto::VERSION_REFUSAL),
            _ => false,
        }
    }
}

/// How a client secures its connections and proves itself to a daemon.
#[derive(Clone, Default)]
pub struct Security {
    /// TLS settings; None dials plaintext (only loopback daemons that allow it accept that).
    pub tls: Option<TlsClient>,
    /// The module's secret token, proven per connection, never sent.
    pub token: Option<Arc<Vec<u8>>>,
}

#[derive(Clone, Default)]
pub struct TlsClient {
    /// The pinned server fingerprint; None trusts the first one seen (and reports it).
    pub expected: Option<Fingerprint>,
    /// A client certificate to show (daemons may grant access by its fingerprint).
    pub identity: Option<Arc<Identity>>,
}

pub struct Dialed {
    pub control: Conn,
    pub data: mpsc::Receiver<Conn>,
    pub wire: Arc<WireCounter>,
    /// The fingerprint the daemon showed (None over plaintext).
    pub server_fingerprint: Option<Fingerprint>,
    /// This cutover, put on an ssh remote that had none (`SshCommand::install`).
    pub installed: Option<Installed>,
}

/// Where a session's connections go.
pub enum Remote<'a> {
    /// `cutover serve` at HOST:PORT.
    Daemon {
        addr: &'a str,
        security: &'a Security,
    },
    /// `ssh DEST cutover serve --stdio`, one process per connection.
    Ssh {
        dest: &'a str,
        command: &'a SshCommand,
    },
}

#[derive(Clone)]
enum Route {
    Tcp(Option<Arc<rustls::ClientConfig>>),
    Ssh(Arc<SshCommand>),
}

/// What every connection of a session dials with.
#[derive(Clone)]
struct Dialer {
    /// HOST:PORT of a daemon, or the ssh destination.
    addr: String,
    route: Route,
    wire: Arc<WireCounter>,
    /// The longest a connection may take to be opened and answered; None waits forever.
    patience: Option<Duration>,
}

impl Dialer {
    /// Open one connection and say `hello` on it; returns the connection, its TLS binding
    /// (for a token proof) and the daemon's answer.
    async fn greet(
        &self,
        make_hello: impl FnOnce(Option<[u8; 32]>) -> Hello,
    ) -> Result<(Conn, u64, [u8; 16]), ClientError> {
        // Each step is bounded by the patience: over TCP the connect, the TLS handshake and
        // the hello apart, so that a wrong address that never answers a SYN (`Connect`) is
        // told from a peer that answered and then stalled (`Stalled`); an ssh login is one
        // step.
        let addr = self.addr.clone();
        let stalled = || ClientError::Stalled {
            addr: addr.clone(),
            secs: self.patience.map_or(0, |p| p.as_secs()),
        };
        match &self.route {
            Route::Tcp(tls) => {
                let dialled = connect(&addr, tls.clone(), self.wire.clone(), self.patience).await;
                let (mut conn, binding) = match dialled {
                    Ok(d) => (d.conn, d.binding),
                    Err(ConnectError::Tcp(source)) => {
                        return Err(ClientError::Connect {
                            addr: addr.clone(),
                            source,
                        })
                    }
                    Err(ConnectError::Tls(source))
                        if source.kind() == std::io::ErrorKind::TimedOut =>
                    {
                        return Err(stalled())
                    }
                    Err(ConnectError::Tls(source)) => {
                        return Err(ClientError::Tls {
                            addr: addr.clone(),
                            source,
                        })
                    }
                };
                let said = hello(&addr, &mut conn, make_hello(binding));
                let (session, secret) = within(self.patience, said, stalled).await?;
                Ok((conn, session, secret))
            }
            Route::Ssh(cmd) => within(self.patience, self.login(cmd, make_hello), stalled).await,
        }
    }

    /// Start `ssh DEST cutover serve --stdio` and say hello on it.
    async fn login(
        &self,
        cmd: &SshCommand,
        make_hello: impl FnOnce(Option<[u8; 32]>) -> Hello,
    ) -> Result<(Conn, u64, [u8; 16]), ClientError> {
        let addr = &self.addr;
        let (mut conn, child) =
            ssh::spawn(cmd, addr, self.wire.clone()).map_err(|source| ClientError::Connect {
                addr: addr.clone(),
                source,
            })?;
        match hello(addr, &mut conn, make_hello(None)).await {
            Ok((session, secret)) => Ok((conn, session, secret)),
            Err(e @ ClientError::Refused { .. }) => Err(e),
            // The process died or never spoke our protocol: its exit code and stderr say why
            // (no remote binary, ssh refused, old version).
            Err(_) => {
                let failure = child
                    .diagnose(addr, cmd, std::time::Duration::from_secs(5))
                    .await;
                Err(match failure.no_remote_cutover {
                    true => ClientError::NoRemoteCutover(failure.message),
                    false => ClientError::Ssh(failure.message),
                })
            }
        }
    }
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
    dialer: &Dialer,
    session: u64,
    secret: [u8; 16],
    n: usize,
) -> Result<Vec<Conn>, ClientError> {
    // sshd drops unauthenticated connections beyond its MaxStartups (10 by default), so ssh
    // handshakes go a few at a time; TCP ones all at once.
    let at_once = match dialer.route {
        Route::Ssh(_) => SSH_HANDSHAKES_AT_ONCE,
        Route::Tcp(_) => n.max(1),
    };
    let gate = Arc::new(tokio::sync::Semaphore::new(at_once));
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let dialer = dialer.clone();
        let gate = gate.clone();
        set.spawn(async move {
            let _turn = gate.acquire().await;
            // Over plaintext and ssh there is no keying material; the proof then binds to
            // zeros, as the daemon expects (such daemons only listen on loopback).
            let join = |binding: Option<[u8; 32]>| Hello::Join {
                session,
                proof: join_proof(&secret, &binding.unwrap_or([0; 32])),
            };
            let (c, _, _) = dialer.greet(join).await?;
            Ok::<_, ClientError>(c)
        });
    }
    let addr = &dialer.addr;
    let mut out = Vec::with_capacity(n);
    let mut refused = None;
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(c)) => out.push(c),
            // The daemon's connection limit: work with the connections it allowed.
            Ok(Err(e @ ClientError::Refused { .. })) => refused = Some(e),
            Ok(Err(e)) => return Err(e),
            Err(e) => {
                return Err(ClientError::Connect {
                    addr: addr.to_string(),
                    source: std::io::Error::other(e.to_string()),
                })
            }
        }
    }
    match refused {
        Some(e) if out.is_empty() => Err(e),
        Some(e) => {
            tracing::debug!("{} of {n} data connections joined: {e}", out.len());
            Ok(out)
        }
        None => Ok(out),
    }
}

/// Open a session with its data connections and, in auto mode, grow it in the background.
/// The control connection proves the token; data connections prove the session's secret
/// over their own keying material and are pinned to the certificate the control connection
/// saw.
pub async fn open_session(
    remote: Remote<'_>,
    new: NewSession,
    connections: Connections,
    delivered: Delivered,
    patience: Option<Duration>,
) -> Result<Dialed, ClientError> {
    let wire = Arc::new(WireCounter::default());
    let seen = Arc::new(Mutex::new(None));
    let (addr, route, security) = match remote {
        Remote::Daemon { addr, security } => {
            let identity = security.tls.as_ref().and_then(|t| t.identity.as_deref());
            let tls = match &security.tls {
                Some(t) => Some(client_config(t.expected, identity, seen.clone())?),
                None => None,
            };
            (addr, Route::Tcp(tls), Some(security))
        }
        Remote::Ssh { dest, command } => {
            let mut command = command.clone();
            if let Some(path) = command
                .install
                .then(|| remote_install::remembered(&command, dest))
                .flatten()
            {
                command.remote_cutover = path;
            }
            (dest, Route::Ssh(Arc::new(command)), None)
        }
    };
    let mut dialer = Dialer {
        addr: addr.to_string(),
        route,
        wire: wire.clone(),
        patience,
    };
    let token = security.and_then(|s| s.token.clone());
    let hello_new = |binding: Option<[u8; 32]>| {
        let mut new = new.clone();
        // Over plaintext there is no keying material; the proof then binds to nothing
        // (such a daemon only listens on loopback).
        new.token_proof = token
            .as_ref()
            .map(|t| token_proof(t, &binding.unwrap_or([0; 32])));
        Hello::New(new)
    };
    let mut installed = None;
    let greeted = match dialer.greet(hello_new).await {
        Err(e) => match install_on_remote(&mut dialer, e).await {
            Ok(i) => {
                installed = Some(i);
                dialer.greet(hello_new).await
            }
            Err(e) => Err(e),
        },
        ok => ok,
    };
    let (control, session, secret) = match greeted {
        Ok(g) => g,
        Err(e) => {
            let shown = *seen.lock().unwrap_or_else(|p| p.into_inner());
            let expected = security
                .and_then(|s| s.tls.as_ref())
                .and_then(|t| t.expected);
            return Err(match (shown, expected) {
                (Some(seen), Some(expected)) if seen != expected => {
                    ClientError::FingerprintMismatch {
                        addr: addr.to_string(),
                        seen,
                        expected,
                    }
                }
                _ => e,
            });
        }
    };
    let server_fingerprint = *seen.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(tls) = security.and_then(|s| s.tls.as_ref()) {
        dialer.route = Route::Tcp(Some(client_config(
            server_fingerprint,
            tls.identity.as_deref(),
            Arc::new(Mutex::new(None)),
        )?));
    }
    let (tx, rx) = mpsc::channel(AUTO_MAX + 1);
    let start = match (connections, &dialer.route) {
        (Connections::Fixed(n), _) => n.max(1),
        (Connections::Auto, Route::Tcp(_)) => AUTO_START,
        (Connections::Auto, Route::Ssh(_)) => AUTO_START_SSH,
    };
    let mut control = control;
    let joined = match join_many(&dialer, session, secret, start).await {
        Ok(conns) => conns,
        // Every join refused: most likely the session ended at once on the daemon's side,
        // whose reason is on the control connection ("unknown session" would hide it).
        Err(refused @ ClientError::Refused { .. }) => {
            return Err(why_session_ended(&dialer.addr, &mut control)
                .await
                .unwrap_or(refused))
        }
        Err(e) => return Err(e),
    };
    for c in joined {
        let _ = tx.send(c).await;
    }
    if connections == Connections::Auto {
        tokio::spawn(async move { grow(dialer, session, secret, tx, start, delivered).await });
    }
    Ok(Dialed {
        control,
        data: rx,
        wire,
        server_fingerprint,
        installed,
    })
}

/// After the first ssh connection found no usable remote cutover: put this one on the
/// remote (or find it there) and dial every connection of the session with it. Any other
/// failure, or a command without `install`, is handed back as it was.
async fn install_on_remote(
    dialer: &mut Dialer,
    first: ClientError,
) -> Result<Installed, ClientError> {
    let Route::Ssh(cmd) = &dialer.route else {
        return Err(first);
    };
    if !cmd.install || !first.wants_remote_install() {
        return Err(first);
    }
    let installed = remote_install::ensure(cmd, &dialer.addr, dialer.patience).await?;
    let mut cmd = (**cmd).clone();
    cmd.remote_cutover = installed.path.clone();
    dialer.route = Route::Ssh(Arc::new(cmd));
    Ok(installed)
}

/// The reason a daemon gave on the control connection for ending a session, if it gives
/// one soon.
async fn why_session_ended(addr: &str, control: &mut Conn) -> Option<ClientError> {
    let read = async {
        loop {
            match control.reader.recv().await {
                Ok(Some(proto::Msg::Fatal { message })) => return Some(message),
                Ok(Some(_)) => continue,
                _ => return None,
            }
        }
    };
    let reason = tokio::time::timeout(WHY_ENDED_WAIT, read).await.ok()??;
    Some(ClientError::SessionFailed {
        addr: addr.to_string(),
        reason,
    })
}

/// How long a client waits for a daemon's reason after its joins were refused.
const WHY_ENDED_WAIT: Duration = Duration::from_secs(2);

/// Double the data connections while each doubling still raises the delivered rate.
async fn grow(
    dialer: Dialer,
    session: u64,
    secret: [u8; 16],
    tx: mpsc::Sender<Conn>,
    mut count: usize,
    delivered: Delivered,
) {
    let mut last = delivered();
    // Nothing flowing (scanning, hashing, or a delta with little to send): no verdict.
    let mut rule = crate::growth::Doubling::new(AUTO_GAIN, AUTO_IDLE_RATE);
    loop {
        tokio::time::sleep(AUTO_STEP).await;
        if tx.is_closed() {
            return;
        }
        let now = delivered();
        let rate = now.saturating_sub(last) as f64 / AUTO_STEP.as_secs_f64();
        last = now;
        match rule.step(rate) {
            crate::growth::Step::Wait => continue,
            crate::growth::Step::Stop => {
                tracing::debug!(count, rate, "auto connections: rate stopped rising");
                return;
            }
            crate::growth::Step::Grow => {}
        }
        let more = count.min(AUTO_MAX - count);
        if more == 0 {
            return;
        }
        match join_many(&dialer, session, secret, more).await {
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
        tracing::debug!(count, rate, "auto connections: opened more");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_missing_remote_cutover_or_another_version_asks_for_an_install() {
        let missing = ClientError::NoRemoteCutover("h: the remote has no \"cutover\"".into());
        assert!(missing.wants_remote_install());
        let other_version = ClientError::Refused {
            addr: "h".into(),
            reason: format!("{}3 is not supported", proto::VERSION_REFUSAL),
        };
        assert!(other_version.wants_remote_install());
        let other_refusal = ClientError::Refused {
            addr: "h".into(),
            reason: "unknown session".into(),
        };
        assert!(!other_refusal.wants_remote_install());
        assert!(!ClientError::Ssh("h: ssh failed: refused".into()).wants_remote_install());
    }
}
