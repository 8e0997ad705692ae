//! The VMM half: hand guest memory's userfaultfd to a page server and watch the server.
//!
//! [`connect_memory`] creates a userfaultfd, registers every region of a `vm-memory` guest
//! memory with it (missing mode), and [`connect`]s; a VMM that registers memory itself calls
//! [`connect`] with its own userfaultfd and region table. Either sends the hello, waits for
//! the server's answer and returns a [`PageServerConnection`], whose watcher thread calls the
//! caller's failure hook (once) if the server reports an error or goes away.
//!
//! The connection keeps its own copy of the userfaultfd: if the server dies, the faults it had
//! not served stay blocked (a guest never reads a zero page where its data was) until the
//! connection lets them go — when it is dropped, or [`FAILURE_GRACE`] after the failure so a
//! VMM stopping its vCPUs cannot hang on a fault. Keep the connection as long as the memory is
//! used: once both copies are closed, untouched pages read as zero.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ext_snapshot::restore::lazy::{
    create_userfaultfd, register_missing, FailureHook, FAILURE_GRACE,
};
use userfaultfd::Uffd;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use super::error::{Error, Result};
use super::protocol::{self, Message, MessageReader, RegionMapping, PROTOCOL_VERSION};

/// How long [`connect`] waits for the server's answer to the hello.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the server said when it accepted the hello.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Accepted {
    /// The identity of the snapshot served (hex).
    pub snapshot_id: String,
    /// Data pages in the snapshot.
    pub data_pages: u64,
    /// Whether the server copies data pages in the background.
    pub prefault: bool,
}

/// What the watcher thread and the connection share.
#[derive(Default)]
struct Shared {
    failure: Mutex<Option<String>>,
    /// Set when the connection is dropped: the watcher lets go of the userfaultfd.
    released: Mutex<bool>,
    changed: Condvar,
}

/// A live connection to a page server that serves this process's guest memory.
pub struct PageServerConnection {
    stream: UnixStream,
    accepted: Accepted,
    shared: Arc<Shared>,
    watcher: Option<JoinHandle<()>>,
}

impl PageServerConnection {
    /// The server's answer to the hello.
    pub fn accepted(&self) -> &Accepted {
        &self.accepted
    }

    /// Why the server stopped serving, if it did (its error message, or that it went away).
    pub fn failure(&self) -> Option<String> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Drop for PageServerConnection {
    fn drop(&mut self) {
        *self
            .shared
            .released
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = true;
        self.shared.changed.notify_all();
        // The server ends the session (and closes its userfaultfd) when it sees the hang-up;
        // the watcher reads the end of the stream and closes ours.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
        if let Some(watcher) = self.watcher.take() {
            let _ = watcher.join();
        }
    }
}

/// The region table of `memory`, as its host mappings are.
pub fn region_table<B: Bitmap>(memory: &GuestMemoryMmap<B>) -> Vec<RegionMapping> {
    memory
        .iter()
        .map(|region| RegionMapping {
            base_host_virt_addr: region.as_ptr() as u64,
            size: region.len(),
            guest_phys_addr: region.start_addr().0,
            page_size: ext_snapshot::PAGE_SIZE,
        })
        .collect()
}

/// Registers every region of `memory` (fresh, never touched: a page present already is not
/// served) with a new userfaultfd in missing mode and [`connect`]s to the page server at
/// `socket` with it.
pub fn connect_memory<B: Bitmap>(
    socket: &Path,
    memory: &GuestMemoryMmap<B>,
    snapshot_id: Option<&str>,
    on_failure: FailureHook,
) -> Result<PageServerConnection> {
    let uffd = create_userfaultfd().map_err(|e| Error::Userfaultfd(e.to_string()))?;
    let regions = region_table(memory);
    for region in memory.iter() {
        let size = usize::try_from(region.len())
            .map_err(|_| Error::Userfaultfd(format!("region of {:#x} bytes", region.len())))?;
        register_missing(&uffd, region.as_ptr(), size).map_err(|e| {
            Error::Userfaultfd(format!("region at {:#x}: {e}", region.start_addr().0))
        })?;
    }
    connect(socket, uffd, &regions, snapshot_id, on_failure)
}

/// Sends the hello (`regions` and `uffd`, which must have every region registered in missing
/// mode) to the page server at `socket` and waits for its answer. `Err(Refused)` with the
/// server's text when it refuses; `Err(Io)`/`Err(Protocol)` when it cannot be reached or
/// answers nonsense. On success the watcher thread owns `uffd` and calls `on_failure` once
/// if the server fails later.
pub fn connect(
    socket: &Path,
    uffd: Uffd,
    regions: &[RegionMapping],
    snapshot_id: Option<&str>,
    on_failure: FailureHook,
) -> Result<PageServerConnection> {
    let stream = UnixStream::connect(socket).map_err(|e| {
        Error::io(
            format!("connecting to the page server at {}", socket.display()),
            e,
        )
    })?;
    let hello = Message::Hello {
        version: PROTOCOL_VERSION,
        snapshot_id: snapshot_id.map(str::to_string),
        regions: regions.to_vec(),
    };
    protocol::send(&stream, &hello, Some(uffd.as_raw_fd()))?;
    stream
        .set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| Error::io("setting the answer timeout", e))?;
    let mut reader = MessageReader::default();
    let answer = reader
        .read(&stream)?
        .ok_or_else(|| Error::Protocol("the page server closed the connection".into()))?;
    let accepted = match Message::decode(&answer.bytes)? {
        Message::Ack {
            snapshot_id,
            data_pages,
            prefault,
            ..
        } => Accepted {
            snapshot_id,
            data_pages,
            prefault,
        },
        Message::Error { error, .. } => return Err(Error::Refused(error)),
        Message::Hello { .. } => {
            return Err(Error::Protocol(
                "the page server answered with a hello".into(),
            ))
        }
    };
    stream
        .set_read_timeout(None)
        .map_err(|e| Error::io("clearing the answer timeout", e))?;
    let shared = Arc::new(Shared::default());
    let watched = stream
        .try_clone()
        .map_err(|e| Error::io("duplicating the page server socket", e))?;
    let watcher = {
        let shared = shared.clone();
        std::thread::Builder::new()
            .name("page-server-watch".into())
            .spawn(move || watch(watched, reader, uffd, &shared, on_failure))
            .map_err(|e| Error::io("spawning the page server watcher", e))?
    };
    Ok(PageServerConnection {
        stream,
        accepted,
        shared,
        watcher: Some(watcher),
    })
}

/// Waits for the server's error or hang-up; on either (unless the connection was dropped
/// first) records it, calls `on_failure`, and holds `uffd` until released or the grace time
/// is up.
fn watch(
    stream: UnixStream,
    mut reader: MessageReader,
    uffd: Uffd,
    shared: &Shared,
    on_failure: FailureHook,
) {
    let failure = loop {
        match reader.read(&stream) {
            Ok(Some(received)) => match Message::decode(&received.bytes) {
                Ok(Message::Error { error, .. }) => {
                    break format!("the page server failed: {error}")
                }
                Ok(other) => tracing::warn!("page server: unexpected message {other:?}"),
                Err(e) => break format!("the page server sent garbage: {e}"),
            },
            Ok(None) => break "the page server closed the connection".to_string(),
            Err(e) => break format!("the page server connection broke: {e}"),
        }
    };
    let released = shared.released.lock().unwrap_or_else(|p| p.into_inner());
    if *released {
        return;
    }
    tracing::error!("{failure}");
    *shared.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(failure.clone());
    drop(released);
    on_failure(&failure);
    let released = shared.released.lock().unwrap_or_else(|p| p.into_inner());
    let _wait = shared
        .changed
        .wait_timeout_while(released, FAILURE_GRACE, |released| !*released);
    drop(uffd);
}
