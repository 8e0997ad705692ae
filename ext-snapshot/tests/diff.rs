//! Diff snapshots: chains, merges, link validation, and holes vs written zeros.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{anon_memory, page_bytes, read_memory, resident_pages};
use ext_snapshot::{
    fresh_memory, restore_eager, restore_stream, EagerOptions, Error, FileLayout,
    MemoryDirtyBitmap, PageType, RegionBitmaps, SnapshotChain, SnapshotFile, SnapshotWriter,
    WriteOptions, PAGE_SIZE,
};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

const LAYOUT: [(u64, u64); 2] = [(0, 32 * PAGE_SIZE), (0x100_0000, 16 * PAGE_SIZE)];

fn gpa(region: usize, page: u64) -> GuestAddress {
    GuestAddress(LAYOUT[region].0 + page * PAGE_SIZE)
}

fn write_page<M: GuestMemory>(mem: &M, region: usize, page: u64, bytes: &[u8]) {
    mem.write_slice(bytes, gpa(region, page))
        .expect("write page");
}

fn type_of(s: &SnapshotFile, region: usize, page: u64) -> PageType {
    s.regions()[region]
        .runs
        .iter()
        .find(|r| r.first_page <= page && page < r.first_page + r.pages)
        .map(|r| r.page_type)
        .expect("page covered")
}

fn zeros() -> Vec<u8> {
    vec![0u8; PAGE_SIZE as usize]
}

/// Records which pages a test writes, as KVM dirty-log style per-region bitmaps.
struct Dirty(Vec<Vec<u64>>);

impl Dirty {
    fn new() -> Self {
        Dirty(
            LAYOUT
                .iter()
                .map(|&(_, s)| vec![0; (s / PAGE_SIZE).div_ceil(64) as usize])
                .collect(),
        )
    }
    fn write(&mut self, mem: &GuestMemoryMmap, region: usize, page: u64, bytes: &[u8]) {
        write_page(mem, region, page, bytes);
        self.0[region][(page / 64) as usize] |= 1 << (page % 64);
    }
    fn bitmaps(&self) -> RegionBitmaps<'_> {
        RegionBitmaps::new(self.0.iter().map(Vec::as_slice).collect())
    }
}

/// Base, then two diffs; returns the snapshots' paths and the final memory.
fn build_chain(dir: &std::path::Path) -> (Vec<std::path::PathBuf>, GuestMemoryMmap) {
    build_chain_in(dir, FileLayout::Packed)
}

/// [`build_chain`] with every file in `layout`.
fn build_chain_in(
    dir: &std::path::Path,
    layout: FileLayout,
) -> (Vec<std::path::PathBuf>, GuestMemoryMmap) {
    let mem = anon_memory(&LAYOUT);
    for p in 0..8 {
        write_page(&mem, 0, p, &page_bytes(1, p));
    }
    write_page(&mem, 0, 8, &zeros());
    write_page(&mem, 1, 3, &page_bytes(2, 3));
    let paths: Vec<_> = ["base", "d1", "d2"].iter().map(|n| dir.join(n)).collect();
    let w = WriteOptions::default();
    SnapshotWriter::new(w)
        .file_layout(layout)
        .write_file(&mem, &paths[0])
        .expect("base");
    let base = SnapshotFile::open(&paths[0]).expect("open base");
    assert_eq!(type_of(&base, 0, 20), PageType::NotPopulated);

    let mut dirty = Dirty::new();
    dirty.write(&mem, 0, 20, &zeros()); // hole in the base, written zeros now
    dirty.write(&mem, 0, 2, &zeros()); // data in the base, zeroed now
    dirty.write(&mem, 0, 3, &page_bytes(3, 3)); // data changed
    dirty.write(&mem, 1, 10, &page_bytes(3, 10)); // new data
    let bitmaps = dirty.bitmaps();
    SnapshotWriter::new(w)
        .file_layout(layout)
        .diff_against(&base, &bitmaps)
        .write_file(&mem, &paths[1])
        .expect("diff 1");
    let d1 = SnapshotFile::open(&paths[1]).expect("open d1");
    assert_eq!(type_of(&d1, 0, 20), PageType::Zero);
    assert_eq!(type_of(&d1, 0, 5), PageType::SameAsParent);

    let mut dirty = Dirty::new();
    dirty.write(&mem, 0, 3, &page_bytes(4, 3));
    dirty.write(&mem, 0, 21, &page_bytes(4, 21));
    dirty.write(&mem, 1, 3, &zeros());
    let bitmaps = dirty.bitmaps();
    SnapshotWriter::new(w)
        .file_layout(layout)
        .diff_against(&d1, &bitmaps)
        .write_file(&mem, &paths[2])
        .expect("diff 2");
    (paths, mem)
}

/// Fresh memory restored from `chain` must equal `mem` and hold only data pages.
fn check_chain_restore(chain: &SnapshotChain, mem: &GuestMemoryMmap) {
    let target = fresh_memory(&chain.layout()).expect("fresh");
    chain
        .restore_eager(&target, EagerOptions::default())
        .expect("restore chain");
    let data: u64 = chain
        .resolve()
        .iter()
        .flatten()
        .filter(|s| s.page_type == PageType::Data)
        .map(|s| s.pages)
        .sum();
    let resident: u64 = resident_pages(&target)
        .iter()
        .flatten()
        .filter(|&&r| r)
        .count() as u64;
    assert_eq!(resident, data, "only data pages may be populated");
    assert!(
        read_memory(&target) == read_memory(mem),
        "chain restore differs"
    );
}

#[test]
fn chain_restores_and_merges_keep_holes_and_zeros_apart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (paths, mem) = build_chain(dir.path());
    let chain = SnapshotChain::open(&paths).expect("chain");
    check_chain_restore(&chain, &mem);

    let merged_path = dir.path().join("merged");
    let report = chain
        .merge(&merged_path, WriteOptions::default())
        .expect("merge");
    let merged = SnapshotFile::open(&merged_path).expect("open merged");
    assert!(!merged.is_diff());
    assert_eq!(report.pages(PageType::SameAsParent), 0);
    assert_eq!(
        type_of(&merged, 0, 20),
        PageType::Zero,
        "written zeros over a hole"
    );
    assert_eq!(
        type_of(&merged, 0, 22),
        PageType::NotPopulated,
        "hole stays a hole"
    );
    assert_eq!(type_of(&merged, 0, 2), PageType::Zero);
    assert_eq!(type_of(&merged, 0, 8), PageType::Zero);
    assert_eq!(type_of(&merged, 0, 3), PageType::Data);
    assert_eq!(type_of(&merged, 1, 3), PageType::Zero);
    assert_eq!(
        merged.data_bytes(),
        9 * PAGE_SIZE,
        "pages 0,1,3..7 and 21 of region 0, 10 of 1"
    );
    let target = fresh_memory(&merged.layout()).expect("fresh");
    restore_eager(&merged, &target, EagerOptions::default()).expect("restore merged");
    assert!(read_memory(&target) == read_memory(&mem));

    // Merging only the diffs gives one diff against the base.
    let diffs_path = dir.path().join("diffs");
    SnapshotChain::open(&paths[1..])
        .expect("diff chain")
        .merge(&diffs_path, WriteOptions::default())
        .expect("merge diffs");
    let chain = SnapshotChain::open(&[paths[0].clone(), diffs_path]).expect("base + merged diffs");
    assert_eq!(type_of(&chain.layers()[1], 0, 20), PageType::Zero);
    check_chain_restore(&chain, &mem);
}

#[test]
fn broken_chains_are_rejected() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (paths, _) = build_chain(dir.path());
    let skip = [paths[0].clone(), paths[2].clone()];
    assert!(matches!(
        SnapshotChain::open(&skip),
        Err(Error::BrokenChain(_))
    ));
    let reordered = [paths[0].clone(), paths[2].clone(), paths[1].clone()];
    assert!(matches!(
        SnapshotChain::open(&reordered),
        Err(Error::BrokenChain(_))
    ));
    let base_twice = [paths[0].clone(), paths[0].clone()];
    assert!(matches!(
        SnapshotChain::open(&base_twice),
        Err(Error::BrokenChain(_))
    ));

    // A diff alone cannot fill fresh memory.
    let d1 = SnapshotFile::open(&paths[1]).expect("d1");
    let target = fresh_memory(&d1.layout()).expect("fresh");
    assert!(matches!(
        restore_eager(&d1, &target, EagerOptions::default()),
        Err(Error::NeedsParent)
    ));
    assert!(read_memory(&target).iter().flatten().all(|&b| b == 0));

    // A diff of memory with another layout than the parent is refused at write time.
    let base = SnapshotFile::open(&paths[0]).expect("base");
    let other = anon_memory(&[(0, 32 * PAGE_SIZE)]);
    let none = RegionBitmaps::new(vec![]);
    assert!(matches!(
        SnapshotWriter::new(WriteOptions::default())
            .diff_against(&base, &none)
            .write_file(&other, &dir.path().join("bad")),
        Err(Error::RegionMismatch(_))
    ));
}

#[test]
fn vm_memory_dirty_bitmap_drives_a_diff_stream_applied_onto_the_parent() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ranges: Vec<_> = LAYOUT
        .iter()
        .map(|&(a, s)| (GuestAddress(a), s as usize))
        .collect();
    let mem: GuestMemoryMmap<AtomicBitmap> =
        GuestMemoryMmap::from_ranges(&ranges).expect("memory with dirty bitmap");
    for p in 0..4 {
        write_page(&mem, 0, p, &page_bytes(7, p));
    }
    let base_path = dir.path().join("base");
    SnapshotWriter::new(WriteOptions::default())
        .write_file(&mem, &base_path)
        .expect("base");
    for r in mem.iter() {
        (**r).bitmap().reset();
    }
    write_page(&mem, 0, 1, &zeros());
    write_page(&mem, 1, 15, &page_bytes(8, 15));
    let base = SnapshotFile::open(&base_path).expect("open base");
    let dirty = MemoryDirtyBitmap::new(&mem);
    let mut stream = Vec::new();
    let report = SnapshotWriter::new(WriteOptions::default())
        .diff_against(&base, &dirty)
        .write_stream(&mem, &mut stream)
        .expect("diff stream");
    assert_eq!(report.pages(PageType::SameAsParent), 48 - 2);
    assert_eq!(report.pages(PageType::Data), 1);
    assert_eq!(report.pages(PageType::Zero), 1);

    let target = fresh_memory(&base.layout()).expect("fresh");
    restore_eager(&base, &target, EagerOptions::default()).expect("restore base");
    let fresh_target = EagerOptions::default();
    assert!(matches!(
        restore_stream(&stream[..], &target, fresh_target),
        Err(Error::NeedsParent)
    ));
    let onto_parent = EagerOptions {
        target_is_fresh: false,
        ..Default::default()
    };
    restore_stream(&stream[..], &target, onto_parent).expect("apply diff stream");
    let want: Vec<Vec<u8>> = mem
        .iter()
        .map(|r| {
            let mut b = vec![0u8; r.len() as usize];
            mem.read_slice(&mut b, r.start_addr()).expect("read");
            b
        })
        .collect();
    assert!(read_memory(&target) == want);
}

#[test]
fn guest_offset_chains_restore_and_merge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (paths, mem) = build_chain_in(dir.path(), FileLayout::GuestOffset);
    for path in &paths {
        let file = SnapshotFile::open(path).expect("open layer");
        assert_eq!(file.file_layout(), FileLayout::GuestOffset);
    }
    let chain = SnapshotChain::open(&paths).expect("chain");
    check_chain_restore(&chain, &mem);
    // Merging writes the packed layout; the merged snapshot restores the same memory.
    let merged_path = dir.path().join("merged");
    chain
        .merge(&merged_path, WriteOptions::default())
        .expect("merge");
    let merged = SnapshotFile::open(&merged_path).expect("open merged");
    assert_eq!(merged.file_layout(), FileLayout::Packed);
    let target = fresh_memory(&merged.layout()).expect("fresh");
    restore_eager(&merged, &target, EagerOptions::default()).expect("restore merged");
    assert!(read_memory(&target) == read_memory(&mem));
}
