//! The vhost-user side of the balloon: [`BalloonBackend`] implements vhost-user-backend's
//! `VhostUserBackendMut` over the device logic in [`crate::balloon`].
//!
//! One backend lives for the whole daemon and is shared by every connection
//! ([`SharedBackend`]); a new `VhostUserDaemon` is built around it for each frontend, so the
//! balloon's state (target, `actual`, invalid-page map, counters, stats) survives reconnects.
//!
//! Nothing the guest sends makes `handle_event` fail: vhost-user-backend ends the queue worker
//! thread on an error, so problems are logged and the event is dropped.

use std::io;
use std::sync::{Arc, PoisonError, RwLock, RwLockWriteGuard};

use tracing::{debug, error, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::vhost_user::Backend;
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::balloon::{queue_kind, Balloon, QueueKind, DEVICE_FEATURES, MAX_QUEUES};
use crate::config_change::ConfigChannel;
use crate::error::{Error, Result};
use crate::memory;

/// Largest queue size a frontend may set.
pub const MAX_QUEUE_SIZE: usize = 1024;

/// The backend as the daemon shares it between connections and its own callers.
pub type SharedBackend = Arc<RwLock<BalloonBackend>>;

/// Guest memory as vhost-user-backend hands it over.
type Memory = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The balloon behind a vhost-user socket.
#[derive(Default)]
pub struct BalloonBackend {
    balloon: Balloon,
    mem: Option<Memory>,
    event_idx: bool,
    /// The current connection's vrings, learnt from the first queue event (vhost-user-backend
    /// hands them out nowhere else); needed to return the stats buffer from outside an event.
    vrings: Vec<VringRwLock>,
    /// The current connection's backend request channel, for config-change messages.
    config_channel: Option<ConfigChannel>,
    /// vhost's handle of the same channel, kept so that its end stays open as long as ours.
    backend_req: Option<Backend>,
}

impl BalloonBackend {
    /// A backend with an empty balloon.
    pub fn new() -> Self {
        Self::default()
    }

    /// A backend ready to share.
    pub fn shared() -> SharedBackend {
        Arc::new(RwLock::new(Self::new()))
    }

    /// The device state.
    pub fn balloon(&self) -> &Balloon {
        &self.balloon
    }

    /// Sets the balloon target (`num_pages`) to `target_pages` 4 KiB pages and tells the guest:
    /// a `VHOST_USER_BACKEND_CONFIG_CHANGE_MSG` on the backend request channel makes the
    /// frontend raise the config interrupt, on which Linux's driver reads the new target.
    ///
    /// Returns whether the guest was told. Without a channel (no frontend, a frontend that did
    /// not accept `VHOST_USER_PROTOCOL_F_BACKEND_REQ`, or a send that failed: logged), the
    /// target is kept and the guest sees it when its driver next reads the config space (at
    /// probe, after a restore, or on the next config interrupt).
    pub fn resize(&mut self, target_pages: u32) -> bool {
        debug!(target_pages, "balloon target set");
        self.balloon.set_target_pages(target_pages);
        let Some(channel) = self.config_channel.as_ref() else {
            return false;
        };
        match channel.notify_config_change() {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "config-change message failed; the guest reads the target later");
                false
            }
        }
    }

    /// Returns the held stats buffer to the guest so that it sends fresh statistics.
    /// `Ok(false)` if there is nothing to return (stats not negotiated, no buffer held, no
    /// connection).
    pub fn request_stats(&mut self) -> Result<bool> {
        let acked = self.balloon.acked_features();
        let Some(index) = (0..MAX_QUEUES).find(|&i| queue_kind(acked, i) == Some(QueueKind::Stats))
        else {
            return Ok(false);
        };
        let (Some(vring), Some(atomic)) = (self.vrings.get(index), self.mem.as_ref()) else {
            return Ok(false);
        };
        let mem = atomic.memory();
        let notify = {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            self.balloon.request_stats(queue, &mem)? && queue.needs_notification(&*mem)?
        };
        if notify {
            vring.signal_used_queue().map_err(Error::Signal)?;
        }
        Ok(notify)
    }

    /// The invalid-page map as one bitmap per region of the current memory table (the input
    /// of `ext_snapshot::RegionBitmaps`), or `None` before the first memory table.
    pub fn invalid_region_bitmaps(&self) -> Option<Vec<Vec<u64>>> {
        let mem = self.mem.as_ref()?.memory();
        Some(self.balloon.invalid_pages().region_bitmaps(&*mem))
    }

    /// Bytes the host has allocated for guest memory, `None` before the first memory table.
    pub fn allocated_bytes(&self) -> Option<io::Result<u64>> {
        let mem = self.mem.as_ref()?.memory();
        Some(memory::allocated_bytes(&mem))
    }

    /// Forgets what belonged to the connection that ended (its memory mapping, vrings and the
    /// stats buffer held in its queue); keeps the device state.
    pub fn connection_closed(&mut self) {
        self.mem = None;
        self.vrings.clear();
        self.config_channel = None;
        self.backend_req = None;
        self.event_idx = false;
        self.balloon.connection_closed();
    }

    fn process(&mut self, index: usize, kind: QueueKind, vring: &VringRwLock) {
        let Some(atomic) = self.mem.as_ref() else {
            warn!(index, "queue kicked before any memory table");
            return;
        };
        let mem = atomic.memory();
        let result: Result<bool> = (|| {
            let mut state = vring.get_mut();
            let queue = state.get_queue_mut();
            let mut used = 0;
            loop {
                if self.event_idx {
                    queue.disable_notification(&*mem)?;
                }
                let before = queue.next_avail();
                used += self.balloon.process_queue(kind, queue, &mem)?.used;
                let popped = queue.next_avail() != before;
                if !self.event_idx || !queue.enable_notification(&*mem)? {
                    break;
                }
                if !popped {
                    // The available index says there is more, yet no chain could be taken
                    // (an index more than a queue ahead: a broken ring). Going round again
                    // would spin; the next kick tries again.
                    warn!(
                        index,
                        "available ring index is invalid; the queue waits for the next kick"
                    );
                    break;
                }
            }
            Ok(used > 0 && queue.needs_notification(&*mem)?)
        })();
        match result {
            Ok(true) => {
                if let Err(e) = vring.signal_used_queue() {
                    error!(index, error = %e, "cannot signal the guest");
                }
            }
            Ok(false) => {}
            Err(e) => error!(index, ?kind, error = %e, "queue unusable"),
        }
    }

    /// The guest memory of the current memory table: the daemon's own shared mappings of the
    /// frontend's files. `None` before the first memory table and after a disconnect. The
    /// mappings stay valid while the `Arc` lives, even if a new table replaces them, so a
    /// caller can release the backend lock before reading guest memory.
    pub fn guest_memory(&self) -> Option<Arc<GuestMemoryMmap<()>>> {
        Some(self.mem.as_ref()?.memory().into_inner())
    }
}

/// Locks a shared backend for writing; a panic elsewhere does not make the state unusable.
pub fn lock(backend: &SharedBackend) -> RwLockWriteGuard<'_, BalloonBackend> {
    backend.write().unwrap_or_else(PoisonError::into_inner)
}

impl VhostUserBackendMut for BalloonBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        MAX_QUEUES
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | DEVICE_FEATURES
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        debug!(features = format_args!("{features:#x}"), "features acked");
        self.balloon.set_acked_features(features);
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::BACKEND_REQ
    }

    fn set_backend_req_fd(&mut self, backend: Backend) {
        let held = self.config_channel.as_ref().map(ConfigChannel::raw_fd);
        self.config_channel = ConfigChannel::find_new(held);
        self.backend_req = Some(backend);
    }

    fn set_event_idx(&mut self, enabled: bool) {
        self.event_idx = enabled;
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // An empty reply tells the frontend the read failed.
        self.balloon.read_config(offset, size).unwrap_or_else(|| {
            warn!(offset, size, "config read outside the config space");
            Vec::new()
        })
    }

    fn set_config(&mut self, offset: u32, buf: &[u8]) -> io::Result<()> {
        self.balloon.write_config(offset, buf).map_err(|e| {
            warn!(error = %e, "config write refused");
            io::Error::new(io::ErrorKind::InvalidInput, e)
        })
    }

    fn update_memory(&mut self, mem: Memory) -> io::Result<()> {
        self.mem = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        // A fresh pair each time: each connection's worker threads get their own.
        new_event_consumer_and_notifier(EventFlag::NONBLOCK)
            .map_err(|e| error!(error = %e, "cannot create an exit event"))
            .ok()
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            warn!(device_event, ?evset, "unexpected event set");
            return Ok(());
        }
        self.vrings = vrings.to_vec();
        let index = usize::from(device_event);
        let Some(vring) = vrings.get(index) else {
            warn!(index, "event for an unknown queue");
            return Ok(());
        };
        match queue_kind(self.balloon.acked_features(), index) {
            Some(kind) => self.process(index, kind, vring),
            None => warn!(index, "kick on a queue the negotiated features do not use"),
        }
        Ok(())
    }
}
