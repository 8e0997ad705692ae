//! A virtio device whose queues a vhost-user backend process serves (`--generic-vhost-user`,
//! Cloud Hypervisor's syntax): the `vhost` crate's `Frontend` over the backend's unix socket.
//!
//! The guest drives our virtio-mmio transport as for any device; this device forwards to the
//! backend what the backend needs:
//! - features: the backend's device feature bits are offered to the guest as they are (minus
//!   the vhost-user `PROTOCOL_FEATURES` bit and bits the transport cannot honour), so a
//!   vhost-user balloon negotiates statistics, deflate-on-OOM and free page reporting
//!   (Cloud Hypervisor v53's generic device offers only its default virtio bits);
//! - config space: every guest read is a `GET_CONFIG`, every write a `SET_CONFIG`; the last
//!   value read is kept for when the backend is away;
//! - queues: at `DRIVER_OK`, the memory table (memfds: guest memory must be `shared=on`), each
//!   ready queue's size, addresses and base, a kick and a call eventfd;
//! - interrupts: a relay thread turns the backend's call eventfds into the transport's used-ring
//!   interrupt, and the backend's `CONFIG_CHANGE_MSG` (on the backend request channel) into
//!   its config interrupt.
//!
//! When the backend dies the VM keeps running: the device stops (its queues are not served),
//! the disconnect is logged and counted, and the relay thread connects again every
//! [`RECONNECT_INTERVAL`]; once the backend is back, it gets the memory table and the queues
//! again, each from the used index in guest memory (the chains the guest still waits for are
//! served anew), and a pending kick is taken from the kick eventfd.
//!
//! A snapshot saves the negotiated features and the config space last read
//! ([`VhostUserState`]); the device state itself (for a balloon: target, inflated pages) lives
//! in the backend, which outlives the VMM.

use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserProtocolFeatures, VhostUserVirtioFeatures,
};
use vhost::vhost_user::{
    Frontend, FrontendReqHandler, VhostUserFrontend, VhostUserFrontendReqHandler,
};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{ActivateContext, VirtioDevice, VirtioInterrupt};
use crate::error::{Error, Result};
use crate::memory::GuestRam;

/// How often the relay thread tries to reach a backend that went away.
pub const RECONNECT_INTERVAL: Duration = Duration::from_millis(500);
/// How long creating the device waits for the backend's socket to accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `--generic-vhost-user device_type=<type>,socket=<path>,queue_sizes=[<n>,...]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserConfig {
    /// Virtio device type the backend implements (5 = balloon).
    pub device_type: u32,
    /// The backend's unix socket.
    pub socket: PathBuf,
    /// Size of each queue; the length is the number of queues.
    pub queue_sizes: Vec<u16>,
    /// The backend's control API socket, if it has one that lists invalid pages
    /// (vhost-user-mem's `GET /api/v1/invalid-pages`): an ext-vmm extension
    /// (`control_socket=<path>`), used by snapshots to type inflated pages `Invalid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
}

/// What a snapshot keeps of the frontend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostUserState {
    /// Device features the backend offered when the snapshot was taken.
    pub offered_features: u64,
    /// The config space as last read from the backend.
    pub config: Vec<u8>,
}

/// Counters shared with the relay thread.
#[derive(Default)]
struct Counters {
    disconnects: AtomicU64,
    reconnects: AtomicU64,
    used_interrupts: AtomicU64,
    config_changes: AtomicU64,
    errors: AtomicU64,
}

/// One queue as the driver set it up.
#[derive(Clone, Copy, Debug)]
struct QueueSetup {
    index: usize,
    state: QueueState,
}

/// The running device: what every (re)connection hands to the backend.
struct Active {
    memory: GuestRam,
    interrupt: Arc<VirtioInterrupt>,
    acked_features: u64,
    queues: Vec<QueueSetup>,
}

/// The connection and what was learnt over it.
struct Link {
    frontend: Option<Frontend>,
    protocol: VhostUserProtocolFeatures,
    config: Vec<u8>,
    active: Option<Active>,
}

struct Shared {
    link: Mutex<Link>,
    counters: Counters,
}

impl Link {
    /// The bytes of the config window an access of `len` bytes at `offset` covers, if the
    /// backend takes config accesses and the access lies inside the window.
    fn config_range(&self, offset: u64, len: usize) -> Option<std::ops::Range<usize>> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return None;
        }
        let start = usize::try_from(offset).ok()?;
        let end = start.checked_add(len)?;
        (end <= self.config.len()).then_some(start..end)
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Link> {
        self.link.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one event in `counter` and raises the running device's interrupt with `raise`
    /// (nothing to raise while the device is not activated).
    fn count_and_raise(
        &self,
        counter: &AtomicU64,
        raise: fn(&VirtioInterrupt) -> Result<()>,
    ) -> Result<()> {
        counter.fetch_add(1, Ordering::Relaxed);
        match self.lock().active.as_ref() {
            Some(active) => raise(&active.interrupt),
            None => Ok(()),
        }
    }
}

/// A virtio device served by a vhost-user backend.
pub struct VhostUserDevice {
    config: VhostUserConfig,
    offered_features: u64,
    shared: Arc<Shared>,
    kicks: Vec<Arc<EventFd>>,
    calls: Vec<Arc<EventFd>>,
    stop: Arc<EventFd>,
    relay: Option<JoinHandle<()>>,
}

/// Virtio feature bits the transport offers whatever the backend: the backend's own device
/// bits (0..24) pass through; of the reserved range only these.
fn transport_bits() -> u64 {
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_RING_F_INDIRECT_DESC)
}

/// Protocol features the frontend uses when the backend has them.
fn wanted_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::BACKEND_REQ
}

fn vhost_error(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Virtio(format!("vhost-user {what}: {e}"))
}

/// Connects, takes ownership and negotiates protocol features; returns the frontend, the
/// backend's virtio features and the protocol features in use.
fn handshake(config: &VhostUserConfig) -> Result<(Frontend, u64, VhostUserProtocolFeatures)> {
    let queues = config.queue_sizes.len() as u64;
    let mut frontend = Frontend::connect(&config.socket, queues)
        .map_err(|e| vhost_error(&format!("connect {}", config.socket.display()), e))?;
    set_reply_timeout(&frontend)?;
    frontend
        .set_owner()
        .map_err(|e| vhost_error("SET_OWNER", e))?;
    let features = frontend
        .get_features()
        .map_err(|e| vhost_error("GET_FEATURES", e))?;
    let mut protocol = VhostUserProtocolFeatures::empty();
    if features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
        let offered = frontend
            .get_protocol_features()
            .map_err(|e| vhost_error("GET_PROTOCOL_FEATURES", e))?;
        protocol = offered & wanted_protocol();
        frontend
            .set_protocol_features(protocol)
            .map_err(|e| vhost_error("SET_PROTOCOL_FEATURES", e))?;
        if protocol.contains(VhostUserProtocolFeatures::MQ) {
            let max = frontend
                .get_queue_num()
                .map_err(|e| vhost_error("GET_QUEUE_NUM", e))?;
            if max < queues {
                return Err(vhost_error(
                    "GET_QUEUE_NUM",
                    format!("the backend has {max} queues, {queues} configured"),
                ));
            }
        }
    }
    Ok((frontend, features, protocol))
}

/// Relays the backend's config-change message to the guest.
struct ConfigChangeRelay {
    shared: Arc<Shared>,
}

impl VhostUserFrontendReqHandler for ConfigChangeRelay {
    fn handle_config_change(&self) -> std::io::Result<u64> {
        self.shared
            .count_and_raise(
                &self.shared.counters.config_changes,
                VirtioInterrupt::signal_config_change,
            )
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(0)
    }
}

impl VhostUserDevice {
    /// Connects to the backend (waiting up to [`CONNECT_TIMEOUT`] for its socket) and learns
    /// its features and config space.
    pub fn new(config: &VhostUserConfig) -> Result<Self> {
        if config.queue_sizes.is_empty()
            || config
                .queue_sizes
                .iter()
                .any(|&s| s == 0 || !s.is_power_of_two() || s > 32768)
        {
            return Err(Error::InvalidOption(format!(
                "--generic-vhost-user queue_sizes {:?}: one or more powers of two up to 32768",
                config.queue_sizes
            )));
        }
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let (frontend, features, protocol) = loop {
            match handshake(config) {
                Ok(done) => break done,
                Err(e) if Instant::now() < deadline => {
                    debug!("{e}; trying again");
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        };
        let offered_features = features
            & !VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
            & (0xff_ffff | transport_bits());
        if offered_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            return Err(Error::Virtio(format!(
                "vhost-user backend {} does not offer VIRTIO_F_VERSION_1",
                config.socket.display()
            )));
        }
        let mut link = Link {
            frontend: Some(frontend),
            protocol,
            config: Vec::new(),
            active: None,
        };
        let window = config_window(config.device_type, offered_features);
        link.config = read_backend_config(&mut link, window).unwrap_or_else(|| vec![0; window]);
        info!(
            socket = %config.socket.display(),
            device_type = config.device_type,
            features = format_args!("{offered_features:#x}"),
            "vhost-user backend connected"
        );
        let shared = Arc::new(Shared {
            link: Mutex::new(link),
            counters: Counters::default(),
        });
        let mut kicks = Vec::new();
        let mut calls = Vec::new();
        for _ in &config.queue_sizes {
            kicks.push(Arc::new(new_eventfd()?));
            calls.push(Arc::new(new_eventfd()?));
        }
        let stop = Arc::new(new_eventfd()?);
        let relay = Relay {
            config: config.clone(),
            shared: shared.clone(),
            kicks: kicks.clone(),
            calls: calls.clone(),
            stop: stop.clone(),
            handler: None,
        };
        let relay = std::thread::Builder::new()
            .name("vhost-user-relay".into())
            .spawn(move || relay.run())
            .map_err(|e| Error::Sys("spawn the vhost-user relay thread", e))?;
        Ok(VhostUserDevice {
            config: config.clone(),
            offered_features,
            shared,
            kicks,
            calls,
            stop,
            relay: Some(relay),
        })
    }

    /// The configuration the device was built from.
    pub fn config(&self) -> &VhostUserConfig {
        &self.config
    }
}

fn new_eventfd() -> Result<EventFd> {
    EventFd::new(EFD_NONBLOCK).map_err(|e| Error::Sys("eventfd", e))
}

/// How much of the config space the guest may reach through the backend: the size the virtio
/// spec gives the device type for the features offered. A vhost-user backend asked for more
/// than it has answers with a short reply the `vhost` crate then waits on, so nothing outside
/// this window is forwarded (reads there return 0, writes are dropped).
fn config_window(device_type: u32, offered: u64) -> usize {
    match device_type {
        // virtio-balloon (virtio 1.2 §5.5.4): num_pages, actual; free_page_hint_cmd_id with
        // FREE_PAGE_HINT (3), poison_val with PAGE_POISON (4).
        5 if offered & (1 << 4) != 0 => 16,
        5 if offered & (1 << 3) != 0 => 12,
        5 => 8,
        _ => 0,
    }
}

/// Reads the config window (`None` without `CONFIG`, a backend, or a window).
fn read_backend_config(link: &mut Link, window: usize) -> Option<Vec<u8>> {
    if !link.protocol.contains(VhostUserProtocolFeatures::CONFIG) || window == 0 {
        return None;
    }
    let frontend = link.frontend.as_mut()?;
    let buf = vec![0u8; window];
    match frontend.get_config(0, window as u32, VhostUserConfigFlags::WRITABLE, &buf) {
        Ok((_, data)) if data.len() == window => Some(data),
        Ok(_) => None,
        Err(e) => {
            warn!("vhost-user GET_CONFIG: {e}");
            break_link(frontend);
            None
        }
    }
}

/// Replies to the frontend's requests that do not come within this time count as a broken
/// backend (the `vhost` crate has no timeout of its own).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

fn set_reply_timeout(frontend: &Frontend) -> Result<()> {
    let timeout = libc::timeval {
        tv_sec: REPLY_TIMEOUT.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: the frontend's socket is open for as long as `frontend` lives; `timeout` is a
    // live timeval of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            frontend.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&raw const timeout).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Error::last_os(
            "setsockopt SO_RCVTIMEO on the vhost-user socket",
        ));
    }
    Ok(())
}

/// A request failed midway: the connection may be out of step, so it ends here; the relay
/// thread sees the hang-up and connects again.
fn break_link(frontend: &Frontend) {
    // SAFETY: shutting down an open socket the frontend owns; it stays open (and owned) until
    // the frontend is dropped.
    unsafe { libc::shutdown(frontend.as_raw_fd(), libc::SHUT_RDWR) };
}

/// Hands the memory table and the queues to the connected backend.
fn start_rings(
    frontend: &mut Frontend,
    protocol: VhostUserProtocolFeatures,
    active: &Active,
    kicks: &[Arc<EventFd>],
    calls: &[Arc<EventFd>],
) -> Result<()> {
    let mut features = active.acked_features;
    if !protocol.is_empty() {
        features |= VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
    }
    frontend
        .set_features(features)
        .map_err(|e| vhost_error("SET_FEATURES", e))?;
    let regions = active
        .memory
        .iter()
        .map(|region| {
            VhostUserMemoryRegionInfo::from_guest_region(region).map_err(|e| {
                Error::Virtio(format!(
                    "vhost-user needs file-backed guest memory (--memory shared=on): {e}"
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    frontend
        .set_mem_table(&regions)
        .map_err(|e| vhost_error("SET_MEM_TABLE", e))?;
    for setup in &active.queues {
        populate_queue(&active.memory, &setup.state);
    }
    for setup in &active.queues {
        let q = &setup.state;
        let host = |gpa: u64, what: &str| -> Result<u64> {
            active
                .memory
                .get_host_address(GuestAddress(gpa))
                .map(|p| p as u64)
                .map_err(|e| {
                    Error::Virtio(format!("queue {} {what} at {gpa:#x}: {e}", setup.index))
                })
        };
        let addresses = VringConfigData {
            queue_max_size: q.max_size,
            queue_size: q.size,
            flags: 0,
            desc_table_addr: host(q.desc_table, "descriptor table")?,
            used_ring_addr: host(q.used_ring, "used ring")?,
            avail_ring_addr: host(q.avail_ring, "available ring")?,
            log_addr: None,
        };
        let i = setup.index;
        frontend
            .set_vring_num(i, q.size)
            .map_err(|e| vhost_error("SET_VRING_NUM", e))?;
        frontend
            .set_vring_addr(i, &addresses)
            .map_err(|e| vhost_error("SET_VRING_ADDR", e))?;
        frontend
            .set_vring_base(i, q.next_avail)
            .map_err(|e| vhost_error("SET_VRING_BASE", e))?;
        frontend
            .set_vring_call(i, &calls[i])
            .map_err(|e| vhost_error("SET_VRING_CALL", e))?;
        frontend
            .set_vring_kick(i, &kicks[i])
            .map_err(|e| vhost_error("SET_VRING_KICK", e))?;
        if !protocol.is_empty() {
            frontend
                .set_vring_enable(i, true)
                .map_err(|e| vhost_error("SET_VRING_ENABLE", e))?;
        }
    }
    // A kick that came while no backend listened is still counted in the eventfd, which the
    // backend reads once it has the queue; one more makes sure it looks at every queue now.
    for setup in &active.queues {
        let _ = kicks[setup.index].write(1);
    }
    Ok(())
}

/// Reads (so faults in) every page the backend may read for the queue: its rings and the
/// buffers of the chains the guest made available and the device has not used yet.
///
/// After an on-demand restore the guest's memory arrives page by page, through faults on *this*
/// process's mapping. The backend maps the same memfd without the userfaultfd: a page it read
/// before it arrived would be created as zeros in the memfd, and the guest would then find
/// zeros there instead of its data. Pages the guest writes after the restore arrive through its
/// own faults first; the rest of what the backend reads is what this walk touches. (Inflated
/// and reported pages it only punches.)
fn populate_queue(memory: &GuestRam, q: &QueueState) {
    let size = u64::from(q.size);
    let touch = |gpa: u64, len: u64| {
        let end = gpa.saturating_add(len.min(1 << 20));
        let mut page = gpa & !0xfff;
        while page < end {
            let _ = memory.read_obj::<u8>(GuestAddress(page.max(gpa)));
            page += 4096;
        }
    };
    touch(q.desc_table, 16 * size);
    touch(q.avail_ring, 6 + 2 * size);
    touch(q.used_ring, 6 + 8 * size);
    // virtio-queue walks the pending chains (direct and indirect) on a copy of the queue.
    let Ok(mut pending) = Queue::try_from(*q) else {
        return;
    };
    let Ok(chains) = pending.iter(memory) else {
        return;
    };
    for chain in chains {
        for descriptor in chain {
            touch(descriptor.addr().0, u64::from(descriptor.len()));
        }
    }
}

/// The used index the guest sees for `state`'s queue: where a (new) backend starts.
fn used_index(memory: &GuestRam, state: &QueueState) -> Option<u16> {
    memory
        .read_obj::<u16>(GuestAddress(state.used_ring.checked_add(2)?))
        .ok()
        .map(u16::from_le)
}

/// The thread that relays call eventfds and config changes and reconnects a lost backend.
struct Relay {
    config: VhostUserConfig,
    shared: Arc<Shared>,
    kicks: Vec<Arc<EventFd>>,
    calls: Vec<Arc<EventFd>>,
    stop: Arc<EventFd>,
    handler: Option<FrontendReqHandler<ConfigChangeRelay>>,
}

/// Epoll tokens: the stop eventfd, the backend socket, the backend request channel, then one
/// per call eventfd.
const STOP: u64 = 0;
const SOCKET: u64 = 1;
const BACKEND_REQ: u64 = 2;
const FIRST_CALL: u64 = 3;

impl Relay {
    fn run(mut self) {
        if let Err(e) = self.serve() {
            error!(
                "vhost-user relay for {} stops: {e}",
                self.config.socket.display()
            );
        }
    }

    fn serve(&mut self) -> Result<()> {
        let epoll = Epoll::new().map_err(|e| Error::Sys("epoll", e))?;
        let add = |fd: RawFd, events: EventSet, token: u64| {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(|e| Error::Sys("epoll add", e))
        };
        add(self.stop.as_raw_fd(), EventSet::IN, STOP)?;
        for (i, call) in self.calls.iter().enumerate() {
            add(call.as_raw_fd(), EventSet::IN, FIRST_CALL + i as u64)?;
        }
        let mut socket = self.watch_connection(&epoll)?;
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            let timeout = if socket.is_some() {
                -1
            } else {
                RECONNECT_INTERVAL.as_millis() as i32
            };
            let n = match epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Sys("epoll wait", e)),
            };
            if n == 0 && socket.is_none() {
                if self.reconnect() {
                    socket = self.watch_connection(&epoll)?;
                }
                continue;
            }
            for event in &events[..n] {
                match event.data() {
                    STOP => return Ok(()),
                    SOCKET => {
                        if let Some(fd) = socket.take() {
                            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
                        }
                        self.disconnected(&epoll);
                    }
                    BACKEND_REQ => {
                        if let Some(handler) = self.handler.as_mut() {
                            if let Err(e) = handler.handle_request() {
                                warn!("vhost-user backend request refused: {e}");
                                self.drop_handler(&epoll);
                            }
                        }
                    }
                    token => self.relay_call(token - FIRST_CALL),
                }
            }
        }
    }

    /// Watches the connected backend's socket for hang-up and sets up its request channel.
    fn watch_connection(&mut self, epoll: &Epoll) -> Result<Option<RawFd>> {
        let mut link = self.shared.lock();
        let protocol = link.protocol;
        let Some(frontend) = link.frontend.as_mut() else {
            return Ok(None);
        };
        let fd = frontend.as_raw_fd();
        // Only hang-up: replies to the vCPU threads' requests make the socket readable.
        epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::READ_HANG_UP, SOCKET),
            )
            .map_err(|e| Error::Sys("epoll add", e))?;
        if protocol.contains(VhostUserProtocolFeatures::BACKEND_REQ) {
            match FrontendReqHandler::new(Arc::new(ConfigChangeRelay {
                shared: self.shared.clone(),
            })) {
                Ok(mut handler) => {
                    if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                        handler.set_reply_ack_flag(true);
                    }
                    let tx = handler.get_tx_raw_fd();
                    match frontend.set_backend_request_fd(&tx) {
                        Ok(()) => {
                            epoll
                                .ctl(
                                    ControlOperation::Add,
                                    handler.as_raw_fd(),
                                    EpollEvent::new(EventSet::IN, BACKEND_REQ),
                                )
                                .map_err(|e| Error::Sys("epoll add", e))?;
                            self.handler = Some(handler);
                        }
                        Err(e) => warn!("vhost-user SET_BACKEND_REQ_FD: {e}"),
                    }
                }
                Err(e) => warn!("vhost-user backend request channel: {e}"),
            }
        }
        Ok(Some(fd))
    }

    fn drop_handler(&mut self, epoll: &Epoll) {
        if let Some(handler) = self.handler.take() {
            let _ = epoll.ctl(
                ControlOperation::Delete,
                handler.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }

    fn disconnected(&mut self, epoll: &Epoll) {
        self.drop_handler(epoll);
        self.shared.lock().frontend = None;
        self.shared
            .counters
            .disconnects
            .fetch_add(1, Ordering::Relaxed);
        self.shared.counters.errors.fetch_add(1, Ordering::Relaxed);
        error!(
            "vhost-user backend {} went away: the device stops until it is back",
            self.config.socket.display()
        );
    }

    /// One attempt to connect again and restart the queues; true once connected.
    fn reconnect(&mut self) -> bool {
        let (mut frontend, _, protocol) = match handshake(&self.config) {
            Ok(done) => done,
            Err(e) => {
                debug!("{e}");
                return false;
            }
        };
        let mut link = self.shared.lock();
        link.protocol = protocol;
        if let Some(active) = link.active.as_mut() {
            for setup in &mut active.queues {
                if let Some(used) = used_index(&active.memory, &setup.state) {
                    setup.state.next_avail = used;
                    setup.state.next_used = used;
                }
            }
            if let Err(e) = start_rings(&mut frontend, protocol, active, &self.kicks, &self.calls) {
                warn!("vhost-user backend back but its queues cannot start: {e}");
                return false;
            }
        }
        link.frontend = Some(frontend);
        let window = link.config.len();
        if let Some(config) = read_backend_config(&mut link, window) {
            link.config = config;
        }
        self.shared
            .counters
            .reconnects
            .fetch_add(1, Ordering::Relaxed);
        info!(
            "vhost-user backend {} is back",
            self.config.socket.display()
        );
        true
    }

    fn relay_call(&self, queue: u64) {
        let Some(call) = usize::try_from(queue).ok().and_then(|i| self.calls.get(i)) else {
            return;
        };
        // The counter's value does not matter: one interrupt covers every completion.
        let _ = call.read();
        if let Err(e) = self.shared.count_and_raise(
            &self.shared.counters.used_interrupts,
            VirtioInterrupt::signal_used_queue,
        ) {
            error!("vhost-user used-ring interrupt: {e}");
        }
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(relay) = self.relay.take() {
            let _ = relay.join();
        }
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.config.device_type
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.config.queue_sizes
    }

    fn features(&self) -> u64 {
        self.offered_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut link = self.shared.lock();
        if let Some(range) = link.config_range(offset, data.len()) {
            if let Some(frontend) = link.frontend.as_mut() {
                let buf = vec![0u8; data.len()];
                match frontend.get_config(
                    range.start as u32,
                    data.len() as u32,
                    VhostUserConfigFlags::WRITABLE,
                    &buf,
                ) {
                    Ok((_, bytes)) if bytes.len() == data.len() => {
                        link.config[range].copy_from_slice(&bytes);
                    }
                    Ok(_) => warn!("vhost-user GET_CONFIG at {offset:#x}: short reply"),
                    Err(e) => {
                        warn!(
                            "vhost-user GET_CONFIG at {offset:#x}: {e}; the last value read is used"
                        );
                        break_link(frontend);
                    }
                }
            }
        }
        super::read_config_bytes(&link.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut link = self.shared.lock();
        let range = link.config_range(offset, data.len());
        let (Some(range), Some(frontend)) = (range, link.frontend.as_mut()) else {
            warn!(
                "vhost-user config write at {offset:#x} dropped (outside the window or no backend)"
            );
            return;
        };
        if let Err(e) =
            frontend.set_config(range.start as u32, VhostUserConfigFlags::WRITABLE, data)
        {
            warn!("vhost-user SET_CONFIG at {offset:#x}: {e}");
            break_link(frontend);
            return;
        }
        link.config[range].copy_from_slice(data);
    }

    fn activate(&mut self, context: ActivateContext) -> Result<()> {
        let queues = context
            .queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready())
            .map(|(index, q)| QueueSetup {
                index,
                state: q.state(),
            })
            .collect();
        let active = Active {
            memory: context.memory,
            interrupt: context.interrupt,
            acked_features: context.acked_features,
            queues,
        };
        let mut link = self.shared.lock();
        let protocol = link.protocol;
        match link.frontend.as_mut() {
            Some(frontend) => {
                start_rings(frontend, protocol, &active, &self.kicks, &self.calls)?;
            }
            None => warn!(
                "vhost-user device activated while its backend is away: it starts when the \
                 backend is back"
            ),
        }
        link.active = Some(active);
        Ok(())
    }

    fn queue_notify(&mut self, index: u32) {
        if let Some(kick) = usize::try_from(index).ok().and_then(|i| self.kicks.get(i)) {
            if let Err(e) = kick.write(1) {
                warn!("vhost-user kick of queue {index}: {e}");
            }
        }
    }

    fn reset(&mut self) {
        let mut link = self.shared.lock();
        let Some(active) = link.active.take() else {
            return;
        };
        if let Some(frontend) = link.frontend.as_mut() {
            for setup in &active.queues {
                // GET_VRING_BASE stops the ring in the backend.
                if let Err(e) = frontend.get_vring_base(setup.index) {
                    warn!("vhost-user GET_VRING_BASE {}: {e}", setup.index);
                }
            }
        }
    }

    fn queue_states(&self) -> Vec<QueueState> {
        let link = self.shared.lock();
        let Some(active) = link.active.as_ref() else {
            return Vec::new();
        };
        self.config
            .queue_sizes
            .iter()
            .enumerate()
            .map(|(index, &max_size)| {
                match active.queues.iter().find(|s| s.index == index) {
                    Some(setup) => {
                        let mut state = setup.state;
                        // The backend does not say where it is; what the guest sees completed is
                        // where a restored backend starts (it serves in order).
                        if let Some(used) = used_index(&active.memory, &state) {
                            state.next_avail = used;
                            state.next_used = used;
                        }
                        state
                    }
                    None => Queue::new(max_size).map(|q| q.state()).unwrap_or_default(),
                }
            })
            .collect()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let c = &self.shared.counters;
        let connected = u64::from(self.shared.lock().frontend.is_some());
        vec![
            ("connected", connected),
            ("disconnects", c.disconnects.load(Ordering::Relaxed)),
            ("reconnects", c.reconnects.load(Ordering::Relaxed)),
            ("used_interrupts", c.used_interrupts.load(Ordering::Relaxed)),
            ("config_changes", c.config_changes.load(Ordering::Relaxed)),
            ("errors", c.errors.load(Ordering::Relaxed)),
        ]
    }

    fn save_state(&self) -> Option<serde_json::Value> {
        let state = VhostUserState {
            offered_features: self.offered_features,
            config: self.shared.lock().config.clone(),
        };
        serde_json::to_value(state).ok()
    }

    fn restore_state(&mut self, state: Option<&serde_json::Value>) -> Result<()> {
        let Some(state) = state else {
            return Ok(());
        };
        let saved: VhostUserState = serde_json::from_value(state.clone())
            .map_err(|e| Error::Snapshot(format!("vhost-user device state: {e}")))?;
        let missing = saved.offered_features & !self.offered_features;
        if missing != 0 {
            return Err(Error::Snapshot(format!(
                "the vhost-user backend {} no longer offers features {missing:#x} the guest \
                 negotiated",
                self.config.socket.display()
            )));
        }
        let current = self.shared.lock().config.clone();
        if current != saved.config {
            info!(
                "vhost-user backend config differs from the snapshot's ({:?} now, {:?} saved): \
                 the backend keeps its device state",
                current, saved.config
            );
        }
        Ok(())
    }
}
