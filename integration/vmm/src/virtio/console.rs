//! virtio-console (device type 3), single port: the guest's `hvc0` output goes to a writer.
//!
//! Only the transmit direction carries data; the receive queue is accepted but never filled
//! (host input reaches the guest through the serial port).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::Bytes;

use super::{read_config_bytes, ActivateContext, VirtioDevice, VirtioInterrupt};
use crate::error::{Error, Result};
use crate::memory::GuestRam;

const QUEUE_SIZES: [u16; 2] = [64, 64];
/// Queue 0 is port 0's receiveq, queue 1 its transmitq (virtio 1.x §5.3.2); virtio-bindings
/// has no virtio-console constants.
const TRANSMIT_QUEUE: u32 = 1;
/// `struct virtio_console_config`: `le16 cols, le16 rows, le32 max_nr_ports, le32 emerg_wr`
/// (virtio 1.x §5.3.4), 12 bytes.
const CONFIG_LEN: usize = 12;
/// Largest descriptor we copy out at once; bigger ones are a guest bug or an attack.
const MAX_CHUNK: u32 = 1 << 20;

struct Active {
    memory: GuestRam,
    /// Never filled, but kept so a snapshot records the driver's setup of it.
    receive: Queue,
    transmit: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// The console device.
pub struct Console {
    out: Box<dyn Write + Send>,
    active: Option<Active>,
    tx_bytes: AtomicU64,
    notifications: AtomicU64,
}

impl Console {
    /// A console whose guest output goes to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Console {
            out,
            active: None,
            tx_bytes: AtomicU64::new(0),
            notifications: AtomicU64::new(0),
        }
    }

    fn drain_transmit(&mut self) -> Result<()> {
        let Some(active) = self.active.as_mut() else {
            return Ok(());
        };
        let mut used_any = false;
        while let Some(chain) = active.transmit.pop_descriptor_chain(&active.memory) {
            let head = chain.head_index();
            for desc in chain.clone().filter(|d| !d.is_write_only()) {
                let len = desc.len().min(MAX_CHUNK) as usize;
                let mut buf = vec![0u8; len];
                if let Err(e) = active.memory.read_slice(&mut buf, desc.addr()) {
                    tracing::warn!("virtio-console: bad descriptor: {e}");
                    break;
                }
                if let Err(e) = self.out.write_all(&buf) {
                    tracing::warn!("virtio-console: output failed: {e}");
                }
                self.tx_bytes.fetch_add(len as u64, Ordering::Relaxed);
            }
            active
                .transmit
                .add_used(&active.memory, head, 0)
                .map_err(|e| Error::Virtio(format!("console add_used: {e}")))?;
            used_any = true;
        }
        let _ = self.out.flush();
        if used_any
            && active
                .transmit
                .needs_notification(&active.memory)
                .map_err(|e| Error::Virtio(format!("console notification: {e}")))?
        {
            active.interrupt.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: meaningless without SIZE/MULTIPORT; all zero.
        read_config_bytes(&[0u8; CONFIG_LEN], offset, data);
    }

    fn activate(&mut self, mut context: ActivateContext) -> Result<()> {
        if context.queues.len() != QUEUE_SIZES.len() {
            return Err(Error::Virtio("console needs two queues".into()));
        }
        let transmit = context.queues.remove(TRANSMIT_QUEUE as usize);
        let receive = context.queues.remove(0);
        self.active = Some(Active {
            memory: context.memory,
            receive,
            transmit,
            interrupt: context.interrupt,
        });
        Ok(())
    }

    fn queue_notify(&mut self, index: u32) {
        self.notifications.fetch_add(1, Ordering::Relaxed);
        if index == TRANSMIT_QUEUE {
            if let Err(e) = self.drain_transmit() {
                tracing::warn!("virtio-console: {e}");
            }
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.receive.state(), a.transmit.state()])
            .unwrap_or_default()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("tx_bytes", self.tx_bytes.load(Ordering::Relaxed)),
            ("notifications", self.notifications.load(Ordering::Relaxed)),
        ]
    }
}
