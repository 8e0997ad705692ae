//! Mapped restore on real memory: bit-identical content, copy-on-write isolation from the
//! snapshot file, pages without data left unpopulated, corrupt data rejected before mapping.

use std::os::unix::fs::FileExt;

use ext_snapshot::restore::mapped::{restore_mapped, MappedOptions, MIN_MAPPED_PAGES};
use ext_snapshot::{Error, RegionBitmaps, SnapshotFile, SnapshotWriter, WriteOptions, PAGE_SIZE};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

const REGIONS: [(u64, u64); 2] = [(0, 384 * PAGE_SIZE), (64 << 20, 160 * PAGE_SIZE)];

#[derive(Clone, Copy, PartialEq, Debug)]
enum Kind {
    Data,
    Hole,
    Zero,
    Invalid,
}

struct Fixture {
    layout: Vec<(u64, u64)>,
    memory: GuestMemoryMmap,
    kinds: Vec<Vec<Kind>>,
    invalid: Vec<Vec<u64>>,
    expected: Vec<Vec<u8>>,
}

fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed | 1;
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// Deterministic segments of every kind on `REGIONS`, with data runs both shorter and longer
/// than `MIN_MAPPED_PAGES`, so both the mapping and the copying path of mapped restore run.
fn fixture(seed: u64) -> Fixture {
    let mut next = xorshift(seed);
    let kinds = REGIONS
        .iter()
        .map(|&(_, size)| {
            let pages = size / PAGE_SIZE;
            let mut region_kinds = Vec::new();
            while (region_kinds.len() as u64) < pages {
                let kind = [
                    Kind::Data,
                    Kind::Hole,
                    Kind::Zero,
                    Kind::Invalid,
                    Kind::Data,
                ][(next() % 5) as usize];
                let length = if next() % 3 == 0 {
                    MIN_MAPPED_PAGES * 2 + next() % 20
                } else {
                    1 + next() % 6
                };
                for _ in 0..length.min(pages - region_kinds.len() as u64) {
                    region_kinds.push(kind);
                }
            }
            region_kinds
        })
        .collect();
    build(&REGIONS, kinds, seed)
}

/// Anonymous guest memory with `layout`, page `p` of region `r` filled as `kinds[r][p]`:
/// random data, written zeros, nothing (never populated), or random data marked invalid.
fn build(layout: &[(u64, u64)], kinds: Vec<Vec<Kind>>, seed: u64) -> Fixture {
    let ranges: Vec<(GuestAddress, usize)> = layout
        .iter()
        .map(|&(a, s)| (GuestAddress(a), s as usize))
        .collect();
    let memory = GuestMemoryMmap::from_ranges(&ranges).unwrap();
    let mut next = xorshift(seed ^ 0x5eed);
    let mut invalid = Vec::new();
    let mut expected = Vec::new();
    for (&(addr, size), region_kinds) in layout.iter().zip(&kinds) {
        let pages = size / PAGE_SIZE;
        let mut bits = vec![0u64; pages.div_ceil(64) as usize];
        let mut region_expected = vec![0u8; size as usize];
        for (page, kind) in region_kinds.iter().enumerate() {
            let gpa = GuestAddress(addr + page as u64 * PAGE_SIZE);
            let mut bytes = vec![0u8; PAGE_SIZE as usize];
            for chunk in bytes.chunks_mut(8) {
                chunk.copy_from_slice(&next().to_le_bytes());
            }
            match kind {
                Kind::Data => {
                    memory.write_slice(&bytes, gpa).unwrap();
                    let at = page * PAGE_SIZE as usize;
                    region_expected[at..at + PAGE_SIZE as usize].copy_from_slice(&bytes);
                }
                Kind::Zero => memory.write_slice(&[0u8; PAGE_SIZE as usize], gpa).unwrap(),
                Kind::Invalid => {
                    // Content the guest declared unused: must not survive the snapshot.
                    memory.write_slice(&bytes, gpa).unwrap();
                    bits[page / 64] |= 1 << (page % 64);
                }
                Kind::Hole => {}
            }
        }
        invalid.push(bits);
        expected.push(region_expected);
    }
    Fixture {
        layout: layout.to_vec(),
        memory,
        kinds,
        invalid,
        expected,
    }
}

/// Random region layouts (1 to 3 regions, gaps between them) and random runs of every kind.
fn layout_and_kinds() -> impl Strategy<Value = (Vec<(u64, u64)>, Vec<Vec<Kind>>)> {
    let kind = prop_oneof![
        Just(Kind::Data),
        Just(Kind::Hole),
        Just(Kind::Zero),
        Just(Kind::Invalid)
    ];
    let region = (0u64..64, proptest::collection::vec((kind, 1u64..40), 1..8));
    proptest::collection::vec(region, 1..4).prop_map(|regions| {
        let mut layout = Vec::new();
        let mut kinds = Vec::new();
        let mut cursor = 0u64;
        for (gap, runs) in regions {
            let region_kinds: Vec<Kind> = runs
                .iter()
                .flat_map(|&(k, n)| std::iter::repeat_n(k, n as usize))
                .collect();
            let start = cursor + gap * PAGE_SIZE;
            let size = region_kinds.len() as u64 * PAGE_SIZE;
            layout.push((start, size));
            kinds.push(region_kinds);
            cursor = start + size;
        }
        (layout, kinds)
    })
}

fn snapshot(fixture: &Fixture, path: &std::path::Path) {
    let invalid = RegionBitmaps::new(fixture.invalid.iter().map(|b| b.as_slice()).collect());
    SnapshotWriter::new(WriteOptions::default())
        .invalid_pages(&invalid)
        .write_file(&fixture.memory, path)
        .unwrap();
}

fn assert_identical(memory: &GuestMemoryMmap, fixture: &Fixture) {
    for (index, &(addr, size)) in fixture.layout.iter().enumerate() {
        let mut actual = vec![0u8; size as usize];
        memory.read_slice(&mut actual, GuestAddress(addr)).unwrap();
        for page in 0..(size / PAGE_SIZE) as usize {
            let range = page * PAGE_SIZE as usize..(page + 1) * PAGE_SIZE as usize;
            assert!(
                actual[range.clone()] == fixture.expected[index][range],
                "region {index} page {page} ({:?}) differs",
                fixture.kinds[index][page]
            );
        }
    }
}

fn present(address: u64) -> bool {
    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut entry = [0u8; 8];
    pagemap
        .read_exact_at(&mut entry, address / PAGE_SIZE * 8)
        .unwrap();
    u64::from_le_bytes(entry) & (1 << 63) != 0
}

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
    let (memory, _) = restore_mapped(&path, MappedOptions::default()).unwrap();
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
    let (memory, _) = restore_mapped(&path, MappedOptions::default()).unwrap();
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
    let result = restore_mapped(&path, MappedOptions { verify_data: true });
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
        restore_mapped(&diff, MappedOptions::default()),
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
