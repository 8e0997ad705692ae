//! The real daemon (library entry point, in a thread) driven over its unix socket by the
//! `vhost` crate's real frontend: real vhost-user messages, guest memory in a memfd that both
//! sides map, rings written by virtio-queue's mock driver.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{
    all_pages_but, connect, pfn_bytes, read_config, start_daemon, stats_bytes, Guest,
    BASE_FEATURES, LEN, PAGE,
};
use vhost::vhost_user::message::VhostUserConfigFlags;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost_user_mem::backend::lock;
use vhost_user_mem::balloon::{VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VRING_DESC_F_WRITE};
use vm_memory::{Bytes, GuestAddress};

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
    let stats = stats_bytes(&[(4, 1 << 20), (5, 4 << 20)]);
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
