//! ext-ch on real anonymous guest memory: what the patched Cloud Hypervisor's hooks write and
//! read back.

// Test fixtures unwrap: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use ext_ch::{write_memory, MemorySnapshot, MEMORY_FILE};
use ext_snapshot::GfnBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

const MIB: u64 = 1 << 20;

/// Two regions around a hole, as Cloud Hypervisor lays out RAM around the 32-bit gap: data
/// pages, zero pages (written with zeros), untouched pages and one ballooned page.
fn guest() -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 4 * MIB as usize),
        (GuestAddress(8 * MIB), 2 * MIB as usize),
    ])
    .unwrap();
    for page in 0..64u64 {
        mem.write_obj(page * 31 + 1, GuestAddress(page * 4096 + 8))
            .unwrap();
    }
    mem.write_slice(&[0u8; 4096 * 4], GuestAddress(MIB))
        .unwrap();
    mem.write_obj(0xabcd_u64, GuestAddress(8 * MIB + 4096 * 3))
        .unwrap();
    mem.write_obj(0x5555_u64, GuestAddress(2 * MIB)).unwrap();
    mem
}

fn contents(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut out = Vec::new();
    for region in mem.iter() {
        let mut buf = vec![0u8; region.len() as usize];
        mem.read_slice(&mut buf, region.start_addr()).unwrap();
        out.extend(buf);
    }
    out
}

#[test]
fn a_snapshot_types_pages_and_restores_only_data() {
    let dir = tempfile::tempdir().unwrap();
    let mem = guest();
    // gfn 512 (2 MiB) holds data but the balloon has it: typed Invalid, restored as zero.
    let mut words = vec![0u64; 16];
    words[512 / 64] |= 1 << (512 % 64);
    let invalid = GfnBitmap::new(&words);
    let figures = write_memory(&mem, dir.path(), Some(&invalid)).unwrap();
    assert_eq!(figures.data_pages, 65);
    assert_eq!(figures.invalid_pages, 1);
    assert_eq!(figures.zero_pages, 4);
    assert_eq!(figures.data_bytes, 65 * 4096);
    assert_eq!(
        figures.not_populated_pages
            + figures.invalid_pages
            + figures.zero_pages
            + figures.data_pages,
        6 * MIB / 4096
    );
    assert!(figures.file_bytes < figures.data_bytes + 64 * 1024);

    let snapshot = MemorySnapshot::open(dir.path()).unwrap();
    assert_eq!(snapshot.figures().unwrap().data_pages, 65);
    let fresh = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 4 * MIB as usize),
        (GuestAddress(8 * MIB), 2 * MIB as usize),
    ])
    .unwrap();
    let report = snapshot.restore_copy(&fresh).unwrap();
    assert_eq!(report.data_pages, 65);
    mem.write_obj(0u64, GuestAddress(2 * MIB)).unwrap();
    assert!(contents(&fresh) == contents(&mem));
}

#[test]
fn the_page_source_serves_data_and_zeros_and_knows_which_is_which() {
    let dir = tempfile::tempdir().unwrap();
    let mem = guest();
    write_memory(&mem, dir.path(), None).unwrap();
    let source = MemorySnapshot::open(dir.path())
        .unwrap()
        .page_source()
        .unwrap();
    assert!(source.has_data(0, 4096));
    assert!(!source.has_data(MIB, 4 * 4096), "zero pages hold no data");
    assert!(
        !source.has_data(3 * MIB, MIB),
        "never-populated pages hold no data"
    );
    assert!(
        source.has_data(3 * MIB, 8 * MIB),
        "a range reaching into data"
    );
    // A 2 MiB huge-page-sized read across data and empty pages.
    let mut buf = vec![0xffu8; 2 * MIB as usize];
    assert!(source.read(0, &mut buf).unwrap());
    let mut expected = vec![0u8; 2 * MIB as usize];
    mem.read_slice(&mut expected, GuestAddress(0)).unwrap();
    assert!(buf == expected);
    let mut empty = vec![0xffu8; 4096];
    assert!(!source.read(3 * MIB, &mut empty).unwrap());
    assert!(empty.iter().all(|&b| b == 0));
    assert!(
        source.read(5 * MIB, &mut empty).is_err(),
        "the hole between regions"
    );
    assert!(
        source
            .read(8 * MIB + 2 * MIB - 4096, &mut buf[..8192])
            .is_err(),
        "past the end"
    );
}

/// Fresh memory with the layout of [`guest`].
fn fresh() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 4 * MIB as usize),
        (GuestAddress(8 * MIB), 2 * MIB as usize),
    ])
    .unwrap()
}

/// A snapshot that opens but whose data is bad: the copy restore fails and leaves the fresh
/// memory zero, the on-demand page source is refused.
fn refused_by_both_restores(dir: &std::path::Path) -> String {
    let snapshot = MemorySnapshot::open(dir).unwrap();
    let mem = fresh();
    let err = snapshot.restore_copy(&mem).unwrap_err().to_string();
    assert!(contents(&mem).iter().all(|&b| b == 0), "memory written");
    assert!(snapshot.page_source().is_err(), "page source served");
    err
}

#[test]
fn corrupt_truncated_or_foreign_snapshots_are_refused_before_the_vm_runs() {
    let dir = tempfile::tempdir().unwrap();
    write_memory(&guest(), dir.path(), None).unwrap();
    let path = dir.path().join(MEMORY_FILE);
    let len = std::fs::metadata(&path).unwrap().len();

    // One flipped byte in the last data page (the data area starts after the 4 KiB header
    // block): the structure is intact, the data is not.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let last_data = ext_snapshot::SnapshotFile::open(&path).unwrap().regions()[1]
        .runs
        .iter()
        .filter_map(|r| r.extent)
        .next_back()
        .unwrap();
    let at = last_data.offset + last_data.len - 4096 + 8;
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, at).unwrap();
    file.write_all_at(&[byte[0] ^ 0x40], at).unwrap();
    let err = refused_by_both_restores(dir.path());
    assert!(err.contains(MEMORY_FILE), "{err}");
    file.write_all_at(&byte, at).unwrap();
    let mem = fresh();
    MemorySnapshot::open(dir.path())
        .unwrap()
        .restore_copy(&mem)
        .unwrap();
    assert!(contents(&mem) == contents(&guest()));

    file.set_len(len - 4096).unwrap();
    assert!(MemorySnapshot::open(dir.path()).is_err());
    std::fs::remove_file(&path).unwrap();
    assert!(MemorySnapshot::open(dir.path()).is_err());
}

#[test]
fn memory_of_another_shape_is_refused_before_a_write() {
    let dir = tempfile::tempdir().unwrap();
    write_memory(&guest(), dir.path(), None).unwrap();
    let snapshot = MemorySnapshot::open(dir.path()).unwrap();
    let other = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 * MIB as usize)]).unwrap();
    let err = snapshot.restore_copy(&other).unwrap_err().to_string();
    assert!(err.contains("does not fit"), "{err}");
    assert!(contents(&other).iter().all(|&b| b == 0));
}
