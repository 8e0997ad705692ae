//! Lazy (userfaultfd) restore on real memory: bit-identical content, no population of pages
//! the guest did not touch, discarded pages read back as zero, corrupt extents fail without
//! hanging the faulting thread, and the handler stops when the memory is dropped.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;

use ext_snapshot::restore::lazy::restore_lazy;
use ext_snapshot::{Error, RegionBitmaps, SnapshotFile, SnapshotWriter, WriteOptions, PAGE_SIZE};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

mod restore_fixture;
use restore_fixture::*;

/// userfaultfd needs the syscall (and, for unprivileged users, vm.unprivileged_userfaultfd).
fn userfaultfd_available(test: &str) -> bool {
    let builder = userfaultfd::UffdBuilder::new().close_on_exec(true).create();
    if builder.is_err() {
        // .ci/run sets EXT_REQUIRE_ALL=1: there a missing environment is a failure.
        assert!(
            std::env::var("EXT_REQUIRE_ALL").as_deref() != Ok("1"),
            "EXT_REQUIRE_ALL=1, but this test would be skipped: {}",
            format_args!("SKIPPED: {test}: userfaultfd not available")
        );
        println!("SKIPPED: {test}: userfaultfd not available");
        return false;
    }
    true
}

#[test]
fn lazy_restore_is_bit_identical() {
    if !userfaultfd_available("lazy_restore_is_bit_identical") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.snap");
    let fixture = fixture(7);
    snapshot(&fixture, &path);
    let restore = restore_lazy(&path).unwrap();
    assert_eq!(
        restore.stats().faults,
        0,
        "setup must not fault anything in"
    );
    assert_identical(restore.memory(), &fixture);
    let stats = restore.finish().unwrap();
    let data_pages = fixture
        .kinds
        .iter()
        .flatten()
        .filter(|k| **k == Kind::Data)
        .count() as u64;
    let other_pages = fixture.kinds.iter().flatten().count() as u64 - data_pages;
    assert_eq!(stats.data_pages_copied, data_pages);
    assert_eq!(stats.zero_pages_mapped, other_pages);
    assert!(
        stats.faults < data_pages + other_pages,
        "runs were not batched: {stats:?}"
    );
}

#[test]
fn untouched_invalid_pages_are_never_populated() {
    if !userfaultfd_available("untouched_invalid_pages_are_never_populated") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.snap");
    let fixture = fixture(23);
    snapshot(&fixture, &path);
    let restore = restore_lazy::<()>(&path).unwrap();
    let memory = restore.memory();
    // Touch every data page, nothing else.
    for (index, &(addr, _)) in REGIONS.iter().enumerate() {
        for (page, kind) in fixture.kinds[index].iter().enumerate() {
            if *kind == Kind::Data {
                let mut byte = [0u8; 1];
                memory
                    .read_slice(&mut byte, GuestAddress(addr + page as u64 * PAGE_SIZE))
                    .unwrap();
            }
        }
    }
    let mut untouched = 0;
    for (index, &(addr, _)) in REGIONS.iter().enumerate() {
        let host = memory.get_host_address(GuestAddress(addr)).unwrap() as u64;
        for (page, kind) in fixture.kinds[index].iter().enumerate() {
            let populated = present(host + page as u64 * PAGE_SIZE);
            if *kind == Kind::Data {
                assert!(
                    populated,
                    "data page {index}/{page} not populated after a read"
                );
            } else {
                assert!(
                    !populated,
                    "untouched {kind:?} page {index}/{page} was populated"
                );
                untouched += 1;
            }
        }
    }
    assert!(untouched > 0);
    assert_eq!(
        restore.stats().zero_pages_mapped,
        0,
        "a page without data was prefaulted"
    );
    restore.finish().unwrap();
}

#[test]
fn discarded_pages_read_back_as_zero_not_snapshot_data() {
    if !userfaultfd_available("discarded_pages_read_back_as_zero_not_snapshot_data") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.snap");
    let fixture = fixture(29);
    snapshot(&fixture, &path);
    let restore = restore_lazy::<()>(&path).unwrap();
    let memory = restore.memory();
    let page = fixture.kinds[0]
        .iter()
        .position(|k| *k == Kind::Data)
        .unwrap() as u64;
    let mut bytes = vec![0u8; PAGE_SIZE as usize];
    memory
        .read_slice(&mut bytes, GuestAddress(page * PAGE_SIZE))
        .unwrap();
    assert!(bytes.iter().any(|&b| b != 0));
    let host = memory
        .get_host_address(GuestAddress(page * PAGE_SIZE))
        .unwrap();
    // SAFETY: one page of guest memory owned by `memory`, which lives past the call; a balloon
    // discards pages exactly like this.
    let result = unsafe { libc::madvise(host.cast(), PAGE_SIZE as usize, libc::MADV_DONTNEED) };
    assert_eq!(result, 0);
    memory
        .read_slice(&mut bytes, GuestAddress(page * PAGE_SIZE))
        .unwrap();
    assert!(
        bytes.iter().all(|&b| b == 0),
        "a discarded page came back with snapshot data"
    );
    restore.finish().unwrap();
}

#[test]
fn corrupt_extent_fails_the_restore_without_hanging_the_guest() {
    if !userfaultfd_available("corrupt_extent_fails_the_restore_without_hanging_the_guest") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.snap");
    let fixture = fixture(31);
    snapshot(&fixture, &path);
    let snapshot = SnapshotFile::open(&path).unwrap();
    let run = snapshot.regions()[0]
        .runs
        .iter()
        .find(|r| r.extent.is_some())
        .copied()
        .unwrap();
    let extent = run.extent.unwrap();
    drop(snapshot);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, extent.offset + 5).unwrap();
    file.write_all_at(&[byte[0] ^ 1], extent.offset + 5)
        .unwrap();
    drop(file);
    let restore = restore_lazy::<()>(&path).unwrap();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    // Returns (with zeros) once the handler, which refused the extent, closes the userfaultfd
    // after its grace time: nobody stops this "guest", and it must not hang.
    restore
        .memory()
        .read_slice(&mut page, GuestAddress(run.first_page * PAGE_SIZE))
        .unwrap();
    assert!(
        page.iter().all(|&b| b == 0),
        "corrupt data reached guest memory"
    );
    let failure = restore.finish();
    assert!(
        matches!(failure, Err(Error::UnsupportedMemory(ref m)) if m.contains("checksum")),
        "{failure:?}"
    );
}

#[test]
fn handler_serves_clones_and_stops_when_the_last_is_dropped() {
    if !userfaultfd_available("handler_serves_clones_and_stops_when_the_last_is_dropped") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.snap");
    let fixture = fixture(37);
    snapshot(&fixture, &path);
    let restore = restore_lazy(&path).unwrap();
    let clone = restore.memory().clone();
    let waiter = std::thread::spawn(move || restore.finish());
    // `finish` dropped its handle; the clone keeps the regions mapped and served.
    assert_identical(&clone, &fixture);
    drop(clone);
    let stats = waiter.join().unwrap().unwrap();
    assert!(stats.data_pages_copied > 0);
}

#[test]
fn concurrent_faults_from_several_threads_see_identical_memory() {
    if !userfaultfd_available("concurrent_faults_from_several_threads_see_identical_memory") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.snap");
    let fixture = fixture(43);
    snapshot(&fixture, &path);
    let restore = restore_lazy(&path).unwrap();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| assert_identical(restore.memory(), &fixture));
        }
    });
    restore.finish().unwrap();
}

#[test]
fn diff_snapshots_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.snap");
    let diff = dir.path().join("diff.snap");
    let fixture = fixture(41);
    snapshot(&fixture, &base);
    let parent = SnapshotFile::open(&base).unwrap();
    let dirty: Vec<Vec<u64>> = REGIONS
        .iter()
        .map(|&(_, s)| vec![1u64; (s / PAGE_SIZE).div_ceil(64) as usize])
        .collect();
    let dirty = RegionBitmaps::new(dirty.iter().map(|b| b.as_slice()).collect());
    SnapshotWriter::new(WriteOptions::default())
        .diff_against(&parent, &dirty)
        .write_file(&fixture.memory, &diff)
        .unwrap();
    assert!(matches!(restore_lazy::<()>(&diff), Err(Error::NeedsParent)));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_layouts_round_trip_through_lazy_restore((layout, kinds) in layout_and_kinds()) {
        if !userfaultfd_available("random_layouts_round_trip_through_lazy_restore") {
            return Ok(());
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.snap");
        let fixture = build(&layout, kinds, layout.len() as u64);
        snapshot(&fixture, &path);
        let restore = restore_lazy(&path).unwrap();
        assert_identical(restore.memory(), &fixture);
        restore.finish().unwrap();
    }
}
