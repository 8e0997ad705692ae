//! The lazy page server: guest memory of VMs restored on demand, served out of process from one
//! ext-snapshot file.
//!
//! `vhost-user-mem serve --snapshot <file> --socket <path>` ([`run`]) validates the snapshot
//! and listens. A restoring VMM maps fresh memory, registers it with a userfaultfd in missing
//! mode and hands the userfaultfd and its region table to the server ([`client`]; the
//! handshake is `PAGE_SERVER.md`, versioned). The server then answers the VMM's page faults
//! with ext-snapshot's fault loop ([`ext_snapshot::restore::lazy::FaultHandler`]): data pages
//! copied, in batches of up to 2 MiB where faults are sequential, after their extent's
//! checksum was checked; every other page gets the zero page on fault; nothing is copied in
//! the background unless [`ServeConfig::prefault`] asks for it.
//!
//! A failure (a corrupt extent, a userfaultfd error) ends serving that VM with an error
//! message on its connection — its faults stay blocked, never a silent zero page — and the
//! server goes on with other VMs.

pub mod client;
mod counters;
mod error;
pub mod protocol;
mod server;

use std::convert::Infallible;
use std::path::PathBuf;

pub use counters::ServerCounters;
pub use error::{Error, Result};
pub use server::{PageServer, RunningServer, HELLO_TIMEOUT, MAX_COPY_PAGES};

/// What `vhost-user-mem serve` serves, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServeConfig {
    /// The ext-snapshot file (a full snapshot; a diff needs its chain merged first).
    pub snapshot: PathBuf,
    /// The unix socket restoring VMMs connect to (created with mode 0600, replaced if stale).
    pub socket: PathBuf,
    /// Copy every data page in the background too, not only on fault.
    pub prefault: bool,
}

/// Validates the snapshot, binds the socket and serves restoring VMMs until the listening
/// socket fails. `Err` at start for a snapshot that cannot be served (unreadable, truncated,
/// damaged, a diff) or a socket that cannot be bound.
pub fn run(config: ServeConfig) -> Result<Infallible> {
    PageServer::bind(&config)?.serve()
}
