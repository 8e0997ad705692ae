//! The API server: owns the unix socket, accepts connections and serves each on its own
//! thread, so a slow or silent client delays nobody else.
//!
//! Backend calls are serialized (one request at a time reaches the [`RequestHandler`], as in Cloud
//! Hypervisor's single API thread), so a VMM does not have to cope with a pause racing a
//! resume.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::action::RequestHandler;
use crate::http::{encode_response, Connection, ReadOutcome, Response};
use crate::routes::dispatch;

/// epoll token of the listening socket.
const LISTENER_TOKEN: u64 = 0;
/// epoll token of the stop event.
const STOP_TOKEN: u64 = 1;
/// Mode of the API socket: only the VMM's user may connect (`connect` needs write access).
const SOCKET_MODE: u32 = 0o600;

/// Limits that keep one client from exhausting the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiServerLimits {
    /// Largest request line plus headers; larger heads get `431`.
    pub max_header_bytes: usize,
    /// Largest request body; larger bodies get `413`.
    pub max_body_bytes: usize,
    /// How long a connection may sit between requests before the server closes it.
    pub idle_timeout: Duration,
    /// How long a request may take to arrive once its first byte has (answered `408` after).
    pub request_timeout: Duration,
    /// Connections served at once; further ones get `503` and are closed.
    pub max_connections: usize,
}

impl Default for ApiServerLimits {
    fn default() -> Self {
        ApiServerLimits {
            max_header_bytes: 8 << 10,
            max_body_bytes: 128 << 10,
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            max_connections: 16,
        }
    }
}

/// Why the API server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ApiServerError {
    /// Another process is accepting connections on the socket path.
    #[error("another process is serving on {0}")]
    SocketInUse(PathBuf),
    /// Something other than a socket exists at the path; it is left alone.
    #[error("{0} exists and is not a unix socket")]
    NotASocket(PathBuf),
    /// Inspecting or removing a stale socket failed.
    #[error("cannot remove stale socket {path}: {source}")]
    RemoveStale {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// `bind` failed.
    #[error("cannot bind API socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Restricting the socket to mode 0600 failed.
    #[error("cannot set mode 0600 on API socket {path}: {source}")]
    Permissions {
        /// The socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// Creating the epoll set, the stop event or the server thread failed.
    #[error("cannot set up the API server: {0}")]
    Setup(#[source] io::Error),
}

/// A running API server. [`ApiServer::shutdown`] or dropping it stops the server threads and
/// removes the socket.
#[derive(Debug)]
pub struct ApiServer {
    socket_path: PathBuf,
    /// Device and inode of the socket we bound, so that we never delete a socket that
    /// someone else created at the same path after us.
    socket_identity: (u64, u64),
    stop: Arc<EventFd>,
    acceptor: Option<JoinHandle<()>>,
}

/// Starts serving the API on `socket_path` with [`ApiServerLimits::default`].
///
/// # Errors
/// As [`start_api_server_with_limits`].
pub fn start_api_server(
    socket_path: &Path,
    backend: Arc<dyn RequestHandler>,
) -> Result<ApiServer, ApiServerError> {
    start_api_server_with_limits(socket_path, backend, ApiServerLimits::default())
}

/// Starts serving the API on `socket_path` with the given limits.
///
/// A socket file left behind by a dead process is replaced; a live one (something accepts
/// connections on it) makes this fail with [`ApiServerError::SocketInUse`]. The socket has mode
/// 0600 before the first connection is accepted.
///
/// # Errors
/// [`ApiServerError::SocketInUse`] or [`ApiServerError::NotASocket`] when the path is taken;
/// the other variants when a system call fails (nothing is left behind at the path then).
pub fn start_api_server_with_limits(
    socket_path: &Path,
    backend: Arc<dyn RequestHandler>,
    limits: ApiServerLimits,
) -> Result<ApiServer, ApiServerError> {
    remove_stale_socket(socket_path)?;
    let listener = bind_private(socket_path).map_err(|source| ApiServerError::Bind {
        path: socket_path.to_path_buf(),
        source,
    })?;
    // Already 0600 from the bind; set explicitly so the mode does not depend on how the
    // filesystem applied the umask.
    let restrict = fs::set_permissions(socket_path, fs::Permissions::from_mode(SOCKET_MODE))
        .and_then(|()| fs::metadata(socket_path));
    let metadata = match restrict {
        Ok(metadata) => metadata,
        Err(source) => {
            let _ = fs::remove_file(socket_path);
            return Err(ApiServerError::Permissions {
                path: socket_path.to_path_buf(),
                source,
            });
        }
    };
    let socket_identity = (metadata.dev(), metadata.ino());
    let started = Acceptor::new(listener, backend, limits).and_then(|acceptor| {
        let stop = Arc::clone(&acceptor.stop);
        let thread = thread::Builder::new()
            .name("ext-api".to_string())
            .spawn(move || acceptor.run())?;
        Ok((stop, thread))
    });
    match started {
        Ok((stop, thread)) => Ok(ApiServer {
            socket_path: socket_path.to_path_buf(),
            socket_identity,
            stop,
            acceptor: Some(thread),
        }),
        Err(err) => {
            let _ = fs::remove_file(socket_path);
            Err(ApiServerError::Setup(err))
        }
    }
}

impl ApiServer {
    /// The path of the socket being served.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Stops accepting, closes every connection, waits for the server threads and removes
    /// the socket. A request already inside the backend finishes and its response is sent
    /// first, so a VMM may call this as soon as [`RequestHandler::handle`] (for `vmm.shutdown`) has signalled
    /// it. Must not be called from inside a [`RequestHandler`] method (that thread would wait
    /// for itself).
    pub fn shutdown(mut self) {
        self.stop_and_clean_up();
    }

    fn stop_and_clean_up(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        if let Err(err) = self.stop.write(1) {
            // Without the event the thread never returns; leave it rather than hang.
            tracing::error!("cannot signal the API server to stop: {err}");
        } else if acceptor.join().is_err() {
            tracing::error!("the API server thread panicked");
        }
        let ours = fs::symlink_metadata(&self.socket_path)
            .is_ok_and(|m| (m.dev(), m.ino()) == self.socket_identity);
        if ours {
            if let Err(err) = fs::remove_file(&self.socket_path) {
                tracing::warn!(
                    "cannot remove API socket {}: {err}",
                    self.socket_path.display()
                );
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_and_clean_up();
    }
}

/// Binds `path` with the umask set to 0177, so the socket is created with mode 0600. A chmod
/// after `bind` alone would leave a moment in which another user could connect (permission
/// is checked at `connect`, and such a connection would wait in the backlog to be accepted).
/// The umask is process-wide: a file another thread creates during these two calls gets a
/// more restrictive mode, never a more permissive one.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    // SAFETY: umask only swaps the process's file-creation mask; it reads or writes no memory
    // of ours and cannot fail.
    let previous = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above; this restores the mask the process had.
    unsafe { libc::umask(previous) };
    bound
}

/// Removes a socket file nobody listens on; refuses to touch anything else.
fn remove_stale_socket(path: &Path) -> Result<(), ApiServerError> {
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(ApiServerError::RemoveStale {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    if !metadata.file_type().is_socket() {
        return Err(ApiServerError::NotASocket(path.to_path_buf()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(ApiServerError::SocketInUse(path.to_path_buf())),
        Err(err) if err.kind() == io::ErrorKind::ConnectionRefused => fs::remove_file(path)
            .map_err(|source| ApiServerError::RemoveStale {
                path: path.to_path_buf(),
                source,
            }),
        Err(source) => Err(ApiServerError::RemoveStale {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// A connection being served, and what is needed to end it early.
struct Client {
    /// A second handle on the socket, to wake the thread's blocking read at shutdown.
    stream: UnixStream,
    thread: JoinHandle<()>,
}

/// The accepting thread's state.
struct Acceptor {
    listener: UnixListener,
    epoll: Epoll,
    stop: Arc<EventFd>,
    backend: Arc<dyn RequestHandler>,
    /// Held across each backend call so that calls never overlap.
    backend_lock: Arc<Mutex<()>>,
    limits: ApiServerLimits,
    clients: Vec<Client>,
}

impl Acceptor {
    fn new(
        listener: UnixListener,
        backend: Arc<dyn RequestHandler>,
        limits: ApiServerLimits,
    ) -> io::Result<Self> {
        // Non-blocking so that draining the accept queue after a wake-up never blocks.
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            stop.as_raw_fd(),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        Ok(Acceptor {
            listener,
            epoll,
            stop,
            backend,
            backend_lock: Arc::new(Mutex::new(())),
            limits,
            clients: Vec::new(),
        })
    }

    fn run(mut self) {
        let mut events = [EpollEvent::default(); 2];
        'serve: loop {
            let ready = match self.epoll.wait(-1, &mut events) {
                Ok(ready) => ready,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    tracing::error!("API server epoll failed, stopping: {err}");
                    break;
                }
            };
            for event in &events[..ready] {
                match event.data() {
                    STOP_TOKEN => break 'serve,
                    _ => self.accept_pending(),
                }
            }
        }
        // Only the read side: blocked reads return end-of-stream, while a response still
        // being produced (say, the 204 to the `vmm.shutdown` that led to this stop) is sent.
        for client in &self.clients {
            let _ = client.stream.shutdown(std::net::Shutdown::Read);
        }
        for client in self.clients.drain(..) {
            if client.thread.join().is_err() {
                tracing::error!("an API connection thread panicked");
            }
        }
    }

    fn accept_pending(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _addr)) => stream,
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => {
                    // E.g. EMFILE: keep serving the connections we have.
                    tracing::warn!("API accept failed: {err}");
                    return;
                }
            };
            self.clients.retain(|client| !client.thread.is_finished());
            if self.clients.len() >= self.limits.max_connections {
                refuse_busy(stream, self.limits.max_connections);
                continue;
            }
            if let Err(err) = self.spawn_client(stream) {
                tracing::warn!("cannot serve an API connection: {err}");
            }
        }
    }

    fn spawn_client(&mut self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        let wake_handle = stream.try_clone()?;
        let connection = Connection::new(stream, self.limits);
        let backend = Arc::clone(&self.backend);
        let backend_lock = Arc::clone(&self.backend_lock);
        let thread = thread::Builder::new()
            .name("ext-api-conn".to_string())
            .spawn(move || serve_connection(connection, backend.as_ref(), &backend_lock))?;
        self.clients.push(Client {
            stream: wake_handle,
            thread,
        });
        Ok(())
    }
}

fn refuse_busy(mut stream: UnixStream, max_connections: usize) {
    let response = Response::error(
        503,
        &[format!(
            "the API server already serves {max_connections} connections"
        )],
    );
    // Best effort, and bounded: the accepting thread must not wait on this client.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = stream.write_all(&encode_response(&response, false));
}

/// Serves requests on one connection until the client closes it, asks to, or errs.
fn serve_connection(
    mut connection: Connection,
    backend: &dyn RequestHandler,
    backend_lock: &Mutex<()>,
) {
    loop {
        let request = match connection.read_request() {
            ReadOutcome::Request(request) => request,
            ReadOutcome::Closed => return,
            ReadOutcome::Refused(response) => {
                tracing::debug!("refusing an API request: {}", response.status);
                connection.refuse_and_close(&response);
                return;
            }
        };
        let response = {
            // A backend that panicked left no broken state in `()`; keep serving.
            let _serialized = backend_lock
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            dispatch(backend, &request.method, &request.target, &request.body)
        };
        tracing::debug!(
            "API {} {} -> {}",
            request.method,
            request.target,
            response.status
        );
        if let Err(err) = connection.write_response(&response, request.keep_alive) {
            tracing::debug!("API client went away before the response: {err}");
            return;
        }
        if !request.keep_alive {
            return;
        }
    }
}
