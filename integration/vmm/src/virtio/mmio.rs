//! The virtio-mmio transport (virtio 1.x §4.2.2, version 2 register layout).

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID, VIRTIO_MMIO_VERSION,
};
use virtio_queue::{Queue, QueueState, QueueT};

use super::persist::{QueueSnapshot, TransportSnapshot};
use super::{ActivateContext, VirtioDevice, VirtioInterrupt};
use crate::bus::BusDevice;
use crate::error::{Error, Result};
use crate::memory::GuestRam;

/// The `MagicValue` register: "virt" in little endian (virtio 1.x §4.2.2); virtio-bindings has
/// only the register's offset.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The `Version` register of non-legacy virtio-mmio (virtio 1.x §4.2.2: 0x2; legacy is 0x1);
/// virtio-bindings has only the register's offset.
pub const MMIO_VERSION: u32 = 2;
/// Our vendor ID ("EXT\0"), not a virtio constant.
pub const MMIO_VENDOR_ID: u32 = 0x0054_5845;
/// Device-specific configuration space starts here (`VIRTIO_MMIO_CONFIG`, §4.2.2).
pub const CONFIG_SPACE_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

/// One virtio device behind its MMIO register window.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    memory: GuestRam,
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
        memory: GuestRam,
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
        memory: GuestRam,
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
        transport.device.restore_state(state.device.as_ref())?;
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
            device: self.device.save_state(),
        }
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
        if status & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0
        {
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
            {
                // Refusing FEATURES_OK tells the driver negotiation failed.
                status &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        self.status = status;
        if status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !self.activated {
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
            self.status |= VIRTIO_CONFIG_S_FAILED;
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
                self.status |= VIRTIO_CONFIG_S_FAILED;
            }
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let Ok(register) = u32::try_from(offset) else {
            return 0;
        };
        match register {
            VIRTIO_MMIO_MAGIC_VALUE => MMIO_MAGIC_VALUE,
            VIRTIO_MMIO_VERSION => MMIO_VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => MMIO_VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                tracing::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let Ok(register) = u32::try_from(offset) else {
            return;
        };
        match register {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            VIRTIO_MMIO_DRIVER_FEATURES => match self.driver_features_select {
                0 => {
                    self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(value)
                }
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                }
                _ => {}
            },
            VIRTIO_MMIO_QUEUE_SEL => self.queue_select = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(value as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => {
                if let Some(q) = self.selected_queue() {
                    let (low, high) = match register {
                        VIRTIO_MMIO_QUEUE_DESC_LOW
                        | VIRTIO_MMIO_QUEUE_AVAIL_LOW
                        | VIRTIO_MMIO_QUEUE_USED_LOW => (Some(value), None),
                        _ => (None, Some(value)),
                    };
                    match register {
                        VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                            q.set_desc_table_address(low, high)
                        }
                        VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                            q.set_avail_ring_address(low, high)
                        }
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                if self.activated {
                    self.device.queue_notify(value);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
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

#[cfg(test)]
mod tests {
    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER};
    use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::virtio::console::Console;

    fn transport() -> MmioTransport {
        let memory = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        MmioTransport::new(
            Box::new(Console::new(Box::new(std::io::sink()))),
            memory,
            interrupt,
        )
    }

    fn read(t: &mut MmioTransport, register: u32) -> u32 {
        let mut data = [0u8; 4];
        t.read(u64::from(register), &mut data);
        u32::from_le_bytes(data)
    }

    fn write(t: &mut MmioTransport, register: u32, value: u32) {
        t.write(u64::from(register), &value.to_le_bytes());
    }

    #[test]
    fn identification_registers() {
        let mut t = transport();
        assert_eq!(read(&mut t, VIRTIO_MMIO_MAGIC_VALUE), MMIO_MAGIC_VALUE);
        assert_eq!(read(&mut t, VIRTIO_MMIO_VERSION), MMIO_VERSION);
        assert_eq!(read(&mut t, VIRTIO_MMIO_DEVICE_ID), VIRTIO_ID_CONSOLE);
        assert_eq!(read(&mut t, VIRTIO_MMIO_VENDOR_ID), MMIO_VENDOR_ID);
        write(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_DEVICE_FEATURES),
            1 << (VIRTIO_F_VERSION_1 - 32)
        );
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 64);
    }

    #[test]
    fn features_ok_needs_version_1() {
        let mut t = transport();
        let driver = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
        write(
            &mut t,
            VIRTIO_MMIO_STATUS,
            driver | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(read(&mut t, VIRTIO_MMIO_STATUS), driver);
        write(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        write(
            &mut t,
            VIRTIO_MMIO_DRIVER_FEATURES,
            1 << (VIRTIO_F_VERSION_1 - 32),
        );
        write(
            &mut t,
            VIRTIO_MMIO_STATUS,
            driver | VIRTIO_CONFIG_S_FEATURES_OK,
        );
        assert_eq!(
            read(&mut t, VIRTIO_MMIO_STATUS),
            driver | VIRTIO_CONFIG_S_FEATURES_OK
        );
    }

    #[test]
    fn queue_address_registers() {
        let mut t = transport();
        write(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
        write(&mut t, VIRTIO_MMIO_QUEUE_NUM, 32);
        write(&mut t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000);
        write(&mut t, VIRTIO_MMIO_QUEUE_DESC_HIGH, 0x1);
        write(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x2000);
        write(&mut t, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, 0x2);
        write(&mut t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x3000);
        write(&mut t, VIRTIO_MMIO_QUEUE_USED_HIGH, 0x3);
        write(&mut t, VIRTIO_MMIO_QUEUE_READY, 1);
        assert_eq!(read(&mut t, VIRTIO_MMIO_QUEUE_READY), 1);
        let queue = t.state().queues[1];
        assert_eq!(queue.size, 32);
        assert_eq!(queue.desc_table, 0x1_0000_1000);
        assert_eq!(queue.avail_ring, 0x2_0000_2000);
        assert_eq!(queue.used_ring, 0x3_0000_3000);
        assert!(queue.ready);
        assert_eq!(t.state().queues[0].desc_table, 0);
    }
}
