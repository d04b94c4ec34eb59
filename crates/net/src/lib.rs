//! Transports: a `Conn` carries `Msg`s both ways, either framed over a byte stream (TLS over
//! TCP, plaintext TCP on loopback, ssh stdio later) or as values over in-process channels
//! (local-to-local sync, so the very same engine runs with no serialisation cost). Also TLS
//! identities and pinning, known-hosts files, the session-wide rate limiter, and installing
//! this binary on an ssh remote that has none.

pub mod client;
pub mod conn;
pub mod growth;
pub mod known_hosts;
pub mod limit;
pub mod remote_install;
pub mod secure;
pub mod ssh;
pub mod tls;
mod tls_io;

pub use conn::{memory_pair, Conn, ConnError, MsgReader, MsgWriter};
pub use limit::RateLimiter;
