//! The bench's side of the wire: the real `vhost-user-mem` binary in a child process, guest
//! memory in a memfd both processes map, the `vhost` crate's real `Frontend` on the daemon's
//! socket, and a guest driver for split virtqueues laid out in that memory.
//!
//! The driver behaves like Linux's virtio-balloon and page-reporting code: one request chain in
//! flight per queue, kicked, then waited for on the call eventfd until the device has used it.

use std::fs::File;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_mem::balloon::VIRTIO_BALLOON_F_REPORTING;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// What went wrong; the bench prints it and exits non-zero.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A system call or file operation.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
    /// A vhost-user request the daemon refused or a broken connection.
    #[error("vhost-user {what}: {source}")]
    VhostUser {
        /// The request.
        what: &'static str,
        /// The error.
        source: vhost::Error,
    },
    /// Anything else: guest memory, the daemon's behaviour, bad arguments.
    #[error("{0}")]
    Other(String),
}

/// Result of the bench's operations.
pub type Result<T> = std::result::Result<T, BenchError>;

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
    let what = what.into();
    move |source| BenchError::Io { what, source }
}

fn vhost_user(what: &'static str) -> impl FnOnce(vhost::Error) -> BenchError {
    move |source| BenchError::VhostUser { what, source }
}

fn memory_error(e: impl std::fmt::Display) -> BenchError {
    BenchError::Other(format!("guest memory: {e}"))
}

/// How long the daemon may take to listen or to use one chain before the bench gives up. Only
/// a bound against hangs: no timing is judged by it.
const PATIENCE: Duration = Duration::from_secs(30);

/// The daemon binary: `explicit` if given, else `$VHOST_USER_MEM_BIN`, else `vhost-user-mem`
/// next to this executable (or one directory up, for test binaries in `deps/`).
pub fn find_daemon(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = explicit {
        return Ok(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os("VHOST_USER_MEM_BIN") {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().map_err(io("locating this executable"))?;
    let candidates: Vec<PathBuf> = exe
        .ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("vhost-user-mem"))
        .collect();
    candidates
        .iter()
        .find(|path| path.is_file())
        .cloned()
        .ok_or_else(|| {
            BenchError::Other(format!(
                "no vhost-user-mem binary at {}: build it (`cargo build -p vhost-user-mem`, same \
                 profile), or pass --daemon or VHOST_USER_MEM_BIN",
                candidates
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" or ")
            ))
        })
}

/// Kills and reaps a child of the bench (it may have exited already).
fn stop(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// Spawns `command` (`what` in messages) and waits until every path of `sockets` exists (the
/// program binds them before it serves). The child is killed and reaped if it exits first or
/// takes longer than [`PATIENCE`].
fn spawn_listening(command: &mut Command, what: &Path, sockets: &[&Path]) -> Result<Child> {
    let mut child = command
        .stdin(Stdio::null())
        .spawn()
        .map_err(io(format!("starting {}", what.display())))?;
    let deadline = Instant::now() + PATIENCE;
    while let Some(missing) = sockets.iter().find(|socket| !socket.exists()) {
        let failure = match child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "{} exited ({status}) before listening",
                what.display()
            )),
            _ if Instant::now() > deadline => Some(format!(
                "{} did not create {} in {PATIENCE:?}",
                what.display(),
                missing.display()
            )),
            _ => None,
        };
        if let Some(failure) = failure {
            stop(&mut child);
            return Err(BenchError::Other(failure));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(child)
}

/// The daemon process and its directory (its two sockets, and the snapshots the bench
/// writes); both go away on drop, also when the bench fails half way.
pub struct DaemonProcess {
    child: Child,
    dir: PathBuf,
    socket: PathBuf,
    api_socket: PathBuf,
}

impl DaemonProcess {
    /// Starts `binary` on a fresh vhost-user socket and control API socket and waits until it
    /// listens on both.
    pub fn start(binary: &Path) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("vhost-user-mem-bench.{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
        let socket = dir.join("balloon.sock");
        let api_socket = dir.join("api.sock");
        let child = spawn_listening(
            Command::new(binary)
                .arg("--socket")
                .arg(&socket)
                .arg("--api-socket")
                .arg(&api_socket)
                .args(["--log-level", "warn"]),
            binary,
            &[&socket, &api_socket],
        );
        match child {
            Ok(child) => Ok(DaemonProcess {
                child,
                dir,
                socket,
                api_socket,
            }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The vhost-user socket it listens on.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Its control API socket (`vhost-user-mem/openapi.yaml`).
    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    /// The bench's scratch directory (removed with the daemon): snapshots go here.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        stop(&mut self.child);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `vhost-user-mem serve --snapshot <file> --socket <path>` in a child process, killed on drop.
pub struct PageServerProcess {
    child: Child,
    socket: PathBuf,
}

impl PageServerProcess {
    /// Starts `binary serve` on `snapshot`, listening on `socket`, and waits until it listens
    /// (it validates the snapshot's checksums first).
    pub fn start(binary: &Path, snapshot: &Path, socket: &Path) -> Result<Self> {
        let child = spawn_listening(
            Command::new(binary)
                .arg("serve")
                .arg("--snapshot")
                .arg(snapshot)
                .arg("--socket")
                .arg(socket)
                .args(["--log-level", "warn"]),
            binary,
            &[socket],
        )?;
        Ok(PageServerProcess {
            child,
            socket: socket.to_path_buf(),
        })
    }

    /// The socket restoring VMMs connect to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for PageServerProcess {
    fn drop(&mut self) {
        stop(&mut self.child);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`, in bytes.
#[derive(Debug, Clone, Copy, Default)]
pub struct Resident {
    /// `VmRSS`: everything resident.
    pub total: u64,
    /// `RssAnon`: the process's own heap and stacks.
    pub anon: u64,
    /// `RssFile`: its binary and libraries.
    pub file: u64,
    /// `RssShmem`: shared memory it touched (here: guest pages, the rings and request buffers).
    pub shmem: u64,
}

/// Reads [`Resident`] of `pid`.
pub fn resident(pid: u32) -> Result<Resident> {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).map_err(io(format!("reading {path}")))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kib| kib.trim().parse::<u64>().ok())
            .map(|kib| kib * 1024)
            .ok_or_else(|| BenchError::Other(format!("no {name} in {path}")))
    };
    Ok(Resident {
        total: field("VmRSS")?,
        anon: field("RssAnon")?,
        file: field("RssFile")?,
        shmem: field("RssShmem")?,
    })
}

/// Guest memory: one region at gpa 0, a memfd that the bench and the daemon both map.
pub struct Guest {
    /// The memfd.
    pub file: File,
    /// The bench's mapping of it.
    pub mem: GuestMemoryMmap<()>,
    /// Its size in bytes.
    pub size: u64,
}

impl Guest {
    /// A memfd of `size` bytes, mapped, nothing populated yet.
    pub fn new(size: u64) -> Result<Self> {
        // SAFETY: memfd_create reads a static NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"vhost-user-mem-bench".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io("memfd_create")(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(io("sizing the memfd"))?;
        let len = usize::try_from(size).map_err(memory_error)?;
        let clone = file.try_clone().map_err(io("dup of the memfd"))?;
        let mmap =
            MmapRegion::<()>::from_file(FileOffset::new(clone, 0), len).map_err(memory_error)?;
        let region =
            GuestRegionMmap::new(mmap, GuestAddress(0)).ok_or_else(|| memory_error("region"))?;
        let mem = GuestMemoryMmap::from_regions(vec![region]).map_err(memory_error)?;
        Ok(Guest { file, mem, size })
    }

    /// Writes every page of `[addr, addr + len)`, as a guest that uses its memory does.
    pub fn populate(&self, addr: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 2 << 20;
        let pattern = vec![0xa5u8; CHUNK as usize];
        let mut cursor = addr;
        while cursor < addr + len {
            let n = CHUNK.min(addr + len - cursor) as usize;
            self.mem
                .write_slice(&pattern[..n], GuestAddress(cursor))
                .map_err(memory_error)?;
            cursor += n as u64;
        }
        Ok(())
    }

    /// Bytes the host has allocated for the memfd (`st_blocks`).
    pub fn allocated(&self) -> Result<u64> {
        vhost_user_mem::memory::allocated_bytes(&self.mem).map_err(io("stat of the memfd"))
    }

    fn host_address(&self, gpa: u64) -> Result<u64> {
        self.mem
            .get_host_address(GuestAddress(gpa))
            .map(|ptr| ptr as u64)
            .map_err(memory_error)
    }
}

/// Queue size the driver sets for every queue (Linux reports at most 32 ranges per chain and
/// inflates 256 PFNs in one descriptor).
pub const QUEUE_SIZE: u16 = 256;
/// Guest memory the rings use: queue `i` at `i * RING_STRIDE` (descriptors, then the avail ring
/// one page up, the used ring two pages up).
const RING_STRIDE: u64 = 0x4000;

/// One split virtqueue as the guest driver sees it, with the eventfds the frontend handed over.
pub struct Virtqueue {
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
    next_avail: u16,
    next_used: u16,
    kick: EventFd,
    call: EventFd,
}

/// A buffer of a request: guest address, length, whether the device may write it.
#[derive(Debug, Clone, Copy)]
pub struct Buffer {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (`VRING_DESC_F_WRITE`).
    pub writable: bool,
}

impl Virtqueue {
    /// Puts `buffers` into descriptors `0..n` as one chain, makes it available, kicks, and
    /// waits until the device has used it. One chain in flight, as Linux's balloon driver
    /// (`tell_host`) and page reporting (`virtio_balloon_free_page_report`) do.
    pub fn request(&mut self, mem: &GuestMemoryMmap<()>, buffers: &[Buffer]) -> Result<()> {
        if buffers.is_empty() || buffers.len() > usize::from(QUEUE_SIZE) {
            return Err(BenchError::Other(format!(
                "{} buffers in one chain",
                buffers.len()
            )));
        }
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        for (i, buffer) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            let flags = if last { 0 } else { NEXT } | if buffer.writable { WRITE } else { 0 };
            let next = if last { 0 } else { i as u16 + 1 };
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&buffer.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&buffer.len.to_le_bytes());
            raw[12..14].copy_from_slice(&flags.to_le_bytes());
            raw[14..16].copy_from_slice(&next.to_le_bytes());
            mem.write_slice(&raw, GuestAddress(self.desc_table + 16 * i as u64))
                .map_err(memory_error)?;
        }
        let slot = u64::from(self.next_avail % QUEUE_SIZE);
        mem.write_obj(0u16.to_le(), GuestAddress(self.avail_ring + 4 + 2 * slot))
            .map_err(memory_error)?;
        self.next_avail = self.next_avail.wrapping_add(1);
        // Release: the descriptors and the ring entry are visible before the new index.
        mem.store(
            self.next_avail.to_le(),
            GuestAddress(self.avail_ring + 2),
            Ordering::Release,
        )
        .map_err(memory_error)?;
        self.kick.write(1).map_err(io("kick"))?;
        self.wait_used(mem)
    }

    fn wait_used(&mut self, mem: &GuestMemoryMmap<()>) -> Result<()> {
        let target = self.next_used.wrapping_add(1);
        let deadline = Instant::now() + PATIENCE;
        loop {
            let used: u16 = mem
                .load(GuestAddress(self.used_ring + 2), Ordering::Acquire)
                .map(u16::from_le)
                .map_err(memory_error)?;
            if used == target {
                self.next_used = target;
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BenchError::Other(format!(
                    "the daemon did not use the chain in {PATIENCE:?}"
                )));
            }
            let mut poll = libc::pollfd {
                fd: self.call.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let timeout = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: `poll` points to one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut poll, 1, timeout) };
            if ready < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::Interrupted {
                    return Err(io("poll of the call eventfd")(e));
                }
            }
            // Drain the interrupt; the used index above is the truth.
            let _ = self.call.read();
        }
    }
}

/// Queue indices with `REPORTING` and without `STATS_VQ`.
pub const INFLATE_QUEUE: usize = 0;
/// The deflate queue (set up, unused by the figures).
pub const DEFLATE_QUEUE: usize = 1;
/// The reporting queue: index 2 when stats are not negotiated.
pub const REPORTING_QUEUE: usize = 2;
/// Guest memory below this holds the rings and request buffers; the figures never report or
/// inflate it.
pub const RESERVED: u64 = 2 << 20;
/// Where inflate requests put their PFN arrays.
pub const PFN_BUFFER: u64 = 0x10000;

/// A connected frontend with the three queues ready.
pub struct Connection {
    /// Held so that the daemon keeps the connection.
    _frontend: Frontend,
    /// Queues by index: inflate, deflate, reporting.
    pub queues: Vec<Virtqueue>,
}

/// Connects to the daemon at `socket`, negotiates `VERSION_1 | REPORTING`, sends the memory
/// table with the memfd, and sets up three queues in the reserved low memory.
pub fn connect(socket: &Path, guest: &Guest) -> Result<Connection> {
    let mut frontend = Frontend::connect(socket, 3).map_err(vhost_user("connect"))?;
    frontend.set_owner().map_err(vhost_user("SET_OWNER"))?;
    let features = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_BALLOON_F_REPORTING)
        | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    let offered = frontend
        .get_features()
        .map_err(vhost_user("GET_FEATURES"))?;
    if offered & features != features {
        return Err(BenchError::Other(format!(
            "the daemon offers features {offered:#x}, the bench needs {features:#x}"
        )));
    }
    frontend
        .set_features(features)
        .map_err(vhost_user("SET_FEATURES"))?;
    let protocol = frontend
        .get_protocol_features()
        .map_err(vhost_user("GET_PROTOCOL_FEATURES"))?;
    frontend
        .set_protocol_features(
            protocol & (VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ),
        )
        .map_err(vhost_user("SET_PROTOCOL_FEATURES"))?;
    frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: guest.size,
            userspace_addr: guest.host_address(0)?,
            mmap_offset: 0,
            mmap_handle: guest.file.as_raw_fd(),
        }])
        .map_err(vhost_user("SET_MEM_TABLE"))?;
    let mut queues = Vec::new();
    for index in [INFLATE_QUEUE, DEFLATE_QUEUE, REPORTING_QUEUE] {
        let base = index as u64 * RING_STRIDE;
        let (desc_table, avail_ring, used_ring) = (base, base + 0x1000, base + 0x2000);
        // A fresh ring: avail and used indices zero.
        guest
            .mem
            .write_slice(&[0u8; 0x3000], GuestAddress(base))
            .map_err(memory_error)?;
        let kick = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
        let call = EventFd::new(EFD_NONBLOCK).map_err(io("eventfd"))?;
        frontend
            .set_vring_num(index, QUEUE_SIZE)
            .map_err(vhost_user("SET_VRING_NUM"))?;
        frontend
            .set_vring_addr(
                index,
                &VringConfigData {
                    queue_max_size: QUEUE_SIZE,
                    queue_size: QUEUE_SIZE,
                    flags: 0,
                    desc_table_addr: guest.host_address(desc_table)?,
                    used_ring_addr: guest.host_address(used_ring)?,
                    avail_ring_addr: guest.host_address(avail_ring)?,
                    log_addr: None,
                },
            )
            .map_err(vhost_user("SET_VRING_ADDR"))?;
        frontend
            .set_vring_base(index, 0)
            .map_err(vhost_user("SET_VRING_BASE"))?;
        frontend
            .set_vring_call(index, &call)
            .map_err(vhost_user("SET_VRING_CALL"))?;
        frontend
            .set_vring_kick(index, &kick)
            .map_err(vhost_user("SET_VRING_KICK"))?;
        frontend
            .set_vring_enable(index, true)
            .map_err(vhost_user("SET_VRING_ENABLE"))?;
        queues.push(Virtqueue {
            desc_table,
            avail_ring,
            used_ring,
            next_avail: 0,
            next_used: 0,
            kick,
            call,
        });
    }
    Ok(Connection {
        _frontend: frontend,
        queues,
    })
}
