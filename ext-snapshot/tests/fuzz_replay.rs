//! The fuzz targets of `fuzz/` as a plain test, so every `cargo test` exercises the file and
//! stream parsers on untrusted bytes: the committed seed corpus (`fuzz/seeds/`) is replayed,
//! then a few thousand proptest mutations of it (byte flips, truncations, insertions, splices).
//! `cargo +nightly fuzz run file_parser fuzz/seeds/file` explores further.
//!
//! `cargo test -p ext-snapshot --test fuzz_replay -- --ignored write_seed_corpus` regenerates
//! the seeds.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};

use ext_snapshot::{
    file_to_stream, restore_to_raw_file, RawLayout, RegionBitmaps, SnapshotFile, SnapshotWriter,
    StreamReader, WriteOptions, PAGE_SIZE,
};
use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

fn memfd(name: &std::ffi::CStr) -> std::fs::File {
    // SAFETY: memfd_create reads a NUL-terminated name and returns a new descriptor.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create failed");
    // SAFETY: `fd` is a fresh descriptor owned by nothing else.
    unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) }
}

/// Same body as `fuzz/fuzz_targets/file_parser.rs`.
fn file_target(data: &[u8]) {
    let mut file = memfd(c"fuzz");
    file.write_all(data).unwrap();
    let Ok(snapshot) = SnapshotFile::from_file(file, Path::new("fuzz")) else {
        return;
    };
    if snapshot.verify_data().is_err() || snapshot.is_diff() {
        return;
    }
    let guest_bytes: u64 = snapshot.regions().iter().map(|r| r.size).sum();
    if guest_bytes > 64 << 20 {
        return;
    }
    restore_to_raw_file(&snapshot, &memfd(c"fuzz-out"), RawLayout::Packed)
        .expect("a verified snapshot restores");
}

/// Same body as `fuzz/fuzz_targets/stream_parser.rs`.
fn stream_target(data: &[u8]) {
    let Ok(mut reader) = StreamReader::new(data) else {
        return;
    };
    let _ = reader.layout().len();
    while let Ok(Some(record)) = reader.next_record() {
        assert!(record.pages > 0);
        assert!(record.data.is_empty() || record.data.len() as u64 == record.pages * PAGE_SIZE);
    }
}

fn seeds_dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(kind)
}

fn seeds(kind: &str) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(seeds_dir(kind))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    paths.sort();
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

/// Small snapshots covering every page type, one and two regions, and a diff.
fn make_seeds(dir: &Path) -> Vec<(String, PathBuf)> {
    let memory = GuestMemoryMmap::<()>::from_ranges(&[
        (GuestAddress(0), 12 * PAGE_SIZE as usize),
        (GuestAddress(1 << 20), 4 * PAGE_SIZE as usize),
    ])
    .unwrap();
    for page in [0u64, 1, 2, 5, 9, 16 + 1] {
        let gpa = if page >= 16 {
            (1 << 20) + (page - 16) * PAGE_SIZE
        } else {
            page * PAGE_SIZE
        };
        memory
            .write_slice(&[page as u8 + 1; 4096], GuestAddress(gpa))
            .unwrap();
    }
    memory
        .write_slice(&[0u8; 4096], GuestAddress(3 * PAGE_SIZE))
        .unwrap();
    let invalid_words = [[1u64 << 9], [0u64]];
    let invalid = RegionBitmaps::new(invalid_words.iter().map(|w| w.as_slice()).collect());
    let base = dir.join("two_regions.snap");
    SnapshotWriter::new(WriteOptions::default())
        .invalid_pages(&invalid)
        .write_file(&memory, &base)
        .unwrap();

    let small =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 * PAGE_SIZE as usize)]).unwrap();
    small
        .write_slice(&[7u8; 4096], GuestAddress(PAGE_SIZE))
        .unwrap();
    let one = dir.join("one_region.snap");
    SnapshotWriter::new(WriteOptions::default())
        .write_file(&small, &one)
        .unwrap();

    memory
        .write_slice(&[0xeeu8; 4096], GuestAddress(4 * PAGE_SIZE))
        .unwrap();
    let dirty_words = [[1u64 << 4], [0u64]];
    let dirty = RegionBitmaps::new(dirty_words.iter().map(|w| w.as_slice()).collect());
    let parent = SnapshotFile::open(&base).unwrap();
    let diff = dir.join("diff.snap");
    SnapshotWriter::new(WriteOptions::default())
        .diff_against(&parent, &dirty)
        .write_file(&memory, &diff)
        .unwrap();
    vec![
        ("two_regions".into(), base),
        ("one_region".into(), one),
        ("diff".into(), diff),
    ]
}

#[test]
#[ignore = "regenerates fuzz/seeds; run explicitly"]
fn write_seed_corpus() {
    let dir = tempfile::tempdir().unwrap();
    for (name, path) in make_seeds(dir.path()) {
        std::fs::copy(&path, seeds_dir("file").join(format!("{name}.snap"))).unwrap();
        let mut stream = Vec::new();
        file_to_stream(&SnapshotFile::open(&path).unwrap(), &mut stream).unwrap();
        std::fs::write(seeds_dir("stream").join(format!("{name}.stream")), stream).unwrap();
    }
}

#[test]
fn seed_corpus_is_valid_and_replays_cleanly() {
    let files = seeds("file");
    let streams = seeds("stream");
    assert!(
        files.len() >= 3 && streams.len() >= 3,
        "seed corpus missing"
    );
    for seed in &files {
        let mut file = memfd(c"seed");
        file.write_all(seed).unwrap();
        SnapshotFile::from_file(file, Path::new("seed"))
            .unwrap()
            .verify_data()
            .unwrap();
        file_target(seed);
    }
    for seed in &streams {
        let mut reader = StreamReader::new(seed.as_slice()).unwrap();
        while reader.next_record().unwrap().is_some() {}
        stream_target(seed);
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip { at: usize, mask: u8 },
    Truncate { at: usize },
    Insert { at: usize, bytes: Vec<u8> },
    Overwrite { at: usize, bytes: Vec<u8> },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(at, mask)| Mutation::Flip { at, mask }),
        any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(at, bytes)| Mutation::Insert { at, bytes }),
        (
            any::<usize>(),
            proptest::collection::vec(any::<u8>(), 1..16)
        )
            .prop_map(|(at, bytes)| Mutation::Overwrite { at, bytes }),
    ]
}

fn mutate(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut data = seed.to_vec();
    for m in mutations {
        let len = data.len().max(1);
        match m {
            Mutation::Flip { at, mask } => {
                if !data.is_empty() {
                    data[at % len] ^= mask;
                }
            }
            Mutation::Truncate { at } => data.truncate(at % len),
            Mutation::Insert { at, bytes } => {
                let at = (at % len).min(data.len());
                data.splice(at..at, bytes.iter().copied());
            }
            Mutation::Overwrite { at, bytes } => {
                for (i, b) in bytes.iter().enumerate() {
                    if let Some(slot) = data.get_mut((at % len) + i) {
                        *slot = *b;
                    }
                }
            }
        }
    }
    data
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn mutated_files_never_panic(seed in 0usize..16, mutations in proptest::collection::vec(mutation(), 1..4)) {
        let files = seeds("file");
        file_target(&mutate(&files[seed % files.len()], &mutations));
    }

    #[test]
    fn mutated_streams_never_panic(seed in 0usize..16, mutations in proptest::collection::vec(mutation(), 1..4)) {
        let streams = seeds("stream");
        stream_target(&mutate(&streams[seed % streams.len()], &mutations));
    }
}
