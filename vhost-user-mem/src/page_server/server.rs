//! The server half: one listening socket, one thread per restoring VM.
//!
//! [`PageServer::bind`] opens the snapshot, validates its structure and every data checksum
//! (a damaged or truncated file is refused before anything listens), and binds the socket
//! (mode 0600: whoever connects gets the snapshot's memory). Each connection is a session: the
//! hello is checked against the snapshot, then ext-snapshot's [`FaultHandler`] serves the
//! VMM's userfaultfd until the VMM closes the connection or unmaps its memory. A session that
//! fails sends its error and keeps the userfaultfd (the faults it did not serve stay blocked)
//! until the VMM closes the connection; the server goes on accepting other VMs.

use std::convert::Infallible;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use ext_snapshot::restore::lazy::{poll_readable, FaultHandler, DEFERRED_RETRY};
use ext_snapshot::{PageType, SnapshotFile, PAGE_SIZE};
use userfaultfd::Uffd;

use super::counters::{ServerCounters, Tally};
use super::error::{Error, Result};
use super::protocol::{self, Message, MessageReader, RegionMapping, PROTOCOL_VERSION};
use super::ServeConfig;

/// How long a new connection may take to send its hello.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// Pages copied per `UFFDIO_COPY` at most (2 MiB): sequential faults are served in runs of
/// up to this much, without holding up faults elsewhere for long.
pub const MAX_COPY_PAGES: u64 = 512;

/// A bound page server: the validated snapshot and the listening socket.
pub struct PageServer {
    listener: UnixListener,
    socket: PathBuf,
    snapshot: Arc<SnapshotFile>,
    prefault: bool,
    stopping: Arc<AtomicBool>,
    tally: Arc<Tally>,
}

impl PageServer {
    /// Validates the snapshot (structure and every data checksum) and binds the socket,
    /// replacing a stale socket file. `Err(Snapshot)` for a file that cannot be served,
    /// `Err(SocketPath)`/`Err(Io)` for the socket.
    pub fn bind(config: &ServeConfig) -> Result<Self> {
        let snapshot_error = |source| Error::Snapshot {
            path: config.snapshot.clone(),
            source,
        };
        let snapshot = SnapshotFile::open(&config.snapshot).map_err(snapshot_error)?;
        if snapshot.is_diff() {
            return Err(snapshot_error(ext_snapshot::Error::NeedsParent));
        }
        snapshot.verify_data().map_err(snapshot_error)?;
        let listener = bind_socket(&config.socket)?;
        tracing::info!(
            "page server on {}: snapshot {} ({}, {} data pages){}",
            config.socket.display(),
            config.snapshot.display(),
            snapshot.header().id,
            snapshot.pages_by_type()[PageType::Data as usize],
            if config.prefault { ", prefault" } else { "" }
        );
        Ok(PageServer {
            listener,
            socket: config.socket.clone(),
            snapshot: Arc::new(snapshot),
            prefault: config.prefault,
            stopping: Arc::default(),
            tally: Arc::default(),
        })
    }

    /// The socket it listens on.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The snapshot it serves (validated).
    pub fn snapshot(&self) -> &SnapshotFile {
        &self.snapshot
    }

    /// Accepts VMs forever, each in its own session thread. Returns only if the listening
    /// socket itself fails.
    pub fn serve(self) -> Result<Infallible> {
        loop {
            self.accept_one()?;
        }
    }

    /// Serves on a thread of its own until [`RunningServer::stop`].
    pub fn spawn(self) -> Result<RunningServer> {
        let stopping = self.stopping.clone();
        let socket = self.socket.clone();
        let tally = self.tally.clone();
        let listener = self
            .listener
            .try_clone()
            .map_err(|e| Error::io("duplicating the page server socket", e))?;
        let thread = std::thread::Builder::new()
            .name("page-server".into())
            .spawn(move || {
                while !self.stopping.load(Ordering::SeqCst) {
                    if let Err(e) = self.accept_one() {
                        // The shutdown that `stop` uses to wake the accept makes it fail.
                        if self.stopping.load(Ordering::SeqCst) {
                            break;
                        }
                        return Err(e);
                    }
                }
                Ok(())
            })
            .map_err(|e| Error::io("spawning the page server thread", e))?;
        Ok(RunningServer {
            stopping,
            socket,
            listener,
            tally,
            thread: Some(thread),
        })
    }

    /// Accepts one connection and starts its session; transient accept errors are logged.
    fn accept_one(&self) -> Result<()> {
        static SESSIONS: AtomicU64 = AtomicU64::new(0);
        let stream = match self.listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if is_transient(&e) => {
                tracing::warn!("page server: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                return Ok(());
            }
            Err(e) => return Err(Error::io("accepting on the page server socket", e)),
        };
        if self.stopping.load(Ordering::SeqCst) {
            return Ok(());
        }
        self.tally.connection_accepted();
        let id = SESSIONS.fetch_add(1, Ordering::Relaxed) + 1;
        let snapshot = self.snapshot.clone();
        let prefault = self.prefault;
        let tally = self.tally.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("page-session-{id}"))
            .spawn(move || Session { id, stream }.run(&snapshot, prefault, &tally));
        if let Err(e) = spawned {
            tracing::error!("page server: cannot start session {id}: {e}");
        }
        Ok(())
    }
}

/// A page server running on its own thread.
pub struct RunningServer {
    stopping: Arc<AtomicBool>,
    socket: PathBuf,
    /// A second handle on the listening socket, to wake the blocked accept.
    listener: UnixListener,
    tally: Arc<Tally>,
    thread: Option<JoinHandle<Result<()>>>,
}

impl RunningServer {
    /// The socket it listens on.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Whether it still accepts connections (`false` once its accept loop failed).
    pub fn is_running(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Connections, sessions and pages served so far, live sessions included.
    pub fn counters(&self) -> ServerCounters {
        self.tally.counters()
    }

    /// Stops accepting connections (sessions already running go on until their VMs close
    /// them) and removes the socket. Returns the accept loop's error, if it had one.
    pub fn stop(mut self) -> Result<()> {
        self.stop_accepting()
    }

    fn stop_accepting(&mut self) -> Result<()> {
        let Some(thread) = self.thread.take() else {
            return Ok(());
        };
        self.stopping.store(true, Ordering::SeqCst);
        // Wakes the blocked accept (it fails with EINVAL); the loop sees the flag and ends.
        // Unlike a connection to the path, this works when the socket file has gone.
        // SAFETY: shutdown takes a descriptor we own (open until `self.listener` drops) and
        // an integer; it touches no memory of ours.
        if unsafe { libc::shutdown(self.listener.as_raw_fd(), libc::SHUT_RD) } != 0 {
            let e = std::io::Error::last_os_error();
            tracing::warn!("page server: shutdown of the listening socket: {e}");
            drop(UnixStream::connect(&self.socket));
        }
        let result = thread
            .join()
            .unwrap_or_else(|_| Err(Error::Protocol("the page server thread panicked".into())));
        let _ = std::fs::remove_file(&self.socket);
        result
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        let _ = self.stop_accepting();
    }
}

fn is_transient(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::EINTR
                | libc::ECONNABORTED
                | libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::EPROTO
                | libc::EPERM
        )
    )
}

fn bind_socket(path: &Path) -> Result<UnixListener> {
    let bad = |reason| Error::SocketPath {
        path: path.to_path_buf(),
        reason,
    };
    if path.as_os_str().is_empty() {
        return Err(bad("the path is empty"));
    }
    let directory = path.parent().filter(|d| !d.as_os_str().is_empty());
    if directory.is_some_and(|d| !d.is_dir()) {
        return Err(bad("its directory does not exist"));
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)
            .map_err(|e| Error::io(format!("removing the old socket {}", path.display()), e))?,
        Ok(_) => return Err(bad("a file that is not a socket is in the way")),
        Err(_) => {}
    }
    let listener = UnixListener::bind(path)
        .map_err(|e| Error::io(format!("binding {}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| Error::io(format!("chmod 0600 {}", path.display()), e))?;
    Ok(listener)
}

/// One restoring VM's connection.
struct Session {
    id: u64,
    stream: UnixStream,
}

impl Session {
    fn run(self, snapshot: &SnapshotFile, prefault: bool, tally: &Tally) {
        let mut handler = match self.handshake(snapshot, prefault) {
            Ok(Some(handler)) => handler,
            Ok(None) => {
                tracing::debug!("page session {}: closed before its hello", self.id);
                return;
            }
            Err(e) => {
                tally.hello_refused();
                tracing::warn!("page session {}: hello refused: {e}", self.id);
                let _ = protocol::send(&self.stream, &Message::error(e.to_string()), None);
                return;
            }
        };
        let ack = Message::Ack {
            version: PROTOCOL_VERSION,
            snapshot_id: snapshot.header().id.to_string(),
            data_pages: snapshot.pages_by_type()[PageType::Data as usize],
            prefault,
        };
        if let Err(e) = protocol::send(&self.stream, &ack, None) {
            tally.hello_refused();
            tracing::warn!("page session {}: cannot acknowledge: {e}", self.id);
            return;
        }
        tracing::info!("page session {}: serving", self.id);
        tally.session_started(self.id, handler.counters());
        let served = self.serve(&mut handler);
        tally.session_ended(self.id, served.is_err());
        match served {
            Ok(reason) => {
                let counters = handler.counters();
                tracing::info!(
                    "page session {}: ended ({reason}); {} faults, {} data pages copied, {} zero \
                     pages",
                    self.id,
                    counters.faults.load(Ordering::Relaxed),
                    counters.data_pages_copied.load(Ordering::Relaxed),
                    counters.zero_pages_mapped.load(Ordering::Relaxed),
                );
            }
            Err(e) => {
                tracing::error!(
                    "page session {}: {e}; its faults stay blocked until the VMM closes the \
                     connection",
                    self.id
                );
                let _ = protocol::send(&self.stream, &Message::error(e.to_string()), None);
                // Holding the userfaultfd keeps the VMM's unserved faults blocked (never a zero
                // page where data was) until it has stopped its guest and hung up.
                self.wait_for_hang_up();
            }
        }
    }

    /// Reads and checks the hello. `Ok(None)`: the peer hung up without one.
    fn handshake(&self, snapshot: &SnapshotFile, prefault: bool) -> Result<Option<FaultHandler>> {
        self.stream
            .set_read_timeout(Some(HELLO_TIMEOUT))
            .map_err(|e| Error::io("setting the hello timeout", e))?;
        let Some(received) = MessageReader::default().read(&self.stream)? else {
            return Ok(None);
        };
        self.stream
            .set_read_timeout(None)
            .map_err(|e| Error::io("clearing the hello timeout", e))?;
        let Message::Hello {
            snapshot_id,
            regions,
            ..
        } = Message::decode(&received.bytes)?
        else {
            return Err(Error::Protocol("the first message must be a hello".into()));
        };
        let [fd] = <[OwnedFd; 1]>::try_from(received.fds).map_err(|fds| {
            Error::Protocol(format!(
                "the hello must carry exactly one file descriptor (the userfaultfd), it \
                 carried {}",
                fds.len()
            ))
        })?;
        if let Some(id) = snapshot_id {
            let served = snapshot.header().id.to_string();
            if id != served {
                return Err(Error::RegionMismatch(format!(
                    "the VMM restores snapshot {id}, this server serves {served}"
                )));
            }
        }
        let host_starts = check_regions(snapshot, &regions)?;
        let uffd = userfaultfd_from(fd)?;
        let mut handler = FaultHandler::new(snapshot, uffd, &host_starts).map_err(Error::Serve)?;
        // A userfaultfd without its UFFDIO_API handshake cannot be polled: refuse it now.
        poll_readable(handler.uffd().as_raw_fd(), Some(Duration::ZERO))
            .map_err(|e| Error::Protocol(e.to_string()))?;
        handler.set_max_copy_pages(MAX_COPY_PAGES);
        if prefault {
            handler.enable_prefault();
        }
        Ok(Some(handler))
    }

    /// Serves until the VMM hangs up or unmaps its memory; `Ok` names which.
    fn serve(&self, handler: &mut FaultHandler) -> Result<&'static str> {
        let mut discard = [0u8; 512];
        loop {
            if handler.finished() {
                // The VMM unmapped its memory (it is tearing the VM down): nothing is left to
                // serve, but the connection stays until the VMM closes it, so that it does not
                // take the server's hang-up for a failure.
                self.wait_for_hang_up();
                return Ok("the VM's memory is gone");
            }
            let timeout = if handler.has_deferred() {
                i32::try_from(DEFERRED_RETRY.as_millis()).unwrap_or(1)
            } else if handler.has_work() {
                0
            } else {
                -1
            };
            let mut fds = [
                libc::pollfd {
                    fd: handler.uffd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stream.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds for the whole call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
            if rc < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("polling the session", e));
            }
            if fds[1].revents != 0 {
                // Version 1 has no message after the hello: bytes are ignored, a hang-up
                // ends the session.
                match (&self.stream).read(&mut discard) {
                    Ok(0) => return Ok("the VMM closed the connection"),
                    Ok(n) => tracing::debug!("page session {}: ignored {n} bytes", self.id),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => return Ok("the connection broke"),
                }
            }
            if fds[0].revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
                return Err(Error::Protocol("the userfaultfd reports an error".into()));
            }
            handler.serve_pending().map_err(Error::Serve)?;
            if handler.has_work() && !handler.has_deferred() {
                handler.prefault_step().map_err(Error::Serve)?;
            }
        }
    }

    fn wait_for_hang_up(&self) {
        let mut discard = [0u8; 512];
        loop {
            match (&self.stream).read(&mut discard) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }
}

/// Checks the hello's region table against the snapshot; returns the host address of each
/// snapshot region.
fn check_regions(snapshot: &SnapshotFile, regions: &[RegionMapping]) -> Result<Vec<usize>> {
    let layout = snapshot.layout();
    if regions.len() != layout.len() {
        return Err(Error::RegionMismatch(format!(
            "{} regions given, the snapshot has {}",
            regions.len(),
            layout.len()
        )));
    }
    let mut host_ranges: Vec<(u64, u64)> = Vec::with_capacity(regions.len());
    for (index, (region, &(guest_addr, size))) in regions.iter().zip(&layout).enumerate() {
        if region.page_size != PAGE_SIZE {
            return Err(Error::RegionMismatch(format!(
                "region {index}: page size {} (only {PAGE_SIZE} is served)",
                region.page_size
            )));
        }
        if region.guest_phys_addr != guest_addr || region.size != size {
            return Err(Error::RegionMismatch(format!(
                "region {index} is {:#x} bytes at {:#x}, the snapshot's is {size:#x} bytes at \
                 {guest_addr:#x}",
                region.size, region.guest_phys_addr
            )));
        }
        let start = region.base_host_virt_addr;
        let end = start.checked_add(size).filter(|_| start != 0);
        let Some(end) = end.filter(|_| start % PAGE_SIZE == 0) else {
            return Err(Error::RegionMismatch(format!(
                "region {index}: host address {start:#x} is not a page-aligned mapping"
            )));
        };
        if host_ranges.iter().any(|&(s, e)| start < e && s < end) {
            return Err(Error::RegionMismatch(format!(
                "region {index}: host range {start:#x}..{end:#x} overlaps another region"
            )));
        }
        host_ranges.push((start, end));
    }
    host_ranges
        .iter()
        .map(|&(start, _)| {
            usize::try_from(start)
                .map_err(|_| Error::RegionMismatch(format!("host address {start:#x} does not fit")))
        })
        .collect()
}

/// `fd` as a [`Uffd`], after checking that it is one.
fn userfaultfd_from(fd: OwnedFd) -> Result<Uffd> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map_err(|e| Error::io("reading the received descriptor's type", e))?;
    if link.as_os_str() != "anon_inode:[userfaultfd]" {
        return Err(Error::Protocol(format!(
            "the descriptor sent is {}, not a userfaultfd",
            link.display()
        )));
    }
    // SAFETY: the descriptor is ours alone (received over the socket) and is a userfaultfd;
    // `Uffd` takes over closing it.
    Ok(unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) })
}
