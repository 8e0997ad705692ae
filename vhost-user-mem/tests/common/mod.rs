//! Helpers shared by the tests that drive the daemon with the `vhost` crate's real frontend:
//! guest memory in a memfd, the daemon in a thread, queues written by virtio-queue's mock
//! driver.
// Each test binary uses its own part of these.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::ffi::CString;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vhost_user_mem::{BalloonBackend, Daemon, SharedBackend};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestRegionMmap, MmapRegion,
};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const PAGE: u64 = 4096;
/// 4 MiB of guest memory at gpa 0.
pub const LEN: u64 = 4 << 20;
pub const QUEUE_SIZE: u16 = 16;

pub struct Guest {
    pub file: File,
    pub mem: GuestMemoryMmap<()>,
}

impl Guest {
    pub fn new() -> Self {
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

    pub fn host(&self, gpa: u64) -> u64 {
        self.mem.get_host_address(GuestAddress(gpa)).unwrap() as u64
    }

    pub fn allocated(&self) -> u64 {
        self.file.metadata().unwrap().blocks() * 512
    }

    /// File pages that hold data (`SEEK_DATA`).
    pub fn data_pages(&self) -> Vec<u64> {
        (0..LEN / PAGE)
            .filter(|&i| {
                let offset = (i * PAGE) as libc::off_t;
                // SAFETY: lseek reads only its integer arguments on an open descriptor.
                unsafe { libc::lseek(self.file.as_raw_fd(), offset, libc::SEEK_DATA) == offset }
            })
            .collect()
    }
}

pub fn all_pages_but(holes: &[u64]) -> Vec<u64> {
    (0..LEN / PAGE).filter(|p| !holes.contains(p)).collect()
}

pub fn start_daemon(socket: &Path) -> SharedBackend {
    let backend = BalloonBackend::shared();
    let mut daemon = Daemon::bind(socket, backend.clone()).unwrap();
    std::thread::spawn(move || daemon.run());
    backend
}

/// One queue as the driver sees it, with its eventfds.
pub struct TestQueue<'a> {
    pub ring: MockSplitQueue<'a, GuestMemoryMmap<()>>,
    pub kick: EventFd,
    pub call: EventFd,
    pub next_slot: u16,
}

impl TestQueue<'_> {
    pub fn add_chain(&mut self, descs: &[(u64, u32, u16)]) {
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
    pub fn wait_used(&self, n: u16) -> Vec<u32> {
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
pub fn connect<'a>(
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

pub fn read_config(frontend: &mut Frontend) -> (u32, u32) {
    let (_, bytes) = frontend
        .get_config(0, 8, VhostUserConfigFlags::WRITABLE, &[0; 8])
        .unwrap();
    (
        u32::from_le_bytes(bytes[0..4].try_into().unwrap()),
        u32::from_le_bytes(bytes[4..8].try_into().unwrap()),
    )
}

/// A stats buffer: packed `virtio_balloon_stat` entries (`le16 tag; le64 val;`).
pub fn stats_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|(tag, val)| tag.to_le_bytes().into_iter().chain(val.to_le_bytes()))
        .collect()
}

/// Puts `pfns` at guest address `gpa` and makes them one inflate or deflate request on
/// `queue`; returns once the daemon has used it (the `used`-th entry of the ring).
pub fn send_pfns(guest: &Guest, queue: &mut TestQueue<'_>, pfns: &[u32], gpa: u64, used: u16) {
    use vm_memory::Bytes;
    guest
        .mem
        .write_slice(&pfn_bytes(pfns), GuestAddress(gpa))
        .unwrap();
    queue.add_chain(&[(gpa, (pfns.len() * 4) as u32, 0)]);
    queue.wait_used(used);
}

pub fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

pub const BASE_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();

/// Whether this host lets us create a userfaultfd; prints `SKIPPED: <test>` when it does not
/// (an error instead under `EXT_REQUIRE_ALL=1`).
pub fn userfaultfd_available(test: &str) -> bool {
    if userfaultfd::UffdBuilder::new().create().is_ok() {
        return true;
    }
    assert!(
        std::env::var("EXT_REQUIRE_ALL").as_deref() != Ok("1"),
        "{test}: userfaultfd not available, and EXT_REQUIRE_ALL=1 says it must be"
    );
    println!("SKIPPED: {test}: userfaultfd not available");
    false
}
