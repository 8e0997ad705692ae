//! virtio-blk (device type 2) backed by a host file, served synchronously on the notifying
//! vCPU thread.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use std::collections::BTreeSet;

use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use super::{
    read_config_bytes, ActivateContext, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::config::DiskConfig;
use crate::error::{Error, Result};

const TYPE_BLOCK: u32 = 2;
const QUEUE_SIZES: [u16; 1] = [128];
const SECTOR_SIZE: u64 = 512;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
const REQUEST_IN: u32 = 0;
const REQUEST_OUT: u32 = 1;
const REQUEST_FLUSH: u32 = 4;
const REQUEST_GET_ID: u32 = 8;
const STATUS_OK: u8 = 0;
const STATUS_IOERR: u8 = 1;
const STATUS_UNSUPPORTED: u8 = 2;
/// Largest single data descriptor accepted (guards the bounce buffer).
const MAX_SEGMENT: u32 = 4 << 20;
const DEVICE_ID: &[u8] = b"ext-vmm-blk";
const PAGE_SIZE: u64 = 4096;

struct Active {
    memory: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// Counters of the block device.
#[derive(Default)]
struct Stats {
    read_bytes: u64,
    write_bytes: u64,
    read_ops: u64,
    write_ops: u64,
    flushes: u64,
    errors: u64,
    notifications: u64,
}

/// The block device.
pub struct Block {
    file: File,
    readonly: bool,
    capacity_sectors: u64,
    active: Option<Active>,
    stats: Stats,
    /// Guest frames of device-writable buffers handed to us since the last snapshot: KVM's
    /// dirty log does not see the VMM's own writes into guest memory.
    written_pages: BTreeSet<u64>,
}

impl Block {
    /// Opens the disk described by `config`.
    pub fn new(config: &DiskConfig) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!config.readonly)
            .open(&config.path)
            .map_err(|source| Error::File {
                path: config.path.display().to_string(),
                source,
            })?;
        let len = file
            .metadata()
            .map_err(|e| Error::Sys("stat disk", e))?
            .len();
        Ok(Block {
            file,
            readonly: config.readonly,
            capacity_sectors: len / SECTOR_SIZE,
            active: None,
            stats: Stats::default(),
            written_pages: BTreeSet::new(),
        })
    }

    /// Executes one request; returns (status, bytes written into guest buffers before the
    /// status byte).
    fn execute(
        &mut self,
        memory: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> std::result::Result<(GuestAddress, u8, u32), String> {
        let descriptors: Vec<_> = chain.collect();
        let (header, rest) = descriptors.split_first().ok_or("empty chain")?;
        let (status, data) = rest.split_last().ok_or("no status descriptor")?;
        if header.len() < 16 || !status.is_write_only() || status.len() < 1 {
            return Err("malformed request".into());
        }
        let request_type: u32 = memory.read_obj(header.addr()).map_err(|e| e.to_string())?;
        let sector: u64 = memory
            .read_obj(header.addr().unchecked_add(8))
            .map_err(|e| e.to_string())?;
        let mut offset = sector.checked_mul(SECTOR_SIZE).ok_or("sector overflow")?;
        let mut written = 0u32;
        let capacity = self.capacity_sectors * SECTOR_SIZE;
        let result = match request_type {
            REQUEST_IN | REQUEST_OUT => {
                let mut status_code = STATUS_OK;
                for desc in data {
                    let len = desc.len().min(MAX_SEGMENT);
                    let end = offset.checked_add(u64::from(len));
                    if end.is_none_or(|end| end > capacity)
                        || (request_type == REQUEST_IN) != desc.is_write_only()
                        || (request_type == REQUEST_OUT && self.readonly)
                    {
                        status_code = STATUS_IOERR;
                        break;
                    }
                    let mut buf = vec![0u8; len as usize];
                    let io = if request_type == REQUEST_IN {
                        self.file
                            .read_exact_at(&mut buf, offset)
                            .map_err(|e| e.to_string())
                            .and_then(|()| {
                                memory
                                    .write_slice(&buf, desc.addr())
                                    .map_err(|e| e.to_string())
                            })
                    } else {
                        memory
                            .read_slice(&mut buf, desc.addr())
                            .map_err(|e| e.to_string())
                            .and_then(|()| {
                                self.file
                                    .write_all_at(&buf, offset)
                                    .map_err(|e| e.to_string())
                            })
                    };
                    if let Err(e) = io {
                        tracing::warn!("virtio-blk: I/O at {offset:#x}: {e}");
                        status_code = STATUS_IOERR;
                        break;
                    }
                    if request_type == REQUEST_IN {
                        written += len;
                        self.stats.read_bytes += u64::from(len);
                    } else {
                        self.stats.write_bytes += u64::from(len);
                    }
                    offset += u64::from(len);
                }
                if request_type == REQUEST_IN {
                    self.stats.read_ops += 1;
                } else {
                    self.stats.write_ops += 1;
                }
                status_code
            }
            REQUEST_FLUSH => {
                self.stats.flushes += 1;
                match self.file.sync_all() {
                    Ok(()) => STATUS_OK,
                    Err(_) => STATUS_IOERR,
                }
            }
            REQUEST_GET_ID => match data.first() {
                Some(desc) if desc.is_write_only() => {
                    let len = DEVICE_ID.len().min(desc.len() as usize);
                    memory
                        .write_slice(&DEVICE_ID[..len], desc.addr())
                        .map_err(|e| e.to_string())?;
                    written = len as u32;
                    STATUS_OK
                }
                _ => STATUS_IOERR,
            },
            _ => STATUS_UNSUPPORTED,
        };
        Ok((status.addr(), result, written))
    }

    fn process(&mut self) -> Result<()> {
        let Some(mut active) = self.active.take() else {
            return Ok(());
        };
        let outcome = self.process_active(&mut active);
        self.active = Some(active);
        outcome
    }

    fn process_active(&mut self, active: &mut Active) -> Result<()> {
        let mut used_any = false;
        while let Some(chain) = active.queue.pop_descriptor_chain(&active.memory) {
            let head = chain.head_index();
            for desc in chain.clone().filter(|d| d.is_write_only()) {
                let first = desc.addr().0 / PAGE_SIZE;
                let last = (desc.addr().0 + u64::from(desc.len().max(1)) - 1) / PAGE_SIZE;
                self.written_pages.extend(first..=last);
            }
            let used_len = match self.execute(&active.memory, chain) {
                Ok((status_addr, status, written)) => {
                    if status != STATUS_OK {
                        self.stats.errors += 1;
                    }
                    active
                        .memory
                        .write_obj(status, status_addr)
                        .map_err(|e| Error::Virtio(format!("blk status: {e}")))?;
                    written + 1
                }
                Err(e) => {
                    self.stats.errors += 1;
                    tracing::warn!("virtio-blk: dropped request: {e}");
                    0
                }
            };
            active
                .queue
                .add_used(&active.memory, head, used_len)
                .map_err(|e| Error::Virtio(format!("blk add_used: {e}")))?;
            used_any = true;
        }
        if used_any
            && active
                .queue
                .needs_notification(&active.memory)
                .map_err(|e| Error::Virtio(format!("blk notification: {e}")))?
        {
            active.interrupt.signal_used_queue()?;
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH;
        if self.readonly {
            features |= VIRTIO_BLK_F_RO;
        }
        features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_blk_config starts with `le64 capacity` (in 512-byte sectors).
        read_config_bytes(&self.capacity_sectors.to_le_bytes(), offset, data);
    }

    fn activate(&mut self, mut context: ActivateContext) -> Result<()> {
        let queue = context
            .queues
            .pop()
            .ok_or_else(|| Error::Virtio("block needs one queue".into()))?;
        self.active = Some(Active {
            memory: context.memory,
            queue,
            interrupt: context.interrupt,
        });
        Ok(())
    }

    fn queue_notify(&mut self, _index: u32) {
        self.stats.notifications += 1;
        if let Err(e) = self.process() {
            tracing::warn!("virtio-blk: {e}");
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_states(&self) -> Vec<QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.queue.state()])
            .unwrap_or_default()
    }

    fn take_written_pages(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.written_pages)
            .into_iter()
            .collect()
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = &self.stats;
        vec![
            ("read_bytes", s.read_bytes),
            ("write_bytes", s.write_bytes),
            ("read_ops", s.read_ops),
            ("write_ops", s.write_ops),
            ("flushes", s.flushes),
            ("errors", s.errors),
            ("notifications", s.notifications),
        ]
    }
}
