//! Fault injection for cutover (not shipped): real processes started and killed on purpose.
//! `procs` starts the real daemon, the WAN emulator as a byte-counting relay, and syncs;
//! `kills` is the driver that SIGKILLs them at random moments and checks, with rsync as the
//! oracle, that every interrupted sync finishes exact on a rerun and how much it sent again;
//! `replication` kills the daemons of a replicated volume and checks both copies end
//! identical, and what the restart cost in resync.

pub mod kills;
pub mod procs;
pub mod replication;

/// What can go wrong while driving faults (the faults themselves are expected).
#[derive(Debug, thiserror::Error)]
pub enum FaultError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

impl FaultError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> FaultError {
        let what = what.into();
        move |source| FaultError::Io { what, source }
    }
}
