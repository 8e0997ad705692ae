//! The daemon's control API: HTTP/1.1 with JSON bodies on its own unix socket, with the
//! conventions and wire format of ext-vmm's API (and so of Cloud Hypervisor's): status lines
//! without a reason phrase, errors as a JSON array of messages with a 4xx/5xx status, 404 for
//! an unknown path, 405 for a wrong method, 400 for a bad body. `openapi.yaml` next to the
//! crate documents every endpoint.
//!
//! The binary starts it with `--api-socket <PATH>` ([`crate::Daemon::start_api`]); a library
//! user calls [`ApiServer::start`]. It runs on its own threads, one accepting and one per
//! connection, so neither a slow client nor a long snapshot holds up the vhost-user side,
//! and it takes the backend lock only to copy state or to call `resize` and
//! `request_stats`.
//!
//! The socket has mode 0600 before anyone can connect: it is bound inside a fresh directory of
//! mode 0700 next to its path, restricted, and only then renamed into place (no process-wide
//! umask change).
//!
//! - `http`: framing requests and writing responses on one connection;
//! - `routes`: the route table and the handlers (`routes/page_server.rs`: the page server
//!   run in the daemon process);
//! - [`types`]: the JSON bodies.

mod http;
mod routes;
pub mod types;

use std::fs::{self, DirBuilder};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::backend::SharedBackend;
use crate::error::{Error, Result};
use http::{HttpConnection, Incoming, Response};

/// Limits that keep one client from exhausting the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// Largest request line plus headers (else 431).
    pub max_header_bytes: usize,
    /// Largest request body (else 413).
    pub max_body_bytes: usize,
    /// How long a connection may wait for its next request before it is closed.
    pub idle_timeout: Duration,
    /// How long a request may take to arrive once its first byte has (else 408); also bounds
    /// each response write.
    pub request_timeout: Duration,
    /// Connections served at once (a further one gets 503).
    pub max_connections: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            max_header_bytes: 8 << 10,
            max_body_bytes: 16 << 10,
            idle_timeout: Duration::from_secs(60),
            request_timeout: Duration::from_secs(10),
            max_connections: 8,
        }
    }
}

/// What the handlers work on.
pub(crate) struct ApiContext {
    backend: SharedBackend,
    /// Set by the serve loop while a frontend is connected; `None`: the caller does not say,
    /// and a memory table stands for a connection.
    frontend_connected: Option<Arc<AtomicBool>>,
    /// Held while a snapshot is written.
    snapshot_running: Mutex<()>,
    /// The page server started through the API, if any; it stops when the API does.
    page_server: routes::PageServerSlot,
}

impl ApiContext {
    fn new(backend: SharedBackend, frontend_connected: Option<Arc<AtomicBool>>) -> Self {
        ApiContext {
            backend,
            frontend_connected,
            snapshot_running: Mutex::new(()),
            page_server: routes::PageServerSlot::default(),
        }
    }

    fn connected(&self) -> bool {
        match &self.frontend_connected {
            Some(flag) => flag.load(Ordering::Acquire),
            None => self
                .backend
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .guest_memory()
                .is_some(),
        }
    }
}

/// A running control API. [`ApiServer::shutdown`], or dropping it, closes every connection,
/// joins the threads and removes the socket.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    /// Device and inode of our socket: a socket someone else put at the path later is theirs.
    identity: (u64, u64),
    stop: EventFd,
    acceptor: Option<JoinHandle<()>>,
}

impl ApiServer {
    /// Serves the API for `backend` on a new socket at `path` (a socket already there is
    /// replaced; anything else there is an error). `frontend_connected` is the serve loop's
    /// "a frontend is connected" flag (see [`crate::Daemon::start_api`]); without it, status
    /// reports a frontend as connected while there is a memory table.
    /// `Err(Error::ApiSocket)` when the socket or a thread cannot be set up.
    pub fn start(
        path: &Path,
        backend: SharedBackend,
        frontend_connected: Option<Arc<AtomicBool>>,
        limits: ApiLimits,
    ) -> Result<Self> {
        let failed = |source| Error::ApiSocket {
            path: path.to_path_buf(),
            source,
        };
        let listener = bind_private(path).map_err(failed)?;
        let set_up = || -> io::Result<(u64, u64, EventFd, JoinHandle<()>)> {
            let meta = fs::symlink_metadata(path)?;
            listener.set_nonblocking(true)?;
            let stop = EventFd::new(EFD_NONBLOCK)?;
            let acceptor = Acceptor {
                listener,
                stop: stop.try_clone()?,
                context: Arc::new(ApiContext::new(backend, frontend_connected)),
                limits,
                clients: Vec::new(),
            };
            let thread = thread::Builder::new()
                .name("vum-api".into())
                .spawn(move || acceptor.run())?;
            Ok((meta.dev(), meta.ino(), stop, thread))
        };
        match set_up() {
            Ok((dev, ino, stop, thread)) => {
                tracing::info!(path = %path.display(), "control API listening");
                Ok(ApiServer {
                    path: path.to_path_buf(),
                    identity: (dev, ino),
                    stop,
                    acceptor: Some(thread),
                })
            }
            Err(e) => {
                let _ = fs::remove_file(path);
                Err(failed(e))
            }
        }
    }

    /// The socket's path.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Stops serving: see the type's doc. A request being answered (a snapshot, say) is
    /// finished first.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        let Some(acceptor) = self.acceptor.take() else {
            return;
        };
        match self.stop.write(1) {
            Ok(()) => {
                if acceptor.join().is_err() {
                    tracing::error!("the control API thread panicked");
                }
            }
            // The thread cannot be told; leave it rather than wait forever.
            Err(e) => tracing::error!(error = %e, "cannot stop the control API"),
        }
        let still_ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|meta| (meta.dev(), meta.ino()) == self.identity);
        if still_ours {
            let _ = fs::remove_file(&self.path);
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop_now();
    }
}

/// Creates the listening socket at `path` with mode 0600 before anyone can connect: bound in
/// a fresh directory of mode 0700 beside `path` (only our user can reach it there), set to
/// 0600, then renamed to `path`. A socket already at `path` is replaced; a non-socket is left
/// alone and refused.
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    static STAGINGS: AtomicU64 = AtomicU64::new(0);
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let staging = dir.join(format!(
        ".vum-api-{}-{}",
        std::process::id(),
        STAGINGS.fetch_add(1, Ordering::Relaxed)
    ));
    DirBuilder::new().mode(0o700).create(&staging)?;
    let staged = staging.join("s");
    let bound = UnixListener::bind(&staged).and_then(|listener| {
        fs::set_permissions(&staged, fs::Permissions::from_mode(0o600))?;
        fs::rename(&staged, path)?;
        Ok(listener)
    });
    let _ = fs::remove_file(&staged);
    let _ = fs::remove_dir(&staging);
    bound
}

/// A connection being served: a second handle on its socket (to end it at shutdown) and its
/// thread.
struct Client {
    stream: UnixStream,
    thread: JoinHandle<()>,
}

/// The accepting thread.
struct Acceptor {
    listener: UnixListener,
    stop: EventFd,
    context: Arc<ApiContext>,
    limits: ApiLimits,
    clients: Vec<Client>,
}

impl Acceptor {
    fn run(mut self) {
        loop {
            let mut fds =
                [self.listener.as_raw_fd(), self.stop.as_raw_fd()].map(|fd| libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            // SAFETY: `fds` is a live array of two initialized pollfd structs, and its length
            // is passed with it; poll writes only their `revents`.
            let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "control API poll failed; the API stops");
                break;
            }
            if fds[1].revents != 0 {
                break;
            }
            if fds[0].revents != 0 {
                self.accept_all();
            }
        }
        // Ending the sockets wakes every connection thread; a response being written is lost,
        // a handler running (a snapshot) finishes first.
        for client in &self.clients {
            let _ = client.stream.shutdown(std::net::Shutdown::Both);
        }
        for client in self.clients.drain(..) {
            if client.thread.join().is_err() {
                tracing::error!("a control API connection thread panicked");
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            let stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, say: keep the connections we have.
                    tracing::warn!(error = %e, "control API accept failed");
                    return;
                }
            };
            self.clients.retain(|c| !c.thread.is_finished());
            if self.clients.len() >= self.limits.max_connections {
                turn_away(stream, self.limits.max_connections);
            } else if let Err(e) = self.serve(stream) {
                tracing::warn!(error = %e, "cannot serve a control API connection");
            }
        }
    }

    fn serve(&mut self, stream: UnixStream) -> io::Result<()> {
        stream.set_nonblocking(false)?;
        let handle = stream.try_clone()?;
        let context = Arc::clone(&self.context);
        let connection = HttpConnection::new(stream, self.limits);
        let thread = thread::Builder::new()
            .name("vum-api-conn".into())
            .spawn(move || converse(connection, &context))?;
        self.clients.push(Client {
            stream: handle,
            thread,
        });
        Ok(())
    }
}

/// Answers a connection over the limit with 503, without waiting long on it.
fn turn_away(mut stream: UnixStream, max_connections: usize) {
    let busy = Response::failure(
        503,
        &[format!(
            "the control API serves {max_connections} connections already"
        )],
    );
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = stream.write_all(&busy.to_bytes(false));
}

/// Serves one connection's requests until the client closes it or a request is refused.
fn converse(mut connection: HttpConnection, context: &ApiContext) {
    loop {
        let request = match connection.next_request() {
            Incoming::Request(request) => request,
            Incoming::Gone => return,
            Incoming::Refused(response) => {
                tracing::debug!(status = response.status, "control API request refused");
                connection.refuse(&response);
                return;
            }
        };
        let response = routes::dispatch(context, &request.method, &request.path, &request.body);
        tracing::debug!(
            method = %request.method,
            path = %request.path,
            status = response.status,
            "control API request"
        );
        if connection.send(&response, request.keep_alive).is_err() || !request.keep_alive {
            return;
        }
    }
}
