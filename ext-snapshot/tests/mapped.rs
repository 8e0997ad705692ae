//! Mapped restore on real memory: bit-identical content, copy-on-write isolation from the
//! snapshot file, pages without data left unpopulated, corrupt data rejected before mapping.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;

use ext_snapshot::restore::mapped::{restore_mapped, MappedOptions};
use ext_snapshot::{Error, RegionBitmaps, SnapshotFile, SnapshotWriter, WriteOptions, PAGE_SIZE};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

mod restore_fixture;
use restore_fixture::*;

#[test]
fn mapped_restore_is_bit_identical_with_and_without_verification() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.snap");
    let fixture = fixture(7);
    snapshot(&fixture, &path);
    for verify_data in [false, true] {
        let (memory, report) = restore_mapped(&path, MappedOptions { verify_data }).unwrap();
        assert!(report.mappings > 0, "no extent was mapped: {report:?}");
        assert!(
            report.copied_bytes > 0,
            "no short extent was copied: {report:?}"
        );
        assert_identical(&memory, &fixture);
    }
}

#[test]
fn guest_writes_stay_private_to_the_restored_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.snap");
    let fixture = fixture(11);
    snapshot(&fixture, &path);
    let before = std::fs::read(&path).unwrap();
    let (memory, _) = restore_mapped::<()>(&path, MappedOptions::default()).unwrap();
    let size = REGIONS[0].1 as usize;
    memory
        .write_slice(&vec![0xa5u8; size], GuestAddress(0))
        .unwrap();
    let mut back = vec![0u8; size];
    memory.read_slice(&mut back, GuestAddress(0)).unwrap();
    assert!(back.iter().all(|&b| b == 0xa5));
    drop(memory);
    assert!(
        std::fs::read(&path).unwrap() == before,
        "the snapshot file changed"
    );
    SnapshotFile::open(&path).unwrap().verify_data().unwrap();
    // A second restore still sees the snapshot's content.
    let (memory, _) = restore_mapped(&path, MappedOptions::default()).unwrap();
    assert_identical(&memory, &fixture);
}

#[test]
fn pages_without_data_are_not_populated_by_the_restore() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.snap");
    let fixture = fixture(13);
    snapshot(&fixture, &path);
    let (memory, _) = restore_mapped::<()>(&path, MappedOptions::default()).unwrap();
    let mut checked = 0;
    for (index, &(addr, _)) in REGIONS.iter().enumerate() {
        let host = memory.get_host_address(GuestAddress(addr)).unwrap() as u64;
        for (page, kind) in fixture.kinds[index].iter().enumerate() {
            if *kind != Kind::Data {
                assert!(
                    !present(host + page as u64 * PAGE_SIZE),
                    "region {index} page {page} ({kind:?}) populated"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 0);
    // The probe itself works: a page read through the mapping becomes present.
    let data_page = fixture.kinds[0]
        .iter()
        .position(|k| *k == Kind::Data)
        .unwrap() as u64;
    let mut byte = [0u8; 1];
    memory
        .read_slice(&mut byte, GuestAddress(data_page * PAGE_SIZE))
        .unwrap();
    let host = memory.get_host_address(GuestAddress(0)).unwrap() as u64;
    assert!(present(host + data_page * PAGE_SIZE));
}

#[test]
fn corrupt_extent_is_rejected_before_any_memory_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.snap");
    let fixture = fixture(17);
    snapshot(&fixture, &path);
    let snapshot = SnapshotFile::open(&path).unwrap();
    let extent = snapshot.regions()[0]
        .runs
        .iter()
        .find_map(|r| r.extent)
        .unwrap();
    drop(snapshot);
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    let mut byte = [0u8; 1];
    std::fs::File::open(&path)
        .unwrap()
        .read_exact_at(&mut byte, extent.offset + 100)
        .unwrap();
    file.write_all_at(&[byte[0] ^ 0x40], extent.offset + 100)
        .unwrap();
    let result = restore_mapped::<()>(&path, MappedOptions { verify_data: true });
    assert!(
        matches!(result, Err(Error::BadChecksum { .. })),
        "{:?}",
        result.err()
    );
}

#[test]
fn diff_snapshots_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.snap");
    let diff = dir.path().join("diff.snap");
    let fixture = fixture(19);
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
    assert!(matches!(
        restore_mapped::<()>(&diff, MappedOptions::default()),
        Err(Error::NeedsParent)
    ));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_layouts_round_trip_through_mapped_restore((layout, kinds) in layout_and_kinds()) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.snap");
        let fixture = build(&layout, kinds, layout.len() as u64);
        snapshot(&fixture, &path);
        let (memory, _) = restore_mapped(&path, MappedOptions { verify_data: true }).unwrap();
        assert_identical(&memory, &fixture);
    }
}
