//! Virtio devices behind an MMIO transport of our own (virtio 1.x, non-legacy).
//!
//! A device implements [`VirtioDevice`]: its type, features, config space and what to do when
//! the driver kicks a queue. The transport ([`mmio::MmioTransport`]) owns the register file,
//! feature negotiation and queue setup, and activates the device with the negotiated queues
//! and a [`VirtioInterrupt`]. Adding a device (virtio-balloon next) means one new file that
//! implements the trait; nothing in the transport changes.
//!
//! Devices write guest memory only through vm-memory ([`GuestRam`]'s `Bytes` and
//! `VolatileSlice` accesses, which virtio-queue's used-ring updates and descriptor-chain
//! `Writer` use), so every page they write is marked in the regions' dirty bitmaps that diff
//! snapshots read; a device must not write guest memory through raw host pointers.

pub mod block;
pub mod console;
pub mod mmio;
pub mod persist;
pub mod vhost_user;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use super::error::Result;
use super::memory::GuestRam;

/// The interrupt line of one virtio-mmio device: the status bits the driver reads and acks,
/// and the irqfd that raises the device's GSI.
pub struct VirtioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl VirtioInterrupt {
    /// An interrupt raised through `irqfd` (registered with KVM by the caller).
    pub fn new(irqfd: EventFd) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Tells the driver that a used ring changed.
    pub fn signal_used_queue(&self) -> Result<()> {
        self.signal(VIRTIO_MMIO_INT_VRING)
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config_change(&self) -> Result<()> {
        self.signal(VIRTIO_MMIO_INT_CONFIG)
    }

    fn signal(&self, bit: u32) -> Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irqfd
            .write(1)
            .map_err(|e| super::error::Error::Sys("irqfd write", e))
    }

    /// The `InterruptStatus` register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Sets the `InterruptStatus` bits of a restored snapshot (the interrupt itself is
    /// already pending in the restored irqchip).
    pub fn restore_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// `InterruptACK`: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What a device receives when the driver sets `DRIVER_OK`.
pub struct ActivateContext {
    /// Guest memory the queues live in.
    pub memory: GuestRam,
    /// The configured queues, in device queue order.
    pub queues: Vec<Queue>,
    /// The device's interrupt.
    pub interrupt: std::sync::Arc<VirtioInterrupt>,
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// Virtio device ID (`virtio_bindings::virtio_ids::VIRTIO_ID_*`: 2 = block, 3 = console,
    /// 5 = balloon, ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver, as a mask (`1 << bit` of virtio-bindings' bit
    /// numbers; must include `1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space at `offset`.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space; read-only by default.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(
            "virtio type {}: ignored config write at {offset:#x} ({} bytes)",
            self.device_type(),
            data.len()
        );
    }
    /// Starts the device with the driver's queues.
    fn activate(&mut self, context: ActivateContext) -> Result<()>;
    /// The driver notified queue `index` (called on the vCPU thread that wrote QueueNotify).
    fn queue_notify(&mut self, index: u32);
    /// The driver reset the device: drop the queues and return to the pre-activation state.
    fn reset(&mut self);
    /// The state of every queue the device received at activation, in device queue order
    /// (empty while not activated), for a snapshot.
    fn queue_states(&self) -> Vec<QueueState>;
    /// Name/value counters for `vm.counters`.
    fn counters(&self) -> Vec<(&'static str, u64)>;
    /// Device state beyond the transport and queues, for a snapshot (`None`: nothing).
    fn save_state(&self) -> Option<serde_json::Value> {
        None
    }
    /// Takes back what [`VirtioDevice::save_state`] saved (`None` from snapshots without
    /// it), before the restored device is activated.
    fn restore_state(&mut self, state: Option<&serde_json::Value>) -> Result<()> {
        let _ = state;
        Ok(())
    }
}

/// Copies `data` into `config` at `offset`, clamped to the config size (reads beyond are 0).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(config.len());
    let end = start.saturating_add(data.len()).min(config.len());
    data[..end - start].copy_from_slice(&config[start..end]);
}
