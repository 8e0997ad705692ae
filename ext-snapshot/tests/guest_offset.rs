//! The guest-offset file layout (`FileLayout::GuestOffset`): data pages at their guest offsets
//! in a sparse file, restored bit-exactly by every restore mode, with one mapping per region
//! in the mapped mode and allocated bytes about the data bytes.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use common::{
    anon_memory, expected_bytes, fill_memory, memfd_memory, page_bytes, read_memory, Fill,
};
use ext_snapshot::restore::lazy::restore_lazy;
use ext_snapshot::restore::mapped::{restore_mapped, MappedOptions};
use ext_snapshot::{
    fresh_memory, restore_eager, EagerOptions, FileLayout, GfnBitmap, SnapshotFile, SnapshotWriter,
    WriteOptions, PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Three regions with a gap, every page type, data runs of several lengths.
const LAYOUT: [(u64, u64); 3] = [
    (0, 64 * PAGE_SIZE),
    (0x10_0000, 40 * PAGE_SIZE),
    (0x40_0000, 3 * PAGE_SIZE),
];

fn fills() -> Vec<Vec<Fill>> {
    LAYOUT
        .iter()
        .enumerate()
        .map(|(r, &(_, size))| {
            (0..size / PAGE_SIZE)
                .map(|p| match (p * 7 + r as u64 * 3) % 11 {
                    0..=3 => Fill::Data((p % 200) as u8 + 1),
                    4 | 5 => Fill::Zeros,
                    6 => Fill::Invalid(9),
                    _ => Fill::Untouched,
                })
                .collect()
        })
        .collect()
}

/// Writes `mem` (filled with [`fills`]) in the guest-offset layout to `path`.
fn write(mem: &GuestMemoryMmap, path: &Path) -> (u64, Vec<Vec<u8>>) {
    let fills = fills();
    let invalid = fill_memory(mem, &LAYOUT, &fills);
    let bitmap = GfnBitmap::new(&invalid);
    let report = SnapshotWriter::new(WriteOptions::default())
        .invalid_pages(&bitmap)
        .file_layout(FileLayout::GuestOffset)
        .write_file(mem, path)
        .expect("write guest-offset snapshot");
    (
        report.bytes(ext_snapshot::PageType::Data),
        expected_bytes(&LAYOUT, &fills),
    )
}

/// Data pages sit at `data_base + page * 4096`, every other page of the data area is a hole,
/// and the file allocates about its data bytes.
fn check_file(path: &Path, data_bytes: u64) {
    let snapshot = SnapshotFile::open(path).expect("open");
    assert_eq!(snapshot.file_layout(), FileLayout::GuestOffset);
    let fills = fills();
    let file = snapshot.file();
    let mut base = 4096;
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for (&(addr, size), region_fills) in LAYOUT.iter().zip(&fills) {
        for (i, fill) in region_fills.iter().enumerate() {
            file.read_exact_at(&mut page, base + i as u64 * PAGE_SIZE)
                .expect("read page");
            match *fill {
                Fill::Data(seed) => assert!(
                    page == page_bytes(seed, addr / PAGE_SIZE + i as u64),
                    "data page {i} of region at {addr:#x}"
                ),
                _ => assert!(page.iter().all(|&b| b == 0), "page {i} at {addr:#x}"),
            }
        }
        base += size;
    }
    let metadata = file.metadata().expect("stat");
    assert!(metadata.len() > base, "apparent length covers every region");
    // Header block + data + a tail of a few hundred bytes, in 4 KiB filesystem blocks.
    let allocated = metadata.blocks() * 512;
    assert!(
        allocated <= data_bytes + 4 * PAGE_SIZE,
        "allocated {allocated} bytes for {data_bytes} bytes of data"
    );
    snapshot.verify_data().expect("verify");
}

fn round_trip(mem: &GuestMemoryMmap, label: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("snap");
    let (data_bytes, expected) = write(mem, &path);
    check_file(&path, data_bytes);

    let snapshot = SnapshotFile::open(&path).expect("open");
    let target = fresh_memory(&snapshot.layout()).expect("fresh memory");
    restore_eager(&snapshot, &target, EagerOptions::default()).expect("eager restore");
    assert!(read_memory(&target) == expected, "{label}: eager");

    let (mapped, report) =
        restore_mapped(&path, MappedOptions { verify_data: true }).expect("mapped restore");
    assert_eq!(
        report.mappings,
        LAYOUT.len() as u64,
        "{label}: one mapping per region"
    );
    assert_eq!(report.copied_bytes, 0);
    assert!(read_memory(&mapped) == expected, "{label}: mapped");
    // Writes to a data page and to a hole stay private: the file does not change.
    mapped
        .write_slice(&[0xee; 8], GuestAddress(0))
        .expect("write data page");
    mapped
        .write_slice(&[0xee; 8], GuestAddress(0x10_0000 + 5 * PAGE_SIZE))
        .expect("write hole page");
    drop(mapped);
    check_file(&path, data_bytes);

    if userfaultfd::UffdBuilder::new()
        .close_on_exec(true)
        .create()
        .is_err()
    {
        // .ci/run sets EXT_REQUIRE_ALL=1: there a missing environment is a failure.
        assert!(
            std::env::var("EXT_REQUIRE_ALL").as_deref() != Ok("1"),
            "EXT_REQUIRE_ALL=1, but this test would be skipped: {}",
            format_args!("SKIPPED: {label} lazy restore: userfaultfd not available")
        );
        println!("SKIPPED: {label} lazy restore: userfaultfd not available");
        return;
    }
    let lazy = restore_lazy(&path).expect("lazy restore");
    assert!(read_memory(lazy.memory()) == expected, "{label}: lazy");
    lazy.finish().expect("lazy handler");
}

#[test]
fn anonymous_memory_round_trips_through_every_restore_mode() {
    round_trip(&anon_memory(&LAYOUT), "anonymous");
}

#[test]
fn memfd_memory_round_trips_through_every_restore_mode() {
    round_trip(&memfd_memory(&LAYOUT), "memfd");
}

#[test]
fn packed_and_guest_offset_files_hold_the_same_snapshot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = anon_memory(&LAYOUT);
    let invalid = fill_memory(&mem, &LAYOUT, &fills());
    let bitmap = GfnBitmap::new(&invalid);
    let packed = dir.path().join("packed");
    let offset = dir.path().join("offset");
    let writer = SnapshotWriter::new(WriteOptions::default()).invalid_pages(&bitmap);
    writer.write_file(&mem, &packed).expect("packed");
    writer
        .clone()
        .file_layout(FileLayout::GuestOffset)
        .write_file(&mem, &offset)
        .expect("guest offset");
    let packed = SnapshotFile::open(&packed).expect("open packed");
    let offset = SnapshotFile::open(&offset).expect("open guest offset");
    assert_eq!(packed.file_layout(), FileLayout::Packed);
    // Same model (types, runs, checksums, digest); only the extent offsets differ.
    assert_eq!(packed.header().digest, offset.header().digest);
    assert_eq!(packed.pages_by_type(), offset.pages_by_type());
    let shape = |s: &SnapshotFile| -> Vec<_> {
        s.regions()
            .iter()
            .flat_map(|r| {
                r.runs
                    .iter()
                    .map(|run| (run.page_type, run.first_page, run.pages))
            })
            .collect()
    };
    assert_eq!(shape(&packed), shape(&offset));
}
