//! Fuzzes `Balloon::process_queue` end to end: a split virtqueue whose descriptor table, avail
//! ring and request bytes all come from the fuzz input, over memfd-backed guest memory of two
//! regions with a gap between them. Nothing may panic, and nothing outside guest memory may
//! be punched: the memfd has guard pages before, between and after the regions' file ranges,
//! and they must still hold data afterwards. Every page left in the invalid map is inside
//! guest memory.
//!
//! Input (zero-padded when short): byte 0 the queue kind, byte 1 the avail index (chains
//! offered, up to the queue size), byte 2 bit 0 event idx, then the avail ring (8 le16 heads),
//! the descriptor table (8 raw 16-byte descriptors), then request bytes written at gpa 0x1000.
#![no_main]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::{AsRawFd, FromRawFd};

use libfuzzer_sys::fuzz_target;
use vhost_user_mem::balloon::{Balloon, QueueKind};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

const PAGE: u64 = 4096;
/// Guest regions as (guest address, length, file offset): 16 pages at gpa 0, 8 pages at
/// 128 KiB. File pages 0, 17 and 26 belong to no region: the guards.
const REGIONS: [(u64, u64, u64); 2] = [(0, 16 * PAGE, PAGE), (0x20000, 8 * PAGE, 18 * PAGE)];
const GUARD_PAGES: [u64; 3] = [0, 17, 26];
const FILE_PAGES: u64 = 27;
const QUEUE_SIZE: u16 = 8;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
/// Where the request bytes go: the rest of region 0 after the ring page.
const PAYLOAD: u64 = PAGE;
const PAYLOAD_MAX: usize = 15 * PAGE as usize;
const HEADER: usize = 3 + 2 * QUEUE_SIZE as usize + 16 * QUEUE_SIZE as usize;

const KINDS: [QueueKind; 5] = [
    QueueKind::Inflate,
    QueueKind::Deflate,
    QueueKind::Stats,
    QueueKind::Reporting,
    QueueKind::FreePageHint,
];

fn populated_memfd() -> File {
    // SAFETY: memfd_create reads a static NUL-terminated name and returns a new descriptor.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.write_all_at(&vec![0xa5; (FILE_PAGES * PAGE) as usize], 0)
        .expect("populating the memfd");
    file
}

fn memory(file: &File) -> GuestMemoryMmap<()> {
    let regions = REGIONS
        .iter()
        .map(|&(gpa, len, offset)| {
            let clone = file.try_clone().expect("dup of the memfd");
            let mmap = MmapRegion::<()>::from_file(FileOffset::new(clone, offset), len as usize)
                .expect("mapping the memfd");
            GuestRegionMmap::new(mmap, GuestAddress(gpa)).expect("a guest region")
        })
        .collect();
    GuestMemoryMmap::from_regions(regions).expect("guest memory")
}

fn holds_data(file: &File, page: u64) -> bool {
    let offset = (page * PAGE) as libc::off_t;
    // SAFETY: lseek only reads its integer arguments on an open descriptor.
    unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_DATA) == offset }
}

fn inside_memory(gfn: u64) -> bool {
    let addr = gfn * PAGE;
    REGIONS
        .iter()
        .any(|&(gpa, len, _)| addr >= gpa && addr + PAGE <= gpa + len)
}

fuzz_target!(|data: &[u8]| {
    let mut header = [0u8; HEADER];
    let used = data.len().min(HEADER);
    header[..used].copy_from_slice(&data[..used]);
    let payload = &data[used..];
    let payload = &payload[..payload.len().min(PAYLOAD_MAX)];

    let file = populated_memfd();
    let mem = memory(&file);
    let kind = KINDS[usize::from(header[0]) % KINDS.len()];
    let offered = u16::from(header[1]) % (QUEUE_SIZE + 1);
    let event_idx = header[2] & 1 != 0;
    let avail_entries = &header[3..3 + 2 * QUEUE_SIZE as usize];
    let descriptors = &header[3 + 2 * QUEUE_SIZE as usize..];

    // The guest's side: descriptor table, avail ring (flags 0, idx, ring), request bytes.
    mem.write_slice(descriptors, GuestAddress(DESC_TABLE))
        .expect("descriptor table");
    mem.write_obj(0u16, GuestAddress(AVAIL_RING)).expect("avail flags");
    mem.write_obj(offered.to_le(), GuestAddress(AVAIL_RING + 2))
        .expect("avail idx");
    mem.write_slice(avail_entries, GuestAddress(AVAIL_RING + 4))
        .expect("avail ring");
    mem.write_slice(payload, GuestAddress(PAYLOAD)).expect("payload");

    // The device's side, as the frontend would configure it.
    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    assert!(queue.is_valid(&mem), "the fixed rings fit in memory");

    let mut balloon = Balloon::new();
    if let Ok(outcome) = balloon.process_queue(kind, &mut queue, &mem) {
        assert!(outcome.refused <= outcome.used);
        assert!(outcome.used <= offered);
    }
    // Ask for fresh stats too: a held buffer goes back (or there is none).
    let _ = balloon.request_stats(&mut queue, &mem);

    for guard in GUARD_PAGES {
        assert!(holds_data(&file, guard), "guard page {guard} was punched");
    }
    let invalid = balloon.invalid_pages();
    for (word_index, &word) in invalid.gfn_words().iter().enumerate() {
        for bit in (0..64).filter(|bit| word & (1u64 << bit) != 0) {
            let gfn = word_index as u64 * 64 + bit;
            assert!(inside_memory(gfn), "invalid gfn {gfn} outside memory");
        }
    }
    let counters = balloon.counters();
    assert_eq!(counters.inflated_pages, invalid.len());
    assert_eq!(counters.punch_errors, 0, "memfd holes never fail");
});
