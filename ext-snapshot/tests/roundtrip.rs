//! Round trips of random guest memory through both encodings and eager restore, on anonymous
//! and memfd-backed memory: bit-exact content, exact page typing, and no host allocation of
//! pages without data.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::FileExt;

use common::{
    anon_memory, expected_bytes, fill_memory, memfd_memory, read_memory, resident_pages, Fill,
};
use ext_snapshot::{
    file_to_stream, fresh_memory, restore_eager, restore_stream, restore_stream_staged,
    restore_to_raw_file, stream_to_file, EagerOptions, GfnBitmap, PageType, RawLayout,
    SnapshotFile, SnapshotReport, SnapshotWriter, WriteOptions, PAGE_SIZE,
};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

fn expected_counts(fills: &[Vec<Fill>]) -> [u64; 5] {
    let mut c = [0u64; 5];
    for f in fills.iter().flatten() {
        let t = match f {
            Fill::Untouched => PageType::NotPopulated,
            Fill::Zeros => PageType::Zero,
            Fill::Data(_) => PageType::Data,
            Fill::Invalid(_) => PageType::Invalid,
        };
        c[t as usize] += 1;
    }
    c
}

/// Restored memory must equal `expected` and hold host pages only where there is data.
fn check_restored(mem: &GuestMemoryMmap, fills: &[Vec<Fill>], expected: &[Vec<u8>]) {
    let resident = resident_pages(mem);
    for (ri, (pages, res)) in fills.iter().zip(&resident).enumerate() {
        for (p, (f, &r)) in pages.iter().zip(res).enumerate() {
            assert_eq!(
                r,
                matches!(f, Fill::Data(_)),
                "region {ri} page {p} ({f:?}): resident {r} after restore"
            );
        }
    }
    assert!(read_memory(mem) == expected, "restored bytes differ");
}

fn check_report(report: &SnapshotReport, fills: &[Vec<Fill>]) {
    assert_eq!(report.pages_by_type, expected_counts(fills), "page typing");
}

fn round_trip(layout: &[(u64, u64)], fills: &[Vec<Fill>], memfd: bool) {
    let source = if memfd {
        memfd_memory(layout)
    } else {
        anon_memory(layout)
    };
    let invalid = fill_memory(&source, layout, fills);
    let expected = expected_bytes(layout, fills);
    let bitmap = GfnBitmap::new(&invalid);
    let writer = SnapshotWriter::new(WriteOptions::default()).invalid_pages(&bitmap);
    let dir = tempfile::tempdir().expect("tempdir");

    // File encoding.
    let path = dir.path().join("snap");
    let report = writer.write_file(&source, &path).expect("write file");
    check_report(&report, fills);
    assert!(!dir.path().join("snap.tmp").exists());
    let data_pages = expected_counts(fills)[PageType::Data as usize];
    let snapshot = SnapshotFile::open(&path).expect("open");
    assert_eq!(snapshot.data_bytes(), data_pages * PAGE_SIZE);
    assert_eq!(report.output_bytes, snapshot.file_len().expect("len"));
    let target = fresh_memory(&snapshot.layout()).expect("fresh memory");
    let r = restore_eager(&snapshot, &target, EagerOptions::default()).expect("restore");
    assert_eq!(r.data_pages, data_pages);
    check_restored(&target, fills, &expected);

    // Into memory that already holds other bytes.
    let dirty = anon_memory(layout);
    for region in dirty.iter() {
        let junk = vec![0xa5u8; region.len() as usize];
        dirty
            .write_slice(&junk, region.start_addr())
            .expect("fill junk");
    }
    let opts = EagerOptions {
        target_is_fresh: false,
        ..Default::default()
    };
    restore_eager(&snapshot, &dirty, opts).expect("restore into used memory");
    assert!(read_memory(&dirty) == expected, "restore into used memory");

    // Stream encoding.
    let mut stream = Vec::new();
    let sreport = writer
        .write_stream(&source, &mut stream)
        .expect("write stream");
    check_report(&sreport, fills);
    assert_eq!(sreport.output_bytes, stream.len() as u64);
    let target = fresh_memory(layout).expect("fresh memory");
    restore_stream(&stream[..], &target, EagerOptions::default()).expect("restore stream");
    check_restored(&target, fills, &expected);
    let target = fresh_memory(layout).expect("fresh memory");
    restore_stream_staged(
        &stream[..],
        &target,
        &dir.path().join("spool"),
        EagerOptions::default(),
    )
    .expect("staged restore");
    check_restored(&target, fills, &expected);

    // Conversions keep identity and digest.
    let mut converted = Vec::new();
    file_to_stream(&snapshot, &mut converted).expect("file to stream");
    let back = dir.path().join("back");
    let creport = stream_to_file(&converted[..], &back, WriteOptions::default()).expect("back");
    assert_eq!((creport.id, creport.digest), (report.id, report.digest));
    let back = SnapshotFile::open(&back).expect("open converted");
    assert_eq!(back.header(), snapshot.header());
    assert_eq!(back.regions(), snapshot.regions());

    // Sparse raw file.
    let raw = tempfile::tempfile().expect("raw file");
    restore_to_raw_file(&snapshot, &raw, RawLayout::GuestPhysical).expect("raw restore");
    for (&(addr, size), bytes) in layout.iter().zip(&expected) {
        let mut buf = vec![0u8; size as usize];
        raw.read_exact_at(&mut buf, addr).expect("read raw");
        assert!(&buf == bytes, "raw file content");
    }
}

fn fill_strategy() -> impl Strategy<Value = Fill> {
    prop_oneof![
        3 => Just(Fill::Untouched),
        2 => Just(Fill::Zeros),
        4 => any::<u8>().prop_map(Fill::Data),
        1 => any::<u8>().prop_map(Fill::Invalid),
    ]
}

/// 1–4 regions of 1–64 pages at random page-aligned addresses with random gaps, and a fill
/// for every page.
fn memory_strategy() -> impl Strategy<Value = (Vec<(u64, u64)>, Vec<Vec<Fill>>)> {
    (
        0u64..256,
        prop::collection::vec((0u64..32, 1u64..=64), 1..=4),
    )
        .prop_flat_map(|(start, regions)| {
            let mut layout = Vec::new();
            let mut addr = start * PAGE_SIZE;
            for (gap, pages) in regions {
                addr += gap * PAGE_SIZE;
                layout.push((addr, pages * PAGE_SIZE));
                addr += pages * PAGE_SIZE;
            }
            let fills: Vec<_> = layout
                .iter()
                .map(|&(_, size)| {
                    prop::collection::vec(fill_strategy(), (size / PAGE_SIZE) as usize)
                })
                .collect();
            (Just(layout), fills)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_anonymous_memory_round_trips((layout, fills) in memory_strategy()) {
        round_trip(&layout, &fills, false);
    }

    #[test]
    fn random_memfd_memory_round_trips((layout, fills) in memory_strategy()) {
        round_trip(&layout, &fills, true);
    }
}

#[test]
fn every_type_in_long_runs_round_trips() {
    // Long data runs cross the 1024-page extent limit and the 8192-page scan chunk.
    let layout = [(0, 9000 * PAGE_SIZE), (0x1000_0000, 3 * PAGE_SIZE)];
    let mut first = vec![Fill::Data(7); 2100];
    first.extend(vec![Fill::Zeros; 100]);
    first.extend(vec![Fill::Untouched; 5000]);
    first.extend(vec![Fill::Invalid(1); 10]);
    first.extend(vec![Fill::Data(9); 1790]);
    let fills = vec![first, vec![Fill::Untouched, Fill::Data(3), Fill::Zeros]];
    round_trip(&layout, &fills, false);
    round_trip(&layout, &fills, true);
}

#[test]
fn never_populated_pages_are_not_read_by_the_writer() {
    let layout = [(0, 64 * PAGE_SIZE)];
    let mem = anon_memory(&layout);
    mem.write_slice(&[1u8; 8], GuestAddress(5 * PAGE_SIZE))
        .expect("write");
    let dir = tempfile::tempdir().expect("tempdir");
    SnapshotWriter::new(WriteOptions::default())
        .write_file(&mem, &dir.path().join("s"))
        .expect("write");
    let resident = resident_pages(&mem);
    let populated: Vec<usize> = (0..64).filter(|&p| resident[0][p]).collect();
    assert_eq!(
        populated,
        vec![5],
        "the writer populated pages it should not read"
    );
}

#[test]
fn shared_anonymous_memory_is_read_in_full() {
    use vm_memory::{GuestRegionMmap, MmapRegion};
    // pagemap does not report swapped-out shmem pages, so the writer reads every page of
    // shared anonymous memory: untouched pages come out as zero pages, not as holes.
    let region = MmapRegion::build(
        None,
        8 * PAGE_SIZE as usize,
        libc::PROT_READ | libc::PROT_WRITE,
        libc::MAP_SHARED | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
    )
    .expect("map shared anonymous memory");
    let region = GuestRegionMmap::new(region, GuestAddress(0)).expect("region");
    let mem = GuestMemoryMmap::from_regions(vec![region]).expect("memory");
    mem.write_slice(&[7u8; 16], GuestAddress(3 * PAGE_SIZE))
        .expect("write");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("s");
    let report = SnapshotWriter::new(WriteOptions::default())
        .write_file(&mem, &path)
        .expect("write");
    assert_eq!(report.pages(PageType::Data), 1);
    assert_eq!(report.pages(PageType::Zero), 7);
    let snapshot = SnapshotFile::open(&path).expect("open");
    let target = fresh_memory(&snapshot.layout()).expect("fresh");
    restore_eager(&snapshot, &target, EagerOptions::default()).expect("restore");
    assert!(read_memory(&target) == read_memory(&mem));
}
