//! `GET`, `PUT` and `DELETE /api/v1/page-server`: one lazy page server
//! ([`crate::page_server`], what `vhost-user-mem serve` runs) inside the daemon process, for
//! example for a snapshot the daemon has just written.
//!
//! The server validates the snapshot and binds its socket before `PUT` answers, so a refused
//! snapshot leaves nothing running and no socket. It serves on its own threads, never under
//! the backend lock, and stops on `DELETE` or when the control API stops (with the daemon).
//! `DELETE` stops accepting new VMs; sessions already serving a VM go on until that VMM hangs
//! up, since cutting them would leave its guest's faults unserved.

use std::fs;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use ext_snapshot::PageType;

use super::{error_chain, json, named_file, parse, Refusal, Reply};
use crate::api::types::{PageServerRequest, PageServerStatus};
use crate::api::ApiContext;
use crate::page_server::{self, PageServer, RunningServer, ServeConfig};

/// Where the API keeps its page server.
#[derive(Default)]
pub(crate) struct PageServerSlot {
    slot: Mutex<Slot>,
}

#[derive(Default)]
enum Slot {
    #[default]
    Idle,
    /// A `PUT` is validating the snapshot and binding the socket (without the lock: checking
    /// every checksum of a large snapshot takes a while).
    Starting,
    Running(Box<Started>),
}

/// A page server the API started.
struct Started {
    config: ServeConfig,
    server: RunningServer,
    snapshot_id: String,
    data_pages: u64,
    started_at: SystemTime,
}

impl Started {
    fn status(&self) -> PageServerStatus {
        PageServerStatus {
            running: self.server.is_running(),
            snapshot: Some(self.config.snapshot.clone()),
            socket: Some(self.config.socket.clone()),
            prefault: self.config.prefault,
            snapshot_id: Some(self.snapshot_id.clone()),
            data_pages: Some(self.data_pages),
            started_at_unix_ms: self
                .started_at
                .duration_since(UNIX_EPOCH)
                .ok()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            counters: Some(self.server.counters()),
        }
    }

    /// Stops accepting and removes the socket; a failed accept loop is logged.
    fn stop(self) {
        let socket = self.config.socket.display().to_string();
        match self.server.stop() {
            Ok(()) => tracing::info!(socket, "page server stopped"),
            Err(e) => tracing::warn!(socket, error = %e, "the page server had failed"),
        }
    }
}

impl PageServerSlot {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn idle() -> PageServerStatus {
    PageServerStatus {
        running: false,
        snapshot: None,
        socket: None,
        prefault: false,
        snapshot_id: None,
        data_pages: None,
        started_at_unix_ms: None,
        counters: None,
    }
}

pub(super) fn status(context: &ApiContext, _body: &[u8]) -> Result<Reply, Refusal> {
    let status = match &*context.page_server.lock() {
        Slot::Running(started) => started.status(),
        Slot::Idle | Slot::Starting => idle(),
    };
    json(&status)
}

pub(super) fn start(context: &ApiContext, body: &[u8]) -> Result<Reply, Refusal> {
    let request: PageServerRequest = parse(body)?;
    let snapshot = named_file(
        ("snapshot_url", request.snapshot_url),
        ("snapshot", request.snapshot),
    )?;
    for (field, path) in [("snapshot", &snapshot), ("socket", &request.socket)] {
        if !path.is_absolute() {
            return Err(Refusal::new(
                400,
                format!("{field} {} is not an absolute path", path.display()),
            ));
        }
    }
    let config = ServeConfig {
        snapshot,
        socket: request.socket,
        prefault: request.prefault,
    };
    {
        let mut slot = context.page_server.lock();
        match &*slot {
            Slot::Running(started) if started.server.is_running() => {
                return Err(Refusal::new(
                    409,
                    format!(
                        "a page server runs already (on {}): DELETE it first",
                        started.config.socket.display()
                    ),
                ))
            }
            Slot::Starting => return Err(Refusal::new(409, "a page server is being started")),
            Slot::Running(_) | Slot::Idle => {}
        }
        // One whose accept loop failed is replaced.
        if let Slot::Running(dead) = std::mem::replace(&mut *slot, Slot::Starting) {
            dead.stop();
        }
    }
    let launched = launch(&config);
    let mut slot = context.page_server.lock();
    match launched {
        Ok(started) => {
            let status = started.status();
            *slot = Slot::Running(Box::new(started));
            drop(slot);
            tracing::info!(
                snapshot = %config.snapshot.display(),
                socket = %config.socket.display(),
                prefault = config.prefault,
                "page server started by the API"
            );
            json(&status)
        }
        Err(refusal) => {
            *slot = Slot::Idle;
            Err(refusal)
        }
    }
}

/// Validates the snapshot, binds the socket and starts serving.
fn launch(config: &ServeConfig) -> Result<Started, Refusal> {
    refuse_live_socket(&config.socket)?;
    let server = PageServer::bind(config).map_err(|e| refusal(&e))?;
    let snapshot_id = server.snapshot().header().id.to_string();
    let data_pages = server.snapshot().pages_by_type()[PageType::Data as usize];
    let server = server.spawn().map_err(|e| {
        // The listener is gone with the server that could not spawn; its file is not.
        let _ = fs::remove_file(&config.socket);
        refusal(&e)
    })?;
    Ok(Started {
        config: config.clone(),
        server,
        snapshot_id,
        data_pages,
        started_at: SystemTime::now(),
    })
}

/// Refuses a socket path someone listens on: the page server would replace it (it replaces
/// stale sockets), taking the path from this daemon's own sockets or another server.
fn refuse_live_socket(socket: &Path) -> Result<(), Refusal> {
    let is_socket = fs::symlink_metadata(socket).is_ok_and(|meta| meta.file_type().is_socket());
    if is_socket && UnixStream::connect(socket).is_ok() {
        return Err(Refusal::new(
            409,
            format!(
                "socket {}: something listens there already; stop it or choose another path",
                socket.display()
            ),
        ));
    }
    Ok(())
}

/// A page server error as the API answers it: 400 for a snapshot that cannot be served or a
/// socket path that cannot be used, 500 for the rest.
fn refusal(error: &page_server::Error) -> Refusal {
    let status = match error {
        page_server::Error::Snapshot { .. } | page_server::Error::SocketPath { .. } => 400,
        _ => 500,
    };
    let mut messages = vec!["cannot start the page server".to_string()];
    messages.extend(error_chain(error));
    Refusal { status, messages }
}

pub(super) fn stop(context: &ApiContext, _body: &[u8]) -> Result<Reply, Refusal> {
    let mut slot = context.page_server.lock();
    match std::mem::take(&mut *slot) {
        // Stopped under the lock: a `PUT` meanwhile could bind the same path, whose socket
        // file this stop removes.
        Slot::Running(started) => {
            started.stop();
            Ok(Reply::Done)
        }
        Slot::Starting => {
            *slot = Slot::Starting;
            Err(Refusal::new(409, "a page server is being started"))
        }
        Slot::Idle => Err(Refusal::new(409, "no page server runs")),
    }
}
