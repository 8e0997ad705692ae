//! The real daemon (library entry point, in a thread) driven over its unix socket by the
//! `vhost` crate's real frontend: real vhost-user messages, guest memory in a memfd that both
//! sides map, rings written by virtio-queue's mock driver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_mem::backend::lock;
use vhost_user_mem::balloon::{VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ};
use vhost_user_mem::{BalloonBackend, Daemon, SharedBackend};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{
    VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{
    Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const PAGE: u64 = 4096;
/// 4 MiB of guest memory at gpa 0.
const LEN: u64 = 4 << 20;
const QUEUE_SIZE: u16 = 16;

struct Guest {
    file: File,
    mem: GuestMemoryMmap<()>,
}

impl Guest {
    fn new() -> Self {
        let name = CString::new("vhost-user-mem-frontend-test").unwrap();
        // SAFETY: `name` is NUL-terminated; the fd is checked and owned by the File.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(LEN).unwrap();
        let page = vec![0x5au8; PAGE as usize];
        for i in 0..LEN / PAGE {
            file.write_all_at(&page, i * PAGE).unwrap();
        }
        let mmap = MmapRegion::<()>::from_file(
            FileOffset::new(file.try_clone().unwrap(), 0),
            LEN as usize,
        )
        .unwrap();
        let region = GuestRegionMmap::new(mmap, GuestAddress(0)).unwrap();
        let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
        Guest { file, mem }
    }

    fn host(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    fn allocated(&self) -> u64 {
        self.file.metadata().unwrap().blocks() * 512
    }

    /// File pages that hold data (`SEEK_DATA`).
    fn data_pages(&self) -> Vec<u64> {
        (0..LEN / PAGE)
            .filter(|&i| {
                let offset = (i * PAGE) as libc::off_t;
                // SAFETY: lseek reads only its integer arguments on an open descriptor.
                unsafe { libc::lseek(self.file.as_raw_fd(), offset, libc::SEEK_DATA) == offset }
            })
            .collect()
    }
}

fn all_pages_but(holes: &[u64]) -> Vec<u64> {
    (0..LEN / PAGE).filter(|p| !holes.contains(p)).collect()
}

fn start_daemon(socket: &Path) -> SharedBackend {
    let backend = BalloonBackend::shared();
    let mut daemon = Daemon::bind(socket, backend.clone()).unwrap();
    std::thread::spawn(move || daemon.run());
    backend
}

/// One queue as the driver sees it, with its eventfds.
struct TestQueue<'a> {
    ring: MockSplitQueue<'a, GuestMemoryMmap<()>>,
    kick: EventFd,
    call: EventFd,
    next_slot: u16,
}

impl TestQueue<'_> {
    fn add_chain(&mut self, descs: &[(u64, u32, u16)]) {
        let slot = self.next_slot;
        let linked: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let last = i + 1 == descs.len();
                let flags = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT as u16
                };
                let next = if last { 0 } else { slot + i as u16 + 1 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect();
        self.ring.add_desc_chains(&linked, slot).unwrap();
        self.next_slot += descs.len() as u16;
        self.kick.write(1).unwrap();
    }

    /// Waits until the used ring holds `n` entries; returns their ids.
    fn wait_used(&self, n: u16) -> Vec<u32> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.ring.used().idx().load() < n {
            assert!(Instant::now() < deadline, "used ring stuck");
            std::thread::sleep(Duration::from_millis(5));
        }
        (0..n)
            .map(|i| {
                self.ring
                    .used()
                    .ring()
                    .ref_at(i as usize)
                    .unwrap()
                    .load()
                    .id()
            })
            .collect()
    }
}

/// Negotiates `features` and memory over `frontend`, then sets up `count` queues whose rings
/// start at gpa `ring_base + i * 0x1000`.
fn connect<'a>(
    frontend: &mut Frontend,
    guest: &'a Guest,
    features: u64,
    count: usize,
    ring_base: u64,
) -> Vec<TestQueue<'a>> {
    frontend.set_owner().unwrap();
    let offered = frontend.get_features().unwrap();
    assert_eq!(offered & features, features, "offered {offered:#x}");
    frontend.set_features(features).unwrap();
    let protocol = frontend.get_protocol_features().unwrap();
    assert!(protocol.contains(VhostUserProtocolFeatures::CONFIG));
    frontend
        .set_protocol_features(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ)
        .unwrap();
    assert!(frontend.get_queue_num().unwrap() >= count as u64);
    frontend
        .set_mem_table(&[VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: LEN,
            userspace_addr: guest.host(0),
            mmap_offset: 0,
            mmap_handle: guest.file.as_raw_fd(),
        }])
        .unwrap();
    (0..count)
        .map(|i| {
            let ring = MockSplitQueue::create(
                &guest.mem,
                GuestAddress(ring_base + i as u64 * 0x1000),
                QUEUE_SIZE,
            );
            let kick = EventFd::new(EFD_NONBLOCK).unwrap();
            let call = EventFd::new(EFD_NONBLOCK).unwrap();
            frontend.set_vring_num(i, QUEUE_SIZE).unwrap();
            frontend
                .set_vring_addr(
                    i,
                    &VringConfigData {
                        queue_max_size: QUEUE_SIZE,
                        queue_size: QUEUE_SIZE,
                        flags: 0,
                        desc_table_addr: guest.host(ring.desc_table_addr().0),
                        used_ring_addr: guest.host(ring.used_addr().0),
                        avail_ring_addr: guest.host(ring.avail_addr().0),
                        log_addr: None,
                    },
                )
                .unwrap();
            frontend.set_vring_base(i, 0).unwrap();
            frontend.set_vring_call(i, &call).unwrap();
            frontend.set_vring_kick(i, &kick).unwrap();
            frontend.set_vring_enable(i, true).unwrap();
            TestQueue {
                ring,
                kick,
                call,
                next_slot: 0,
            }
        })
        .collect()
}

fn read_config(frontend: &mut Frontend) -> (u32, u32) {
    let (_, bytes) = frontend
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])
        .unwrap();
    (
        u32::from_le_bytes(bytes[0..4].try_into().unwrap()),
        u32::from_le_bytes(bytes[4..8].try_into().unwrap()),
    )
}

fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

const BASE_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

#[test]
fn inflate_and_report_over_vhost_user_then_reconnect() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("balloon.sock");
    let backend = start_daemon(&socket);
    let guest = Guest::new();

    // Without STATS_VQ the reporting queue is index 2.
    let features = BASE_FEATURES | (1 << VIRTIO_BALLOON_F_REPORTING);
    let mut frontend = Frontend::connect(&socket, 4).unwrap();
    let mut queues = connect(&mut frontend, &guest, features, 3, 0);
    assert_eq!(read_config(&mut frontend), (0, 0));
    lock(&backend).resize(512);
    assert_eq!(read_config(&mut frontend), (512, 0));

    // Inflate: a PFN array in guest memory (page 16), four pages out of the top half.
    let before = guest.allocated();
    let pfns = [600u32, 601, 602, 700];
    guest
        .mem
        .write_slice(&pfn_bytes(&pfns), GuestAddress(16 * PAGE))
        .unwrap();
    queues[0].add_chain(&[(16 * PAGE, 16, 0)]);
    assert_eq!(queues[0].wait_used(1), vec![0]);
    assert_eq!(guest.data_pages(), all_pages_but(&[600, 601, 602, 700]));
    assert_eq!(before - guest.allocated(), 4 * PAGE);
    assert_eq!(queues[0].call.read().unwrap(), 1);
    frontend
        .set_config(4, VhostUserConfigFlags::WRITABLE, &4u32.to_le_bytes())
        .unwrap();

    // Report 2 MiB..2 MiB + 64 KiB free (a device-writable buffer, as Linux adds them).
    queues[2].add_chain(&[(2 << 20, 0x10000, VRING_DESC_F_WRITE as u16)]);
    queues[2].wait_used(1);
    let reported: Vec<u64> = (512..528).collect();
    let mut holes = vec![600, 601, 602, 700];
    holes.extend(&reported);
    assert_eq!(guest.data_pages(), all_pages_but(&holes));
    // A report outside memory is refused, returned, and punches nothing.
    queues[2].add_chain(&[(LEN, 0x1000, VRING_DESC_F_WRITE as u16)]);
    queues[2].wait_used(2);
    assert_eq!(guest.data_pages(), all_pages_but(&holes));
    {
        let backend = lock(&backend);
        let balloon = backend.balloon();
        assert_eq!(balloon.counters().reported_bytes, 0x10000);
        assert_eq!(balloon.counters().refused_requests, 1);
        assert_eq!(balloon.invalid_pages().len(), 4);
        assert!(!balloon.invalid_pages().contains(512));
        let bitmaps = backend.invalid_region_bitmaps().unwrap();
        assert_eq!(bitmaps.len(), 1);
        assert_eq!(bitmaps[0][600 / 64] >> (600 % 64) & 0b111, 0b111);
    }
    drop(queues);
    drop(frontend);

    // A second frontend: the daemon listens again and kept its state.
    let mut frontend = Frontend::connect(&socket, 4).unwrap();
    let mut queues = connect(&mut frontend, &guest, BASE_FEATURES, 2, 0x8000);
    assert_eq!(read_config(&mut frontend), (512, 4));
    guest
        .mem
        .write_slice(&pfn_bytes(&[800]), GuestAddress(17 * PAGE))
        .unwrap();
    queues[0].add_chain(&[(17 * PAGE, 4, 0)]);
    queues[0].wait_used(1);
    holes.push(800);
    assert_eq!(guest.data_pages(), all_pages_but(&holes));
    // Deflate two pages: out of the map, still holes.
    guest
        .mem
        .write_slice(&pfn_bytes(&[600, 800]), GuestAddress(18 * PAGE))
        .unwrap();
    queues[1].add_chain(&[(18 * PAGE, 8, 0)]);
    queues[1].wait_used(1);
    let backend = lock(&backend);
    let invalid = backend.balloon().invalid_pages();
    assert_eq!(invalid.len(), 3);
    assert!(invalid.contains(601) && !invalid.contains(600) && !invalid.contains(800));
    assert_eq!(guest.data_pages(), all_pages_but(&holes));
}

#[test]
fn garbage_on_a_connection_does_not_kill_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("balloon.sock");
    let backend = start_daemon(&socket);
    lock(&backend).resize(7);

    // An unknown request code with a nonsense size, then hang up.
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream
        .write_all(&[
            0xff, 0xff, 0xff, 0x7f, 0x01, 0, 0, 0, 0x10, 0, 0, 0, 0xde, 0xad,
        ])
        .unwrap();
    drop(stream);
    // Half a header, then hang up.
    let mut stream = UnixStream::connect(&socket).unwrap();
    stream.write_all(&[1, 0, 0]).unwrap();
    drop(stream);

    let guest = Guest::new();
    let mut frontend = Frontend::connect(&socket, 4).unwrap();
    let features = BASE_FEATURES | (1 << VIRTIO_BALLOON_F_STATS_VQ);
    let _queues = connect(&mut frontend, &guest, features, 3, 0);
    assert_eq!(read_config(&mut frontend), (7, 0));
}

#[test]
fn stats_buffer_is_held_until_the_daemon_asks_with_event_idx() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("balloon.sock");
    let backend = start_daemon(&socket);
    let guest = Guest::new();
    let mut frontend = Frontend::connect(&socket, 4).unwrap();
    let features = BASE_FEATURES
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_BALLOON_F_STATS_VQ)
        | (1 << VIRTIO_BALLOON_F_REPORTING);
    let mut queues = connect(&mut frontend, &guest, features, 4, 0);

    // Stats are queue 2 now: MEMFREE (4) and MEMTOT (5).
    let stats: Vec<u8> = [(4u16, 1u64 << 20), (5, 4 << 20)]
        .iter()
        .flat_map(|(tag, val)| tag.to_le_bytes().into_iter().chain(val.to_le_bytes()))
        .collect();
    guest
        .mem
        .write_slice(&stats, GuestAddress(16 * PAGE))
        .unwrap();
    queues[2].add_chain(&[(16 * PAGE, stats.len() as u32, 0)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while lock(&backend).balloon().stats().get(&5) != Some(&(4 << 20)) {
        assert!(Instant::now() < deadline, "stats never arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(queues[2].ring.used().idx().load(), 0, "the buffer is held");
    assert!(lock(&backend).request_stats().unwrap());
    assert_eq!(queues[2].wait_used(1), vec![0]);

    // Two inflates in a row with event idx: both complete.
    guest
        .mem
        .write_slice(&pfn_bytes(&[900, 901]), GuestAddress(17 * PAGE))
        .unwrap();
    queues[0].add_chain(&[(17 * PAGE, 4, 0)]);
    queues[0].wait_used(1);
    queues[0].add_chain(&[(17 * PAGE + 4, 4, 0)]);
    queues[0].wait_used(2);
    // Reporting is queue 3 behind stats.
    queues[3].add_chain(&[(3 << 20, 0x2000, VRING_DESC_F_WRITE as u16)]);
    queues[3].wait_used(1);
    assert_eq!(guest.data_pages(), all_pages_but(&[768, 769, 900, 901]));
}
