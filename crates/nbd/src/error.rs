//! The crate's error type: why a connection ended other than by the client's choice.
//! Errors a client can be told about (a refused option, a failed request) are replies, not
//! `Error`s; these end the connection.

use std::io;

/// Why serving a connection stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NBD connection i/o: {0}")]
    Io(#[from] io::Error),
    #[error("NBD client sent magic {0:#x} where {1} was due")]
    BadMagic(u64, &'static str),
    #[error("NBD client set unknown client flags {0:#x}")]
    ClientFlags(u32),
    #[error("NBD option {option} of {length} bytes is too long to skip")]
    OptionTooLong { option: u32, length: u32 },
    #[error("NBD client closed the connection: {0}")]
    Closed(&'static str),
    #[error("NBD handshake not finished within {0:?}")]
    HandshakeTimeout(std::time::Duration),
    #[error("NBD protocol violation: {0}")]
    Protocol(&'static str),
    #[error("no NBD exports to serve")]
    NoExports,
}
