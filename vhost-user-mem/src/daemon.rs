//! The serve loop: one listening socket, one frontend at a time, listening again after each
//! disconnect with the same [`SharedBackend`], so the balloon state outlives connections.
//! The control API ([`Daemon::start_api`]) runs beside it on its own threads.

use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tracing::{info, warn};
use vhost::vhost_user::{Error as VhostUserError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

use crate::api::{ApiLimits, ApiServer};
use crate::backend::{lock, SharedBackend};
use crate::error::{Error, Result};

/// What the daemon runs with, validated (the binary builds it from its arguments).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonConfig {
    /// Path of the vhost-user socket the daemon listens on (replaced if it exists).
    pub socket: PathBuf,
    /// Path of the control API socket (mode 0600, replaced if it exists), if any.
    pub api_socket: Option<PathBuf>,
    /// Most verbose level logged.
    pub log_level: tracing::Level,
}

/// A listening vhost-user balloon daemon.
pub struct Daemon {
    listener: Listener,
    backend: SharedBackend,
    /// Whether a frontend is being served now (the control API reports it).
    connected: Arc<AtomicBool>,
}

impl Daemon {
    /// Binds `socket` (removing a stale one first). Once this returns, frontends can connect:
    /// they wait in the listen backlog until [`Daemon::serve_one`] accepts them.
    pub fn bind(socket: &Path, backend: SharedBackend) -> Result<Self> {
        let listener = Listener::new(socket, true).map_err(Error::Listener)?;
        Ok(Daemon {
            listener,
            backend,
            connected: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Starts the control API on `socket` for this daemon's backend; it serves on its own
    /// threads until the returned server is dropped. `Err(Error::ApiSocket)` if the socket
    /// cannot be created.
    pub fn start_api(&self, socket: &Path) -> Result<ApiServer> {
        ApiServer::start(
            socket,
            self.backend.clone(),
            Some(Arc::clone(&self.connected)),
            ApiLimits::default(),
        )
    }

    /// The backend the daemon serves.
    pub fn backend(&self) -> &SharedBackend {
        &self.backend
    }

    /// Accepts one frontend and serves it until it disconnects or breaks the protocol; either
    /// way the connection's end is logged and `Ok(())` returned. `Err` only if the daemon
    /// cannot accept or start (the socket or a thread failed).
    pub fn serve_one(&mut self) -> Result<()> {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new("vhost-user-mem".into(), self.backend.clone(), mem)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        daemon
            .start(&mut self.listener)
            .map_err(|e| Error::Daemon(e.to_string()))?;
        info!("frontend connected");
        self.connected.store(true, Ordering::Release);
        let result = daemon.wait();
        self.connected.store(false, Ordering::Release);
        // Dropping the daemon stops and joins its queue worker threads.
        drop(daemon);
        lock(&self.backend).connection_closed();
        match result {
            Ok(())
            | Err(DaemonError::HandleRequest(
                VhostUserError::Disconnected | VhostUserError::PartialMessage,
            )) => info!("frontend disconnected"),
            Err(e) => warn!(error = %e, "connection ended: frontend broke the protocol"),
        }
        Ok(())
    }

    /// Serves frontends one after another, forever.
    pub fn run(&mut self) -> Result<Infallible> {
        loop {
            self.serve_one()?;
        }
    }
}
