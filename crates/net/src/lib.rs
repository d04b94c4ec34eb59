//! Transports: a `Conn` carries `Msg`s both ways, either framed over a byte stream (TCP now,
//! TLS and ssh stdio later) or as values over in-process channels (local-to-local sync, so the
//! very same engine runs with no serialisation cost). Also the session-wide rate limiter.

pub mod client;
pub mod conn;
pub mod limit;

pub use conn::{memory_pair, Conn, ConnError, MsgReader, MsgWriter};
pub use limit::RateLimiter;
