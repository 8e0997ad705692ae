//! The virtio-mmio transport (virtio 1.x §4.2.2, version 2 register layout).

use std::sync::Arc;

use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::GuestMemoryMmap;

use super::persist::{QueueSnapshot, TransportSnapshot};
use super::{ActivateContext, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;
use crate::error::{Error, Result};

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Non-legacy virtio-mmio.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor ID ("EXT\0").
pub const MMIO_VENDOR_ID: u32 = 0x0054_5845;

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// Device-specific configuration space starts here.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FAILED: u32 = 0x80;

/// One virtio device behind its MMIO register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    queue_select: u32,
    device_features_select: u32,
    driver_features_select: u32,
    driver_features: u64,
    status: u32,
    activated: bool,
    config_generation: u32,
}

impl MmioTransport {
    /// Wraps `device`; its queues live in `memory`, its interrupt is `interrupt`.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Self {
        let queues = Self::fresh_queues(device.as_ref());
        MmioTransport {
            device,
            memory,
            interrupt,
            queues,
            queue_select: 0,
            device_features_select: 0,
            driver_features_select: 0,
            driver_features: 0,
            status: 0,
            activated: false,
            config_generation: 0,
        }
    }

    /// Rebuilds a transport from a snapshot: registers, queues and, for an activated device,
    /// the device itself running on the restored queues. Fails when the snapshot describes
    /// another device type or queues the device does not have.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        memory: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        state: &TransportSnapshot,
    ) -> Result<Self> {
        if state.device_type != device.device_type()
            || state.queues.len() != device.queue_max_sizes().len()
        {
            return Err(Error::Snapshot(format!(
                "virtio device type {} with {} queues does not match the snapshot's type {} \
                 with {} queues",
                device.device_type(),
                device.queue_max_sizes().len(),
                state.device_type,
                state.queues.len()
            )));
        }
        let queues = state
            .queues
            .iter()
            .map(|q| {
                Queue::try_from(QueueState::from(q))
                    .map_err(|e| Error::Snapshot(format!("virtio queue state: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        interrupt.restore_status(state.interrupt_status);
        let mut transport = MmioTransport {
            device,
            memory,
            interrupt,
            queues,
            queue_select: state.queue_select,
            device_features_select: state.device_features_select,
            driver_features_select: state.driver_features_select,
            driver_features: state.driver_features,
            status: state.status,
            activated: false,
            config_generation: state.config_generation,
        };
        if state.activated {
            let context = ActivateContext {
                memory: transport.memory.clone(),
                queues: std::mem::take(&mut transport.queues),
                interrupt: transport.interrupt.clone(),
                acked_features: transport.driver_features,
            };
            transport.device.activate(context)?;
            transport.activated = true;
        }
        Ok(transport)
    }

    /// The transport's and device's state, for a snapshot (the VM must be paused).
    pub fn state(&self) -> TransportSnapshot {
        let queues = if self.activated {
            self.device.queue_states()
        } else {
            self.queues.iter().map(|q| q.state()).collect()
        };
        TransportSnapshot {
            device_type: self.device.device_type(),
            status: self.status,
            driver_features: self.driver_features,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            queue_select: self.queue_select,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            activated: self.activated,
            queues: queues.into_iter().map(QueueSnapshot::from).collect(),
        }
    }

    /// Guest frames the device side wrote since the last call: the device's buffers plus
    /// every used ring (whose index and entries the device updates).
    pub fn take_written_pages(&mut self) -> Vec<u64> {
        const PAGE: u64 = 4096;
        let mut pages = self.device.take_written_pages();
        for queue in self.state().queues.iter().filter(|q| q.ready) {
            // struct virtq_used: flags, idx, `size` elements of 8 bytes, avail_event.
            let len = 6 + 8 * u64::from(queue.size);
            let first = queue.used_ring / PAGE;
            let last = (queue.used_ring + len - 1) / PAGE;
            pages.extend(first..=last);
        }
        pages
    }

    fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
        device
            .queue_max_sizes()
            .iter()
            // Sizes come from our own device code and are powers of two below 32768.
            .filter_map(|&size| Queue::new(size).ok())
            .collect()
    }

    /// The wrapped device (for counters).
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        // Queue registers may change only before DRIVER_OK (virtio 1.x §4.2.2.3).
        if self.activated {
            return None;
        }
        self.queues.get_mut(self.queue_select as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.queues = Self::fresh_queues(self.device.as_ref());
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn set_status(&mut self, status: u32) {
        if status == 0 {
            self.reset();
            return;
        }
        let mut status = status;
        if status & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // Refusing FEATURES_OK tells the driver negotiation failed.
                status &= !STATUS_FEATURES_OK;
            }
        }
        self.status = status;
        if status & STATUS_DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let valid = self
            .queues
            .iter()
            .all(|q| !q.ready() || q.is_valid(&self.memory));
        if !valid {
            tracing::warn!(
                "virtio type {}: invalid queue setup",
                self.device.device_type()
            );
            self.status |= STATUS_FAILED;
            return;
        }
        let context = ActivateContext {
            memory: self.memory.clone(),
            // The device owns the queues from now on; a reset builds fresh ones.
            queues: std::mem::take(&mut self.queues),
            interrupt: self.interrupt.clone(),
            acked_features: self.driver_features,
        };
        match self.device.activate(context) {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::error!(
                    "virtio type {}: activation failed: {e}",
                    self.device.device_type()
                );
                self.status |= STATUS_FAILED;
            }
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_DRIVER_FEATURES => match self.driver_features_select {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.selected_queue() {
                    let (low, high) = if offset & 4 == 0 {
                        (Some(value), None)
                    } else {
                        (None, Some(value))
                    };
                    match offset & !4 {
                        REG_QUEUE_DESC_LOW => q.set_desc_table_address(low, high),
                        REG_QUEUE_DRIVER_LOW => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            REG_QUEUE_NOTIFY => {
                if self.activated {
                    self.device.queue_notify(value);
                }
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.set_status(value),
            _ => tracing::debug!("virtio-mmio: write {value:#x} to unknown register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
        } else if data.len() == 4 && offset % 4 == 0 {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            // Registers are 32-bit only (§4.2.2.2); other widths read as zero.
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            if offset % 4 == 0 {
                self.write_register(offset, u32::from_le_bytes(bytes));
            }
        }
    }
}
