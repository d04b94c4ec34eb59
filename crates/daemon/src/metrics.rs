//! `cutover serve`'s metrics for monitoring: an opt-in listener (`metrics_listen`) that
//! answers `GET /metrics` in the Prometheus text exposition format (version 0.0.4), over
//! plain HTTP on a loopback address or over HTTPS with the daemon's own certificate
//! (`metrics_tls`, required anywhere else: the metrics name volumes and peers).
//!
//! Nothing is sampled in the background: each scrape reads what `cutover volume status`
//! reads (`control::status_of`), the NBD exports' write latency histograms, and the
//! daemon's session and authentication counters ([`DaemonCounters`]), then encodes them
//! (`families.rs`) with the official Prometheus client's text encoder. hyper serves the
//! HTTP/1.1.

use crate::volumes::{Hosted, Volumes};
use crate::Config;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use proto::WireCounter;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

mod families;

/// Connections served at once; more are closed at once (a scraper needs one).
const MAX_CONNECTIONS: usize = 16;
/// Time a client has to send its request headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a connection stays open, keep-alive included (Prometheus reconnects).
const CONNECTION_TIME: Duration = Duration::from_secs(60);

/// Check `metrics_listen` and `metrics_tls` as the config gives them: an `IP:PORT`, and
/// TLS unless the address is loopback. The error is one line naming the key and the fix.
pub(crate) fn check_config(listen: Option<&str>, tls: bool) -> Result<Option<SocketAddr>, String> {
    let Some(text) = listen else {
        if tls {
            return Err(
                "metrics_tls = true but metrics_listen is not set; add metrics_listen = \"IP:PORT\" (e.g. \"0.0.0.0:9464\") or remove metrics_tls".into(),
            );
        }
        return Ok(None);
    };
    let addr: SocketAddr = text
        .parse()
        .map_err(|_| format!("metrics_listen = {text:?}: give IP:PORT, e.g. \"127.0.0.1:9464\""))?;
    if !addr.ip().is_loopback() && !tls {
        return Err(format!(
            "metrics_listen = {text:?} is not a loopback address and plain HTTP would show the metrics to the network: set metrics_tls = true (HTTPS with the daemon's certificate) or listen on 127.0.0.1"
        ));
    }
    Ok(Some(addr))
}

/// The daemon's session and authentication counters, shared by its accept loop
/// (`lib.rs`, `peering.rs`) and the metrics listener.
#[derive(Debug, Default)]
pub struct DaemonCounters {
    /// Sync sessions open now, and opened since the daemon started.
    pub(crate) sessions_active: AtomicU64,
    pub(crate) sessions_total: AtomicU64,
    /// Sessions, joins and peer links refused for what they proved (a wrong token, an
    /// unknown client or peer certificate, a wrong join proof).
    pub(crate) auth_failures: AtomicU64,
    /// Connections whose TLS handshake failed or was refused.
    pub(crate) tls_failures: AtomicU64,
    wires: Mutex<Wires>,
}

/// The byte counters of session connections: those still open, and what the closed ones
/// carried. A connection's counter is shared with its reader and writer, so once only this
/// list holds it the connection is gone and its totals are final.
#[derive(Debug, Default)]
struct Wires {
    open: Vec<Arc<WireCounter>>,
    closed_sent: u64,
    closed_received: u64,
}

impl Wires {
    fn fold_closed(&mut self) {
        let (mut sent, mut received) = (0, 0);
        self.open.retain(|w| {
            let open = Arc::strong_count(w) > 1;
            if !open {
                sent += w.sent.load(Ordering::Relaxed);
                received += w.received.load(Ordering::Relaxed);
            }
            open
        });
        self.closed_sent += sent;
        self.closed_received += received;
    }
}

impl DaemonCounters {
    /// Count the bytes of a connection that turned out to belong to a sync session.
    pub(crate) fn track_session_wire(&self, wire: Arc<WireCounter>) {
        let mut w = self.wires();
        w.fold_closed();
        w.open.push(wire);
    }

    /// Bytes sent and received by sync session connections since the daemon started.
    fn session_bytes(&self) -> (u64, u64) {
        let mut w = self.wires();
        w.fold_closed();
        w.open
            .iter()
            .fold((w.closed_sent, w.closed_received), |(s, r), c| {
                (
                    s + c.sent.load(Ordering::Relaxed),
                    r + c.received.load(Ordering::Relaxed),
                )
            })
    }

    /// The list; a panic elsewhere while holding it leaves it usable.
    fn wires(&self) -> std::sync::MutexGuard<'_, Wires> {
        self.wires.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics_listen = \"{addr}\": cannot listen: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("metrics_tls: {0}")]
    Tls(#[from] net::tls::TlsError),
}

/// The running metrics listener; dropping it stops it.
pub struct MetricsListener {
    local: SocketAddr,
    tls: bool,
    task: JoinHandle<()>,
}

impl MetricsListener {
    /// Where to scrape, e.g. `http://127.0.0.1:9464/metrics`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}/metrics", self.local)
    }
}

impl Drop for MetricsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What a scrape reads.
struct Sources {
    hosted: Arc<[Arc<Hosted>]>,
    counters: Arc<DaemonCounters>,
}

/// Start the metrics listener `config` asks for (none without `metrics_listen`).
pub async fn start(
    config: &Config,
    identity: &net::tls::Identity,
    volumes: &Volumes,
    counters: Arc<DaemonCounters>,
) -> Result<Option<MetricsListener>, MetricsError> {
    // `Config::parse` checked the address already; this only finds it again.
    let Ok(Some(addr)) = check_config(config.metrics_listen.as_deref(), config.metrics_tls) else {
        return Ok(None);
    };
    let tls = match config.metrics_tls {
        true => Some(tokio_rustls::TlsAcceptor::from(
            net::tls::https_server_config(identity)?,
        )),
        false => None,
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| MetricsError::Bind { addr, source })?;
    let sources = Arc::new(Sources {
        hosted: volumes.hosted(),
        counters,
    });
    Ok(Some(MetricsListener {
        local,
        tls: tls.is_some(),
        task: tokio::spawn(accept_loop(listener, tls, sources)),
    }))
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    sources: Arc<Sources>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "metrics: {MAX_CONNECTIONS} connections open; closed another");
            continue;
        };
        let (tls, sources) = (tls.clone(), sources.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let served = tokio::time::timeout(CONNECTION_TIME, async {
                match tls {
                    None => serve_http(TokioIo::new(stream), sources).await,
                    Some(acceptor) => match acceptor.accept(stream).await {
                        Ok(s) => serve_http(TokioIo::new(s), sources).await,
                        Err(e) => tracing::debug!(%peer, "metrics: TLS handshake failed: {e}"),
                    },
                }
            });
            let _ = served.await;
        });
    }
}

/// Serve HTTP/1.1 requests on one connection.
async fn serve_http<I>(io: I, sources: Arc<Sources>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let sources = sources.clone();
        async move { Ok::<_, std::convert::Infallible>(respond(&req, sources).await) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .serve_connection(io, service)
        .await;
    if let Err(e) = served {
        tracing::debug!("metrics: connection ended: {e}");
    }
}

/// `GET /metrics` (or `HEAD`); anything else is 404 or 405 with a line saying what is.
async fn respond(req: &Request<Incoming>, sources: Arc<Sources>) -> Response<String> {
    let plain = |status: StatusCode, text: &str| {
        let mut r = Response::new(format!("{text}\n"));
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return plain(
            StatusCode::NOT_FOUND,
            "not found: the metrics are at /metrics",
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET");
        r.headers_mut().insert(
            hyper::header::ALLOW,
            hyper::header::HeaderValue::from_static("GET, HEAD"),
        );
        return r;
    }
    // Status takes the volumes' locks: off the async threads, as the control socket does.
    let text =
        tokio::task::spawn_blocking(move || families::scrape(&sources.hosted, &sources.counters))
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
    match text {
        Ok(body) => {
            let mut r = Response::new(body);
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                ),
            );
            r
        }
        Err(e) => {
            tracing::warn!("metrics: scrape failed: {e}");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                &format!("scrape failed: {e}"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_address_is_checked_in_one_line() {
        assert_eq!(check_config(None, false), Ok(None));
        let ok = check_config(Some("127.0.0.1:9464"), false).unwrap();
        assert_eq!(ok, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(check_config(Some("[::1]:9464"), false).is_ok());
        assert!(check_config(Some("0.0.0.0:9464"), true).is_ok());
        for (listen, tls, words) in [
            (Some("0.0.0.0:9464"), false, "metrics_tls = true"),
            (Some("localhost:9464"), false, "IP:PORT"),
            (None, true, "metrics_listen is not set"),
        ] {
            let e = check_config(listen, tls).unwrap_err();
            assert!(e.contains(words) && !e.contains('\n'), "{e}");
        }
    }

    #[test]
    fn session_bytes_survive_their_connections() {
        let c = DaemonCounters::default();
        let (a, b) = (
            Arc::new(WireCounter::default()),
            Arc::new(WireCounter::default()),
        );
        c.track_session_wire(a.clone());
        c.track_session_wire(b.clone());
        a.sent.fetch_add(10, Ordering::Relaxed);
        b.received.fetch_add(7, Ordering::Relaxed);
        assert_eq!(c.session_bytes(), (10, 7));
        drop(a);
        assert_eq!(c.session_bytes(), (10, 7));
        assert_eq!(c.wires().open.len(), 1);
        b.sent.fetch_add(1, Ordering::Relaxed);
        drop(b);
        assert_eq!(c.session_bytes(), (11, 7));
        assert!(c.wires().open.is_empty());
    }
}
