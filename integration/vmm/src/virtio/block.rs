//! virtio-blk (virtio 1.x §5.2) backed by a host file, served synchronously on the notifying
//! vCPU thread.
//!
//! A request is parsed with virtio-queue's descriptor-chain [`Reader`] and [`Writer`], so the
//! driver may lay it out over any number of descriptors of any lengths (§2.7.4: "the device
//! MUST NOT make assumptions about the particular arrangement of descriptors"): the header is
//! the first 16 device-readable bytes, the data of an OUT request is the rest of the
//! device-readable part, the data of an IN or GET_ID request is the device-writable part, and
//! the status byte is the last device-writable byte (§5.2.6). `used.len` is the number of bytes
//! written into the device-writable part, status byte included. A request is either served in
//! full or fails with `VIRTIO_BLK_S_IOERR` (`VIRTIO_BLK_S_UNSUPP` for an unknown type); a chain
//! without a status byte goes back to the used ring with length 0.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::mem::size_of;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_outhdr, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{DescriptorChain, Queue, QueueState, QueueT, Writer};
use vm_memory::bitmap::MS;
use vm_memory::{Address, Bytes, Le32, Le64};

use super::{read_config_bytes, ActivateContext, VirtioDevice, VirtioInterrupt};
use crate::config::DiskConfig;
use crate::error::{Error, Result};
use crate::memory::GuestRam;

const QUEUE_SIZES: [u16; 1] = [128];
/// Capacity and request sectors are in 512-byte units whatever the block size (virtio 1.x
/// §5.2.4 `capacity`, §5.2.6 `sector`); virtio-bindings has no constant for it.
const SECTOR_SIZE: u64 = 512;
/// `struct virtio_blk_outhdr`: `le32 type, le32 reserved (ioprio), le64 sector` (§5.2.6).
const HEADER_LEN: usize = size_of::<virtio_blk_outhdr>();
/// Data moves between a chain and the file through a bounce buffer of at most this size, so a
/// large request does not allocate its whole length at once.
const IO_CHUNK: usize = 64 << 10;
/// The GET_ID answer: the ID string, NUL-padded to `VIRTIO_BLK_ID_BYTES` (§5.2.6).
const DEVICE_ID: [u8; VIRTIO_BLK_ID_BYTES as usize] = *b"ext-vmm-blk\0\0\0\0\0\0\0\0\0";

struct Active {
    memory: GuestRam,
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

/// Why a request failed. Everything but [`RequestError::Unsupported`] is reported to the
/// driver as `VIRTIO_BLK_S_IOERR`.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("a device-readable descriptor follows a device-writable one")]
    Order,
    #[error("a device-readable descriptor lies outside guest memory: {0}")]
    Memory(virtio_queue::Error),
    #[error("the header has {0} bytes, {HEADER_LEN} needed")]
    ShortHeader(usize),
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    Unaligned(usize),
    #[error("sector {sector} + {len} bytes is beyond the capacity of {capacity} sectors")]
    OutOfRange {
        sector: u64,
        len: usize,
        capacity: u64,
    },
    #[error("write to a read-only disk")]
    ReadOnly,
    #[error("GET_ID buffer of {0} bytes, {VIRTIO_BLK_ID_BYTES} needed")]
    ShortId(usize),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("unsupported request type {0}")]
    Unsupported(u32),
}

/// The block device.
pub struct Block {
    file: File,
    readonly: bool,
    capacity_sectors: u64,
    active: Option<Active>,
    stats: Stats,
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
        })
    }

    /// Serves one chain and writes its status byte; returns the chain's `used.len`.
    fn process_chain(&mut self, memory: &GuestRam, chain: DescriptorChain<&GuestRam>) -> u32 {
        let mut data = match chain.clone().writer(memory) {
            Ok(writer) => writer,
            Err(e) => {
                // Some device-writable descriptor lies outside guest memory; the status byte
                // may still be reachable.
                self.stats.errors += 1;
                tracing::debug!("virtio-blk: device-writable descriptor: {e}");
                return write_status_only(memory, chain, VIRTIO_BLK_S_IOERR);
            }
        };
        let writable = data.available_bytes();
        let Some(data_len) = writable.checked_sub(1) else {
            self.stats.errors += 1;
            tracing::debug!("virtio-blk: request without a status byte");
            return 0;
        };
        let mut status_byte = match data.split_at(data_len) {
            Ok(status_byte) => status_byte,
            // Unreachable: `data_len` is below `available_bytes()`.
            Err(e) => {
                self.stats.errors += 1;
                tracing::warn!("virtio-blk: status byte: {e}");
                return 0;
            }
        };
        let status = match self.execute(memory, chain, &mut data) {
            Ok(()) => VIRTIO_BLK_S_OK,
            Err(e) => {
                self.stats.errors += 1;
                match e {
                    RequestError::Unsupported(_) => {
                        tracing::debug!("virtio-blk: {e}");
                        VIRTIO_BLK_S_UNSUPP
                    }
                    RequestError::Io(_) => {
                        tracing::warn!("virtio-blk: {e}");
                        VIRTIO_BLK_S_IOERR
                    }
                    _ => {
                        tracing::debug!("virtio-blk: malformed request: {e}");
                        VIRTIO_BLK_S_IOERR
                    }
                }
            }
        };
        let written = data.bytes_written();
        // The status values are 0..=2 and fit the status byte.
        let status = u8::try_from(status).unwrap_or(u8::MAX);
        let written = match status_byte.write_all(&[status]) {
            Ok(()) => written.saturating_add(1),
            Err(e) => {
                tracing::warn!("virtio-blk: status byte: {e}");
                written
            }
        };
        // A chain holds at most 2^32 - 1 bytes (virtio-queue stops iterating beyond).
        u32::try_from(written).unwrap_or(u32::MAX)
    }

    /// Executes the request of `chain`, whose device-writable part minus the status byte is
    /// `data_out`.
    fn execute(
        &mut self,
        memory: &GuestRam,
        chain: DescriptorChain<&GuestRam>,
        data_out: &mut Writer<'_, MS<'_, GuestRam>>,
    ) -> std::result::Result<(), RequestError> {
        // §2.7.4.2: device-writable descriptors come after all device-readable ones.
        let mut seen_writable = false;
        for desc in chain.clone() {
            if desc.is_write_only() {
                seen_writable = true;
            } else if seen_writable {
                return Err(RequestError::Order);
            }
        }
        let mut reader = chain.reader(memory).map_err(RequestError::Memory)?;
        if reader.available_bytes() < HEADER_LEN {
            return Err(RequestError::ShortHeader(reader.available_bytes()));
        }
        let request_type = u32::from(reader.read_obj::<Le32>()?);
        let _ioprio = reader.read_obj::<Le32>()?;
        let sector = u64::from(reader.read_obj::<Le64>()?);
        match request_type {
            VIRTIO_BLK_T_IN => {
                self.stats.read_ops += 1;
                let len = data_out.available_bytes();
                let mut offset = self.byte_offset(sector, len)?;
                let mut buf = vec![0u8; len.min(IO_CHUNK)];
                let mut left = len;
                while left > 0 {
                    let chunk = &mut buf[..left.min(IO_CHUNK)];
                    self.file.read_exact_at(chunk, offset)?;
                    data_out.write_all(chunk)?;
                    left -= chunk.len();
                    offset += chunk.len() as u64;
                    self.stats.read_bytes += chunk.len() as u64;
                }
                Ok(())
            }
            VIRTIO_BLK_T_OUT => {
                self.stats.write_ops += 1;
                if self.readonly {
                    return Err(RequestError::ReadOnly);
                }
                let len = reader.available_bytes();
                let mut offset = self.byte_offset(sector, len)?;
                let mut buf = vec![0u8; len.min(IO_CHUNK)];
                let mut left = len;
                while left > 0 {
                    let chunk = &mut buf[..left.min(IO_CHUNK)];
                    reader.read_exact(chunk)?;
                    self.file.write_all_at(chunk, offset)?;
                    left -= chunk.len();
                    offset += chunk.len() as u64;
                    self.stats.write_bytes += chunk.len() as u64;
                }
                Ok(())
            }
            VIRTIO_BLK_T_FLUSH => {
                self.stats.flushes += 1;
                self.file.sync_all()?;
                Ok(())
            }
            VIRTIO_BLK_T_GET_ID => {
                if data_out.available_bytes() < DEVICE_ID.len() {
                    return Err(RequestError::ShortId(data_out.available_bytes()));
                }
                data_out.write_all(&DEVICE_ID)?;
                Ok(())
            }
            other => Err(RequestError::Unsupported(other)),
        }
    }

    /// The file offset of an IN/OUT request of `len` bytes at `sector`, checked against the
    /// capacity; `len` must be a whole number of sectors.
    fn byte_offset(&self, sector: u64, len: usize) -> std::result::Result<u64, RequestError> {
        if len as u64 % SECTOR_SIZE != 0 {
            return Err(RequestError::Unaligned(len));
        }
        let range = sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|offset| Some((offset, offset.checked_add(len as u64)?)));
        match range {
            // No overflow: the capacity came from a file length divided by SECTOR_SIZE.
            Some((offset, end)) if end <= self.capacity_sectors * SECTOR_SIZE => Ok(offset),
            _ => Err(RequestError::OutOfRange {
                sector,
                len,
                capacity: self.capacity_sectors,
            }),
        }
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
            let used_len = self.process_chain(&active.memory, chain);
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

/// Writes `status` into the last device-writable byte of `chain` when the writable part as a
/// whole is not usable (some descriptor lies outside guest memory); returns `used.len`.
fn write_status_only(memory: &GuestRam, chain: DescriptorChain<&GuestRam>, status: u32) -> u32 {
    let Some(last) = chain.writable().filter(|desc| desc.len() > 0).last() else {
        return 0;
    };
    let status = u8::try_from(status).unwrap_or(u8::MAX);
    match last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .map(|addr| memory.write_obj(status, addr))
    {
        Some(Ok(())) => 1,
        _ => 0,
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        let mut features = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH);
        if self.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_DISCARD;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestAddress, GuestMemory};
    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::memory::dirty_bitmap;

    const MEM_SIZE: u64 = 1 << 20;
    const QUEUE_LEN: u16 = 64;
    const DISK_SECTORS: u64 = 16;
    const DISK_LEN: usize = (DISK_SECTORS * SECTOR_SIZE) as usize;
    /// Where test buffers start (the mock queue lives below).
    const BUFFERS: u64 = 0x1_0000;

    /// One descriptor of a test chain.
    #[derive(Clone, Copy)]
    struct Buf {
        addr: u64,
        len: u32,
        writable: bool,
    }

    fn ro(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            writable: false,
        }
    }

    fn wo(addr: u64, len: u32) -> Buf {
        Buf {
            addr,
            len,
            writable: true,
        }
    }

    fn header(request_type: u32, sector: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; HEADER_LEN];
        bytes[..4].copy_from_slice(&request_type.to_le_bytes());
        bytes[8..].copy_from_slice(&sector.to_le_bytes());
        bytes
    }

    /// Distinct bytes, so a read from the wrong offset shows.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add((i / 251) as u8) ^ seed)
            .collect()
    }

    struct Harness<'a> {
        memory: &'a GuestRam,
        mock: MockSplitQueue<'a, GuestRam>,
        block: Block,
        path: PathBuf,
        next_desc: u16,
        next_used: u16,
        /// Guest frames the device wrote while serving the last chain, as the memory's dirty
        /// bitmap saw them.
        device_dirty: Vec<u64>,
    }

    impl<'a> Harness<'a> {
        fn new(memory: &'a GuestRam, dir: &tempfile::TempDir, readonly: bool) -> Self {
            let path = dir.path().join("disk.img");
            std::fs::write(&path, pattern(DISK_LEN, 0)).unwrap();
            let mut block = Block::new(&DiskConfig {
                path: path.clone(),
                readonly,
            })
            .unwrap();
            let mock = MockSplitQueue::new(memory, QUEUE_LEN);
            let queue: Queue = mock.create_queue().unwrap();
            block
                .activate(ActivateContext {
                    memory: memory.clone(),
                    queues: vec![queue],
                    interrupt: Arc::new(VirtioInterrupt::new(
                        EventFd::new(libc::EFD_NONBLOCK).unwrap(),
                    )),
                    acked_features: block.features(),
                })
                .unwrap();
            Harness {
                memory,
                mock,
                block,
                path,
                next_desc: 0,
                next_used: 0,
                device_dirty: Vec::new(),
            }
        }

        /// Guest frames of the used ring (flags, idx, `QUEUE_LEN` elements, avail_event).
        fn used_ring_pages(&self) -> Vec<u64> {
            let used = self.mock.used_addr().0;
            (used / 4096..=(used + 6 + 8 * u64::from(QUEUE_LEN) - 1) / 4096).collect()
        }

        /// Spreads `bytes` over `bufs`, in order.
        fn fill(&self, bufs: &[Buf], bytes: &[u8]) {
            let mut rest = bytes;
            for buf in bufs {
                let n = rest.len().min(buf.len as usize);
                self.memory
                    .write_slice(&rest[..n], GuestAddress(buf.addr))
                    .unwrap();
                rest = &rest[n..];
            }
            assert!(rest.is_empty(), "buffers too small");
        }

        /// The bytes of `bufs`, concatenated.
        fn gather(&self, bufs: &[Buf]) -> Vec<u8> {
            let mut bytes = Vec::new();
            for buf in bufs {
                let mut part = vec![0u8; buf.len as usize];
                self.memory
                    .read_slice(&mut part, GuestAddress(buf.addr))
                    .unwrap();
                bytes.extend(part);
            }
            bytes
        }

        fn byte(&self, addr: u64) -> u8 {
            self.memory.read_obj(GuestAddress(addr)).unwrap()
        }

        fn disk(&self) -> Vec<u8> {
            std::fs::read(&self.path).unwrap()
        }

        /// Makes `bufs` available as one chain, notifies the device, and returns the chain's
        /// used length after checking that it went back to the used ring.
        fn submit(&mut self, bufs: &[Buf]) -> u32 {
            let head = self.next_desc;
            let descs: Vec<RawDescriptor> = bufs
                .iter()
                .enumerate()
                .map(|(i, buf)| {
                    let index = head + i as u16;
                    let mut flags = 0;
                    if buf.writable {
                        flags |= VRING_DESC_F_WRITE as u16;
                    }
                    if i + 1 < bufs.len() {
                        flags |= VRING_DESC_F_NEXT as u16;
                    }
                    RawDescriptor::from(SplitDescriptor::new(buf.addr, buf.len, flags, index + 1))
                })
                .collect();
            self.mock.add_desc_chains(&descs, head).unwrap();
            self.next_desc += bufs.len() as u16;
            // What the test wrote so far is not the device's doing: the bitmap counts from here.
            let region = self.memory.find_region(GuestAddress(0)).unwrap();
            let bitmap = dirty_bitmap(region);
            bitmap.reset();
            self.block.queue_notify(0);
            self.device_dirty = (0..MEM_SIZE / 4096)
                .filter(|&page| bitmap.is_bit_set(page as usize))
                .collect();

            let used = self.mock.used_addr();
            let used_idx: u16 = self.memory.read_obj(used.unchecked_add(2)).unwrap();
            assert_eq!(used_idx, self.next_used + 1, "chain not returned");
            let elem = used.unchecked_add(4 + 8 * u64::from(self.next_used));
            let id: u32 = self.memory.read_obj(elem).unwrap();
            let len: u32 = self.memory.read_obj(elem.unchecked_add(4)).unwrap();
            assert_eq!(id, u32::from(head));
            self.next_used += 1;
            len
        }

        /// Submits a request whose header is `hdr_bufs`, data `data_bufs` and status byte at
        /// `status`; returns (status, used length).
        fn request(&mut self, hdr: &[u8], hdr_bufs: &[Buf], data_bufs: &[Buf]) -> (u8, u32) {
            let status = BUFFERS + 0xe_0000;
            self.memory.write_obj(0xffu8, GuestAddress(status)).unwrap();
            self.fill(hdr_bufs, hdr);
            let mut bufs = hdr_bufs.to_vec();
            bufs.extend_from_slice(data_bufs);
            bufs.push(wo(status, 1));
            let len = self.submit(&bufs);
            (self.byte(status), len)
        }

        fn counter(&self, name: &str) -> u64 {
            self.block
                .counters()
                .into_iter()
                .find(|(n, _)| *n == name)
                .unwrap()
                .1
        }
    }

    fn memory() -> GuestRam {
        GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    fn hdr_buf() -> [Buf; 1] {
        [ro(BUFFERS, HEADER_LEN as u32)]
    }

    #[test]
    fn read_spans_three_descriptors() {
        let (dir, mem) = (tempfile::tempdir().unwrap(), memory());
        let mut h = Harness::new(&mem, &dir, false);
        let data = [
            wo(BUFFERS + 0x1000, 512),
            wo(BUFFERS + 0x2003, 1024),
            wo(BUFFERS + 0x5000, 512),
        ];
        h.fill(&data, &[0xaa; 2048]);
        let (status, len) = h.request(&header(VIRTIO_BLK_T_IN, 2), &hdr_buf(), &data);
        assert_eq!((status, len), (OK, 2049));
        assert_eq!(h.gather(&data), h.disk()[1024..3072]);
        assert_eq!(h.counter("read_bytes"), 2048);
        assert_eq!(h.counter("read_ops"), 1);
        assert_eq!(h.counter("errors"), 0);
        // The device's writes mark vm-memory's dirty bitmap: the three data pages, the status
        // byte's page and the used ring; the header's page is only read.
        let used = h.used_ring_pages();
        for page in [0x11, 0x12, 0x15, 0xf0] {
            assert!(h.device_dirty.contains(&page), "page {page:#x} not marked");
        }
        assert!(
            used.iter().any(|page| h.device_dirty.contains(page)),
            "used ring not marked: {:x?}",
            h.device_dirty
        );
        assert!(
            h.device_dirty
                .iter()
                .all(|page| [0x11, 0x12, 0x15, 0xf0].contains(page) || used.contains(page)),
            "pages the device did not write are marked: {:x?}",
            h.device_dirty
        );
    }

    #[test]
    fn read_with_descriptors_of_any_length() {
        let (dir, mem) = (tempfile::tempdir().unwrap(), memory());
        let mut h = Harness::new(&mem, &dir, false);
        // 1536 bytes as 100 + 1000 + 436.
        let data = [
            wo(BUFFERS + 0x1001, 100),
            wo(BUFFERS + 0x2000, 1000),
            wo(BUFFERS + 0x3007, 436),
        ];
        let (status, len) = h.request(&header(VIRTIO_BLK_T_IN, 3), &hdr_buf(), &data);
        assert_eq!((status, len), (OK, 1537));
        assert_eq!(h.gather(&data), h.disk()[1536..3072]);

        // Header split 4 + 12, data 1536 in one descriptor that also holds the status byte.
        let hdr = [ro(BUFFERS + 0x100, 4), ro(BUFFERS + 0x205, 12)];
        h.fill(&hdr, &header(VIRTIO_BLK_T_IN, 5));
        let data = wo(BUFFERS + 0x4000, 1537);
        let len = h.submit(&[hdr[0], hdr[1], data]);
        assert_eq!(len, 1537);
        assert_eq!(h.byte(BUFFERS + 0x4000 + 1536), OK);
        assert_eq!(h.gather(&[wo(data.addr, 1536)]), h.disk()[2560..4096]);
        assert_eq!(h.counter("read_bytes"), 3072);
    }

    #[test]
    fn write_spans_three_descriptors() {
        let (dir, mem) = (tempfile::tempdir().unwrap(), memory());
        let mut h = Harness::new(&mem, &dir, false);
        let before = h.disk();
        let data = [
            ro(BUFFERS + 0x1000, 512),
            ro(BUFFERS + 0x2003, 1024),
            ro(BUFFERS + 0x5000, 512),
        ];
        let payload = pattern(2048, 0x5a);
        h.fill(&data, &payload);
        let (status, len) = h.request(&header(VIRTIO_BLK_T_OUT, 4), &hdr_buf(), &data);
        assert_eq!((status, len), (OK, 1));
        let after = h.disk();
        assert_eq!(after[2048..4096], payload[..]);
        assert_eq!(after[..2048], before[..2048]);
        assert_eq!(after[4096..], before[4096..]);
        assert_eq!(h.counter("write_bytes"), 2048);
        assert_eq!(h.counter("write_ops"), 1);
    }

    #[test]
    fn write_with_descriptors_of_any_length() {
        let (dir, mem) = (tempfile::tempdir().unwrap(), memory());
        let mut h = Harness::new(&mem, &dir, false);
        let before = h.disk();
        // The header and the first 700 data bytes share a descriptor; 1536 bytes in all.
        let first = ro(BUFFERS + 0x1000, (HEADER_LEN + 700) as u32);
        let second = ro(BUFFERS + 0x3001, 836);
        let payload = pattern(1536, 0x33);
        let mut bytes = header(VIRTIO_BLK_T_OUT, 15 - 2);
        bytes.extend_from_slice(&payload);
        h.fill(&[first, second], &bytes);
        let status = BUFFERS + 0x8000;
        let len = h.submit(&[first, second, wo(status, 1)]);
        assert_eq!((h.byte(status), len), (OK, 1));
        let after = h.disk();
        // Sectors 13..16: the last three of the disk.
        assert_eq!(after[13 * 512..], payload[..]);
        assert_eq!(after[..13 * 512], before[..13 * 512]);
    }

    #[test]
    fn data_length_not_a_multiple_of_512_is_ioerr() {
        let (dir, mem) = (tempfile::tempdir().unwrap(), memory());
        let mut h = Harness::new(&mem, &dir, false);
        let before = h.disk();
        let data = [wo(BUFFERS + 0x1000, 512), wo(BUFFERS + 0x2000, 488)];
        h.fill(&data, &[0xaa; 1000]);
        let (status, len) = h.request(&header(VIRTIO_BLK_T_IN, 0), &hdr_buf(), &data);
        assert_eq!((status, len), (IOERR, 1));
        assert_eq!(h.gather(&data), vec![0xaa; 1000], "nothing read on error");

        let data = [ro(BUFFERS + 0x1000, 1000)];
        let (status, len) = h.request(&header(VIRTIO_BLK_T_OUT, 0), &hdr_buf(), &data);
        assert_eq!((status, len), (IOERR, 1));
        assert_eq!(h.disk(), before);
        assert_eq!(h.counter("errors"), 2);
    }

    #[test]
    fn beyond_capacity_is_ioerr() {
        let (dir, mem) = (tempfile::tempdir().unwrap(), memory());
        let mut h = Harness::new(&mem, &dir, false);
        let before = h.disk();
        let data = [wo(BUFFERS + 0x1000, 1024)];
        let (status, len) = h.request(
            &header(VIRTIO_BLK_T_IN, DISK_SECTORS - 1),
            &hdr_buf(),
            &data,
        );
        assert_eq!((status, len), (IOERR, 1));
        // The sector number overflows as a byte offset.
        let (status, _) = h.request(&header(VIRTIO_BLK_T_IN, u64::MAX), &hdr_buf(), &data);
        assert_eq!(status, IOERR);
        let (status, _) = h.request(
            &header(VIRTIO_BLK_T_IN, u64::MAX / SECTOR_SIZE),
            &hdr_buf(),
            &data,
        );
        assert_eq!(status, IOERR);
        let data = [ro(BUFFERS + 0x1000, 1024)];
        let (status, _) = h.request(&header(VIRTIO_BLK_T_OUT, DISK_SECTORS), &hdr_buf(), &data);
        assert_eq!(status, IOERR);
        assert_eq!(h.disk(), before, "the file must not grow");
        // The last sector itself is fine.
        let data = [wo(BUFFERS + 0x1000, 512)];
        let (status, len) = h.request(
            &header(VIRTIO_BLK_T_IN, DISK_SECTORS - 1),
            &hdr_buf(),
            &data,
        );
        assert_eq!((status, len), (OK, 513));
        assert_eq!(h.gather(&data), before[DISK_LEN - 512..]);
    }

    #[test]
    fn write_to_read_only_disk_is_ioerr() {
        let (dir, mem) = (tempfile::tempdir().unwrap(), memory());
        let mut h = Harness::new(&mem, &dir, true);
        assert_ne!(h.block.features() & (1 << VIRTIO_BLK_F_RO), 0);
        let before = h.disk();
        let data = [ro(BUFFERS + 0x1000, 512)];
        h.fill(&data, &[0x77; 512]);
        let (status, len) = h.request(&header(VIRTIO_BLK_T_OUT, 0), &hdr_buf(), &data);
        assert_eq!((status, len), (IOERR, 1));
        assert_eq!(h.disk(), before);
        // Reads still work.
        let data = [wo(BUFFERS + 0x1000, 512)];
        let (status, _) = h.request(&header(VIRTIO_BLK_T_IN, 1), &hdr_buf(), &data);
        assert_eq!(status, OK);
        assert_eq!(h.gather(&data), before[512..1024]);
    }

    #[test]
    fn unknown_type_is_unsupp() {
        let (dir, mem) = (tempfile::tempdir().unwrap(), memory());
        let mut h = Harness::new(&mem, &dir, false);
        for request_type in [VIRTIO_BLK_T_DISCARD, 0xdead_beef] {
            let data = [ro(BUFFERS + 0x1000, 16)];
            let (status, len) = h.request(&header(request_type, 0), &hdr_buf(), &data);
            assert_eq!((status, len), (UNSUPP, 1));
        }
        assert_eq!(h.counter("errors"), 2);
    }

    #[test]
    fn chain_without_status_byte_is_returned_with_len_0() {
        let (dir, mem) = (tempfile::tempdir().unwrap(), memory());
        let mut h = Harness::new(&mem, &dir, false);
        let before = h.disk();
        // Only device-readable descriptors.
        let hdr = hdr_buf();
        h.fill(&hdr, &header(VIRTIO_BLK_T_OUT, 0));
        assert_eq!(h.submit(&[hdr[0], ro(BUFFERS + 0x1000, 512)]), 0);
        // A device-writable descriptor of length 0.
        h.fill(&hdr, &header(VIRTIO_BLK_T_IN, 0));
        assert_eq!(h.submit(&[hdr[0], wo(BUFFERS + 0x1000, 0)]), 0);
        // Nothing but the header, or no header at all.
        assert_eq!(h.submit(&[hdr[0]]), 0);
        assert_eq!(h.submit(&[ro(BUFFERS, 0)]), 0);
        assert_eq!(h.disk(), before);
        assert_eq!(h.counter("errors"), 4);
        // The queue keeps going.
        let data = [wo(BUFFERS + 0x1000, 512)];
        let (status, _) = h.request(&header(VIRTIO_BLK_T_IN, 0), &hdr_buf(), &data);
        assert_eq!(status, OK);
    }

    #[test]
    fn short_header_is_ioerr() {
        let (dir, mem) = (tempfile::tempdir().unwrap(), memory());
        let mut h = Harness::new(&mem, &dir, false);
        let hdr = [ro(BUFFERS, 8)];
        let (status, len) = h.request(&header(VIRTIO_BLK_T_IN, 0)[..8], &hdr, &[]);
        assert_eq!((status, len), (IOERR, 1));
        // A chain that is only a status byte.
        let (status, len) = h.request(&[], &[], &[]);
        assert_eq!((status, len), (IOERR, 1));
    }

    #[test]
    fn descriptor_outside_guest_memory_is_ioerr() {
        let (dir, mem) = (tempfile::tempdir().unwrap(), memory());
        let mut h = Harness::new(&mem, &dir, false);
        // Data beyond guest memory, and data crossing its end.
        for data in [wo(0x1000_0000, 512), wo(MEM_SIZE - 256, 512)] {
            let (status, len) = h.request(&header(VIRTIO_BLK_T_IN, 0), &hdr_buf(), &[data]);
            assert_eq!((status, len), (IOERR, 1));
        }
        let data = [ro(u64::MAX - 100, 512)];
        let (status, len) = h.request(&header(VIRTIO_BLK_T_OUT, 0), &hdr_buf(), &data);
        assert_eq!((status, len), (IOERR, 1));
        // The header outside guest memory.
        let status = BUFFERS + 0x8000;
        let len = h.submit(&[ro(MEM_SIZE, 16), wo(BUFFERS + 0x1000, 512), wo(status, 1)]);
        assert_eq!((h.byte(status), len), (IOERR, 1));
        // The status byte outside guest memory: nothing to report it in.
        let hdr = hdr_buf();
        h.fill(&hdr, &header(VIRTIO_BLK_T_IN, 0));
        let len = h.submit(&[hdr[0], wo(BUFFERS + 0x1000, 512), wo(MEM_SIZE + 4096, 1)]);
        assert_eq!(len, 0);
        assert_eq!(h.counter("errors"), 5);
        // Nothing but the used ring was written for that chain (its buffer stays untouched).
        let used = h.used_ring_pages();
        assert!(
            !h.device_dirty.is_empty() && h.device_dirty.iter().all(|page| used.contains(page)),
            "{:x?}",
            h.device_dirty
        );
    }

    #[test]
    fn readable_after_writable_is_ioerr() {
        let (dir, mem) = (tempfile::tempdir().unwrap(), memory());
        let mut h = Harness::new(&mem, &dir, false);
        let before = h.disk();
        let hdr = hdr_buf();
        h.fill(&hdr, &header(VIRTIO_BLK_T_OUT, 0));
        let status = BUFFERS + 0x8000;
        let len = h.submit(&[
            hdr[0],
            wo(status, 1),
            ro(BUFFERS + 0x1000, 512),
            wo(status + 1, 1),
        ]);
        assert_eq!((h.byte(status + 1), len), (IOERR, 1));
        assert_eq!(h.disk(), before);
    }

    #[test]
    fn get_id() {
        let (dir, mem) = (tempfile::tempdir().unwrap(), memory());
        let mut h = Harness::new(&mem, &dir, false);
        let data = [wo(BUFFERS + 0x1000, VIRTIO_BLK_ID_BYTES)];
        let (status, len) = h.request(&header(VIRTIO_BLK_T_GET_ID, 0), &hdr_buf(), &data);
        assert_eq!((status, len), (OK, 21));
        assert_eq!(h.gather(&data), DEVICE_ID);
        assert_eq!(&DEVICE_ID[..12], b"ext-vmm-blk\0");
        // Over two descriptors.
        let data = [wo(BUFFERS + 0x2000, 7), wo(BUFFERS + 0x3000, 13)];
        let (status, len) = h.request(&header(VIRTIO_BLK_T_GET_ID, 0), &hdr_buf(), &data);
        assert_eq!((status, len), (OK, 21));
        assert_eq!(h.gather(&data), DEVICE_ID);
        // Too small for the ID: an error, not a truncated ID.
        let data = [wo(BUFFERS + 0x4000, 10)];
        h.fill(&data, &[0xee; 10]);
        let (status, len) = h.request(&header(VIRTIO_BLK_T_GET_ID, 0), &hdr_buf(), &data);
        assert_eq!((status, len), (IOERR, 1));
        assert_eq!(h.gather(&data), vec![0xee; 10]);
    }

    #[test]
    fn flush() {
        let (dir, mem) = (tempfile::tempdir().unwrap(), memory());
        let mut h = Harness::new(&mem, &dir, false);
        assert_ne!(h.block.features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
        let (status, len) = h.request(&header(VIRTIO_BLK_T_FLUSH, 0), &hdr_buf(), &[]);
        assert_eq!((status, len), (OK, 1));
        assert_eq!(h.counter("flushes"), 1);
        assert_eq!(h.counter("errors"), 0);
    }

    #[test]
    fn device_config_and_features() {
        let (dir, mem) = (tempfile::tempdir().unwrap(), memory());
        let h = Harness::new(&mem, &dir, false);
        assert_eq!(h.block.device_type(), VIRTIO_ID_BLOCK);
        assert_eq!(
            h.block.features(),
            (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_BLK_F_FLUSH)
        );
        let mut capacity = [0u8; 8];
        h.block.read_config(0, &mut capacity);
        assert_eq!(u64::from_le_bytes(capacity), DISK_SECTORS);
    }
}
