//! The memory fixture shared by the mapped and lazy restore tests: deterministic or
//! proptest-generated regions mixing data, never-populated, zero and invalid (balloon) pages,
//! a snapshot of it, and checks for bit-identical content and page residency.
// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::os::unix::fs::FileExt;

use ext_snapshot::restore::mapped::MIN_MAPPED_PAGES;
use ext_snapshot::{RegionBitmaps, SnapshotWriter, WriteOptions, PAGE_SIZE};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const REGIONS: [(u64, u64); 2] = [(0, 384 * PAGE_SIZE), (64 << 20, 160 * PAGE_SIZE)];

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Kind {
    Data,
    Hole,
    Zero,
    Invalid,
}

pub struct Fixture {
    pub layout: Vec<(u64, u64)>,
    pub memory: GuestMemoryMmap,
    pub kinds: Vec<Vec<Kind>>,
    pub invalid: Vec<Vec<u64>>,
    pub expected: Vec<Vec<u8>>,
}

pub fn xorshift(seed: u64) -> impl FnMut() -> u64 {
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
pub fn fixture(seed: u64) -> Fixture {
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
pub fn build(layout: &[(u64, u64)], kinds: Vec<Vec<Kind>>, seed: u64) -> Fixture {
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
pub fn layout_and_kinds() -> impl Strategy<Value = (Vec<(u64, u64)>, Vec<Vec<Kind>>)> {
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

pub fn snapshot(fixture: &Fixture, path: &std::path::Path) {
    let invalid = RegionBitmaps::new(fixture.invalid.iter().map(|b| b.as_slice()).collect());
    SnapshotWriter::new(WriteOptions::default())
        .invalid_pages(&invalid)
        .write_file(&fixture.memory, path)
        .unwrap();
}

pub fn assert_identical(memory: &GuestMemoryMmap, fixture: &Fixture) {
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

pub fn present(address: u64) -> bool {
    let pagemap = std::fs::File::open("/proc/self/pagemap").unwrap();
    let mut entry = [0u8; 8];
    pagemap
        .read_exact_at(&mut entry, address / PAGE_SIZE * 8)
        .unwrap();
    u64::from_le_bytes(entry) & (1 << 63) != 0
}
