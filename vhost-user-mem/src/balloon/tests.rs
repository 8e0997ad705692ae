//! Device logic on virtio-queue's mock split queues over memfd-backed guest memory; every
//! test checks with `SEEK_DATA` exactly which file pages were punched.

use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::memory::test_util::{all_but, data_pages, memory, populated_memfd};

/// 1 MiB of guest memory at gpa 0: page 0 holds the rings, pages 1..16 request buffers, the
/// rest is what the guest balloons.
const LEN: u64 = 1 << 20;
const BUFFERS: u64 = 0x1000;

struct Setup {
    file: std::fs::File,
    mem: GuestMemoryMmap<()>,
}

fn setup() -> Setup {
    let file = populated_memfd(LEN);
    let mem = memory(&file, &[(0, LEN, 0)]);
    Setup { file, mem }
}

fn readable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

fn writable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        addr,
        len,
        VRING_DESC_F_WRITE as u16,
        0,
    ))
}

/// Links `descs` into one chain at descriptor index `slot` (NEXT flags and indices).
fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap<()>>, descs: &[RawDescriptor], slot: u16) {
    let next = virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
    let linked: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let desc = SplitDescriptor::from(*raw);
            let last = i + 1 == descs.len();
            let flags = if last {
                desc.flags()
            } else {
                desc.flags() | next
            };
            let index = if last { 0 } else { slot + i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(
                desc.addr().0,
                desc.len(),
                flags,
                index,
            ))
        })
        .collect();
    vq.add_desc_chains(&linked, slot).unwrap();
}

fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
    pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// Puts one single-descriptor request at descriptor index `slot` and processes the queue.
fn run(
    balloon: &mut Balloon,
    kind: QueueKind,
    s: &Setup,
    vq: &MockSplitQueue<GuestMemoryMmap<()>>,
    queue: &mut Queue,
    slot: u16,
    payload: &[u8],
) -> QueueOutcome {
    let addr = BUFFERS + u64::from(slot) * 0x400;
    s.mem.write_slice(payload, GuestAddress(addr)).unwrap();
    vq.add_desc_chains(&[readable(addr, payload.len() as u32)], slot)
        .unwrap();
    balloon.process_queue(kind, queue, &s.mem).unwrap()
}

fn used_ids(vq: &MockSplitQueue<GuestMemoryMmap<()>>) -> Vec<u32> {
    let n = vq.used().idx().load();
    (0..n)
        .map(|i| vq.used().ring().ref_at(i as usize).unwrap().load().id())
        .collect()
}

#[test]
fn queues_are_numbered_densely_by_features() {
    let stats = 1 << VIRTIO_BALLOON_F_STATS_VQ;
    let hint = 1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT;
    let report = 1 << VIRTIO_BALLOON_F_REPORTING;
    assert_eq!(queue_kind(0, 0), Some(QueueKind::Inflate));
    assert_eq!(queue_kind(0, 1), Some(QueueKind::Deflate));
    assert_eq!(queue_kind(0, 2), None);
    assert_eq!(queue_kind(report, 2), Some(QueueKind::Reporting));
    assert_eq!(queue_kind(stats | report, 2), Some(QueueKind::Stats));
    assert_eq!(queue_kind(stats | report, 3), Some(QueueKind::Reporting));
    assert_eq!(
        queue_kind(stats | hint | report, 3),
        Some(QueueKind::FreePageHint)
    );
    assert_eq!(
        queue_kind(stats | hint | report, 4),
        Some(QueueKind::Reporting)
    );
    assert_eq!(queue_kind(stats, 3), None);
}

#[test]
fn config_space_reads_target_and_actual_and_takes_only_actual() {
    let mut balloon = Balloon::new();
    balloon.set_target_pages(0x1234);
    assert_eq!(
        balloon.read_config(0, 8).unwrap(),
        [0x34, 0x12, 0, 0, 0, 0, 0, 0]
    );
    balloon.write_config(4, &7u32.to_le_bytes()).unwrap();
    assert_eq!(balloon.actual_pages(), 7);
    assert_eq!(balloon.read_config(4, 4).unwrap(), 7u32.to_le_bytes());
    balloon.write_config(5, &[1]).unwrap();
    assert_eq!(balloon.actual_pages(), 0x107);
    assert_eq!(balloon.read_config(8, 8).unwrap(), [0; 8]);
    assert!(balloon.read_config(12, 8).is_none());
    assert!(balloon.read_config(u32::MAX, 2).is_none());
    assert!(balloon.write_config(0, &[1, 2, 3, 4]).is_err());
    assert!(balloon.write_config(6, &[1, 2, 3, 4]).is_err());
    assert!(balloon.write_config(u32::MAX, &[1]).is_err());
    assert_eq!(balloon.target_pages(), 0x1234);
}

#[test]
fn inflate_punches_exactly_the_pfns_and_marks_them_invalid() {
    let s = setup();
    let vq = MockSplitQueue::new(&s.mem, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut balloon = Balloon::new();
    let outcome = run(
        &mut balloon,
        QueueKind::Inflate,
        &s,
        &vq,
        &mut queue,
        0,
        &pfn_bytes(&[100, 41, 40, 42, 41]),
    );
    assert_eq!(
        outcome,
        QueueOutcome {
            used: 1,
            refused: 0
        }
    );
    assert_eq!(used_ids(&vq), vec![0]);
    assert_eq!(data_pages(&s.file, LEN), all_but(LEN, &[40, 41, 42, 100]));
    let invalid = balloon.invalid_pages();
    assert_eq!(invalid.len(), 4);
    assert!(invalid.contains(40) && invalid.contains(100) && !invalid.contains(43));
    let counters = balloon.counters();
    assert_eq!(counters.inflated_pages, 4);
    assert_eq!(counters.punched_bytes, 4 * PAGE_SIZE);
    assert_eq!(counters.refused_requests, 0);
}

#[test]
fn deflate_clears_the_map_and_leaves_the_holes() {
    let s = setup();
    let vq = MockSplitQueue::new(&s.mem, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut balloon = Balloon::new();
    run(
        &mut balloon,
        QueueKind::Inflate,
        &s,
        &vq,
        &mut queue,
        0,
        &pfn_bytes(&[50, 51]),
    );
    let outcome = run(
        &mut balloon,
        QueueKind::Deflate,
        &s,
        &vq,
        &mut queue,
        1,
        &pfn_bytes(&[51, 52]),
    );
    assert_eq!(
        outcome,
        QueueOutcome {
            used: 1,
            refused: 0
        }
    );
    assert_eq!(used_ids(&vq), vec![0, 1]);
    assert!(balloon.invalid_pages().contains(50));
    assert!(!balloon.invalid_pages().contains(51));
    assert_eq!(balloon.counters().deflated_pages, 1);
    assert_eq!(data_pages(&s.file, LEN), all_but(LEN, &[50, 51]));
}

#[test]
fn inflate_with_a_pfn_outside_memory_is_refused_whole() {
    let s = setup();
    let vq = MockSplitQueue::new(&s.mem, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut balloon = Balloon::new();
    let outside = (LEN >> PAGE_SHIFT) as u32; // the first page past the end
    for (slot, pfns) in [&[60, outside][..], &[u32::MAX], &[61, 62, 1 << 20]]
        .into_iter()
        .enumerate()
    {
        let outcome = run(
            &mut balloon,
            QueueKind::Inflate,
            &s,
            &vq,
            &mut queue,
            slot as u16,
            &pfn_bytes(pfns),
        );
        assert_eq!(
            outcome,
            QueueOutcome {
                used: 1,
                refused: 1
            }
        );
    }
    assert_eq!(used_ids(&vq), vec![0, 1, 2]);
    assert_eq!(balloon.counters().refused_requests, 3);
    assert!(balloon.invalid_pages().is_empty());
    assert_eq!(data_pages(&s.file, LEN), all_but(LEN, &[]));
}

#[test]
fn deflate_with_a_pfn_outside_memory_is_refused_whole() {
    let s = setup();
    let vq = MockSplitQueue::new(&s.mem, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut balloon = Balloon::new();
    run(
        &mut balloon,
        QueueKind::Inflate,
        &s,
        &vq,
        &mut queue,
        0,
        &pfn_bytes(&[70]),
    );
    let outcome = run(
        &mut balloon,
        QueueKind::Deflate,
        &s,
        &vq,
        &mut queue,
        1,
        &pfn_bytes(&[70, u32::MAX]),
    );
    assert_eq!(outcome.refused, 1);
    assert!(balloon.invalid_pages().contains(70));
}

#[test]
fn malformed_and_misplaced_requests_are_refused_and_returned() {
    let s = setup();
    let vq = MockSplitQueue::new(&s.mem, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut balloon = Balloon::new();
    // Not a whole number of PFNs.
    let outcome = run(
        &mut balloon,
        QueueKind::Inflate,
        &s,
        &vq,
        &mut queue,
        0,
        &[80, 0, 0, 0, 81, 0],
    );
    assert_eq!(outcome.refused, 1);
    // A buffer outside guest memory.
    vq.add_desc_chains(&[readable(LEN + 0x1000, 8)], 1).unwrap();
    // A buffer running off the end of guest memory.
    vq.add_desc_chains(&[readable(LEN - 4, 8)], 2).unwrap();
    // A write-only buffer.
    s.mem
        .write_slice(&pfn_bytes(&[82]), GuestAddress(BUFFERS))
        .unwrap();
    vq.add_desc_chains(&[writable(BUFFERS, 4)], 3).unwrap();
    // Too large.
    vq.add_desc_chains(&[readable(BUFFERS, (MAX_REQUEST_BYTES + 4) as u32)], 4)
        .unwrap();
    // An empty buffer.
    vq.add_desc_chains(&[readable(BUFFERS, 0)], 5).unwrap();
    let outcome = balloon
        .process_queue(QueueKind::Inflate, &mut queue, &s.mem)
        .unwrap();
    assert_eq!(
        outcome,
        QueueOutcome {
            used: 5,
            refused: 5
        }
    );
    assert_eq!(used_ids(&vq), vec![0, 1, 2, 3, 4, 5]);
    assert_eq!(balloon.counters().refused_requests, 6);
    assert!(balloon.invalid_pages().is_empty());
    assert_eq!(data_pages(&s.file, LEN), all_but(LEN, &[]));
}

#[test]
fn inflate_spanning_a_chain_of_descriptors() {
    let s = setup();
    let vq = MockSplitQueue::new(&s.mem, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut balloon = Balloon::new();
    s.mem
        .write_slice(&pfn_bytes(&[90, 91]), GuestAddress(BUFFERS))
        .unwrap();
    s.mem
        .write_slice(&pfn_bytes(&[95]), GuestAddress(BUFFERS + 0x800))
        .unwrap();
    add_chain(
        &vq,
        &[readable(BUFFERS, 8), readable(BUFFERS + 0x800, 4)],
        0,
    );
    let outcome = balloon
        .process_queue(QueueKind::Inflate, &mut queue, &s.mem)
        .unwrap();
    assert_eq!(
        outcome,
        QueueOutcome {
            used: 1,
            refused: 0
        }
    );
    assert_eq!(data_pages(&s.file, LEN), all_but(LEN, &[90, 91, 95]));
}

#[test]
fn reporting_punches_ranges_without_marking_them_invalid() {
    let s = setup();
    let vq = MockSplitQueue::new(&s.mem, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut balloon = Balloon::new();
    add_chain(
        &vq,
        &[writable(0x20_000, 0x8000), writable(0x40_000, 0x1000)],
        0,
    );
    let outcome = balloon
        .process_queue(QueueKind::Reporting, &mut queue, &s.mem)
        .unwrap();
    assert_eq!(
        outcome,
        QueueOutcome {
            used: 1,
            refused: 0
        }
    );
    assert_eq!(used_ids(&vq), vec![0]);
    let holes: Vec<u64> = (0x20..0x28).chain([0x40]).collect();
    assert_eq!(data_pages(&s.file, LEN), all_but(LEN, &holes));
    assert!(balloon.invalid_pages().is_empty());
    assert_eq!(balloon.counters().reported_bytes, 0x9000);
    assert_eq!(balloon.counters().punched_bytes, 0x9000);
}

#[test]
fn bad_report_ranges_punch_nothing() {
    let s = setup();
    let vq = MockSplitQueue::new(&s.mem, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut balloon = Balloon::new();
    let bad = [
        writable(0x20_800, 0x1000),         // unaligned start
        writable(0x20_000, 0x1800),         // unaligned length
        writable(LEN - 0x1000, 0x2000),     // runs past the end
        writable(LEN, 0x1000),              // outside
        writable(u64::MAX - 0xfff, 0x2000), // overflows
        writable(0x20_000, 0),              // empty
    ];
    for (slot, desc) in bad.iter().enumerate() {
        vq.add_desc_chains(&[*desc], slot as u16).unwrap();
    }
    // A chain whose first range is good and second bad: refused whole.
    add_chain(&vq, &[writable(0x30_000, 0x1000), writable(LEN, 0x1000)], 6);
    let outcome = balloon
        .process_queue(QueueKind::Reporting, &mut queue, &s.mem)
        .unwrap();
    assert_eq!(
        outcome,
        QueueOutcome {
            used: 7,
            refused: 7
        }
    );
    assert_eq!(used_ids(&vq), vec![0, 1, 2, 3, 4, 5, 6]);
    assert_eq!(balloon.counters().reported_bytes, 0);
    assert_eq!(data_pages(&s.file, LEN), all_but(LEN, &[]));
}

fn stats_bytes(entries: &[(u16, u64)]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|(tag, val)| tag.to_le_bytes().into_iter().chain(val.to_le_bytes()))
        .collect()
}

#[test]
fn stats_are_kept_and_the_buffer_held_until_asked_for() {
    let s = setup();
    let vq = MockSplitQueue::new(&s.mem, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut balloon = Balloon::new();
    let outcome = run(
        &mut balloon,
        QueueKind::Stats,
        &s,
        &vq,
        &mut queue,
        0,
        &stats_bytes(&[(4, 1000), (5, 4096)]),
    );
    assert_eq!(
        outcome,
        QueueOutcome {
            used: 0,
            refused: 0
        }
    );
    assert!(balloon.holds_stats_buffer());
    assert_eq!(balloon.stats().get(&4), Some(&1000));
    assert_eq!(balloon.stats().get(&5), Some(&4096));
    assert!(balloon.request_stats(&mut queue, &s.mem).unwrap());
    assert!(!balloon.request_stats(&mut queue, &s.mem).unwrap());
    assert_eq!(used_ids(&vq), vec![0]);
    // The guest refills: the newest value wins.
    run(
        &mut balloon,
        QueueKind::Stats,
        &s,
        &vq,
        &mut queue,
        1,
        &stats_bytes(&[(4, 999)]),
    );
    assert_eq!(balloon.stats().get(&4), Some(&999));
    assert_eq!(balloon.counters().stats_updates, 2);
    // A second buffer while one is held: the first goes back.
    let outcome = run(
        &mut balloon,
        QueueKind::Stats,
        &s,
        &vq,
        &mut queue,
        2,
        &stats_bytes(&[(4, 998)]),
    );
    assert_eq!(outcome.used, 1);
    assert_eq!(used_ids(&vq), vec![0, 1]);
    balloon.connection_closed();
    assert!(!balloon.holds_stats_buffer());
}

#[test]
fn a_short_stats_buffer_is_refused_and_returned() {
    let s = setup();
    let vq = MockSplitQueue::new(&s.mem, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut balloon = Balloon::new();
    let mut short = stats_bytes(&[(4, 1)]);
    short.pop();
    let outcome = run(
        &mut balloon,
        QueueKind::Stats,
        &s,
        &vq,
        &mut queue,
        0,
        &short,
    );
    assert_eq!(
        outcome,
        QueueOutcome {
            used: 1,
            refused: 1
        }
    );
    assert!(!balloon.holds_stats_buffer());
    assert!(balloon.stats().is_empty());
}

#[test]
fn inflate_over_two_regions_uses_each_region_file_offset() {
    // Guest region 0 (gpa 0, 1 MiB) maps file offset 0; region 1 (gpa 4 GiB, 64 KiB) maps
    // file offset 1 MiB.
    let file = populated_memfd(LEN + 0x10000);
    let mem = memory(&file, &[(0, LEN, 0), (1 << 32, 0x10000, LEN)]);
    let s = Setup { file, mem };
    let vq = MockSplitQueue::new(&s.mem, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut balloon = Balloon::new();
    let high = ((1u64 << 32) >> PAGE_SHIFT) as u32;
    run(
        &mut balloon,
        QueueKind::Inflate,
        &s,
        &vq,
        &mut queue,
        0,
        &pfn_bytes(&[high + 3, 7]),
    );
    let file_page = (LEN >> PAGE_SHIFT) + 3;
    assert_eq!(
        data_pages(&s.file, LEN + 0x10000),
        all_but(LEN + 0x10000, &[7, file_page])
    );
    assert!(balloon.invalid_pages().contains(u64::from(high) + 3));
}

#[test]
fn page_runs_merge_consecutive_pages_in_any_order() {
    assert_eq!(
        page_runs(&[1, 2, 3, 7, 9, 10]),
        vec![(1, 3), (7, 1), (9, 2)]
    );
    assert_eq!(
        page_runs(&[10, 3, 9, 1, 2, 3, 7, 1]),
        vec![(1, 3), (7, 1), (9, 2)]
    );
    assert!(page_runs(&[]).is_empty());
}

#[test]
fn inflate_on_memory_without_a_file_counts_a_punch_error() {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), LEN as usize)]).unwrap();
    let vq = MockSplitQueue::new(&mem, 16);
    let mut queue: Queue = vq.create_queue().unwrap();
    let mut balloon = Balloon::new();
    mem.write_slice(&pfn_bytes(&[20, 21]), GuestAddress(BUFFERS))
        .unwrap();
    vq.add_desc_chains(&[readable(BUFFERS, 8)], 0).unwrap();
    let outcome = balloon
        .process_queue(QueueKind::Inflate, &mut queue, &mem)
        .unwrap();
    assert_eq!(
        outcome,
        QueueOutcome {
            used: 1,
            refused: 0
        }
    );
    // The guest gave the pages up, so they are invalid, but nothing could be returned.
    assert_eq!(balloon.counters().punch_errors, 1);
    assert_eq!(balloon.counters().punched_bytes, 0);
    assert_eq!(balloon.invalid_pages().len(), 2);
}

#[test]
fn parse_pfns_reads_le32_frames_in_order_and_checks_each_page() {
    let s = setup();
    let pfns = parse_pfns(&pfn_bytes(&[3, 255, 3, 0x01]), &s.mem).unwrap();
    assert_eq!(pfns, vec![3, 255, 3, 1]);
    // Little endian: bytes 80 00 00 00 are frame 0x80 (big endian would be far outside).
    assert_eq!(parse_pfns(&[0x80, 0, 0, 0], &s.mem).unwrap(), vec![0x80]);
    for bad in [&[][..], &[1, 0, 0], &[1, 0, 0, 0, 2]] {
        assert!(
            matches!(
                parse_pfns(bad, &s.mem),
                Err(Error::Malformed { entry: 4, len }) if len == bad.len()
            ),
            "{bad:?}"
        );
    }
    // The first page past the end, and the largest frame a guest can name.
    let outside = (LEN >> PAGE_SHIFT) as u32;
    for pfns in [&[1, outside][..], &[u32::MAX]] {
        assert!(matches!(
            parse_pfns(&pfn_bytes(pfns), &s.mem),
            Err(Error::OutsideMemory { .. })
        ));
    }
}

#[test]
fn parse_pfns_checks_against_every_region() {
    // Two regions with a gap of one page between them.
    let file = populated_memfd(0x3000);
    let mem = memory(&file, &[(0, 0x1000, 0), (0x2000, 0x1000, 0x1000)]);
    assert_eq!(parse_pfns(&pfn_bytes(&[0, 2]), &mem).unwrap(), vec![0, 2]);
    assert!(parse_pfns(&pfn_bytes(&[1]), &mem).is_err());
}

#[test]
fn parse_stats_reads_packed_entries_and_keeps_unknown_tags() {
    let entries = [(4u16, 1000u64), (0x7fff, u64::MAX), (4, 7)];
    assert_eq!(
        parse_stats(&stats_bytes(&entries)).unwrap(),
        entries.to_vec()
    );
    let mut short = stats_bytes(&entries);
    short.pop();
    for bad in [&[][..], &short, &[0; 11]] {
        assert!(
            matches!(
                parse_stats(bad),
                Err(Error::Malformed { entry: STAT_ENTRY_SIZE, len }) if len == bad.len()
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn check_reported_ranges_refuses_a_chain_with_one_bad_range() {
    let s = setup();
    assert!(check_reported_ranges(&[], &s.mem).is_ok());
    assert!(check_reported_ranges(&[(0x20_000, 0x8000), (LEN - 0x1000, 0x1000)], &s.mem).is_ok());
    for (bad, expected) in [
        ((0x20_800, 0x1000), "unaligned"),
        ((0x20_000, 0x1800), "unaligned"),
        ((0x20_000, 0), "empty"),
        ((u64::MAX - 0xfff, 0x2000), "empty"),
        ((LEN - 0x1000, 0x2000), "outside"),
        ((LEN, 0x1000), "outside"),
    ] {
        let err = check_reported_ranges(&[(0x20_000, 0x1000), bad], &s.mem).unwrap_err();
        let matched = match err {
            Error::Unaligned { addr, len } => expected == "unaligned" && (addr, len) == bad,
            Error::BadLength { addr, len } => expected == "empty" && (addr, len) == bad,
            Error::OutsideMemory { addr, len } => expected == "outside" && (addr, len) == bad,
            _ => false,
        };
        assert!(matched, "{bad:x?}: {err}");
    }
}
