//! Criterion benchmarks at small sizes: the zero check, the writer and the reader/restorers.
//! `ext-snapshot bench` measures the full-size scenarios against the baselines.

#![allow(clippy::unwrap_used, clippy::expect_used)]

// The baselines and workloads of `ext-snapshot bench`, compiled in from the binary's source:
// they are not library API, and the benches must measure exactly the same code. Each bench
// uses only part of them.
#[allow(dead_code)]
#[path = "../src/bin/ext-snapshot/bench/baseline.rs"]
mod baseline;
#[allow(dead_code)]
#[path = "../src/bin/ext-snapshot/bench/error.rs"]
mod error;
#[allow(dead_code)]
#[path = "../src/bin/ext-snapshot/bench/workload.rs"]
mod workload;

use baseline::{copy_data_into_fresh_memory, dense_dump, holes_only_copy};
use criterion::{criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use ext_snapshot::restore::lazy::restore_lazy;
use ext_snapshot::restore::mapped::{restore_mapped, MappedOptions};
use ext_snapshot::{
    fresh_memory, is_zero_page, restore_eager, EagerOptions, FileLayout, SnapshotFile,
    SnapshotWriter, WriteOptions,
};
use vm_memory::GuestMemoryMmap;
use workload::{fill, memfd_memory, Scenario};

const SIZE: u64 = 64 << 20;

fn zero_check(c: &mut Criterion) {
    let mut buffer = vec![1u8; 16 << 20];
    buffer.fill(0);
    let mut group = c.benchmark_group("zero_check");
    group.throughput(Throughput::Bytes(buffer.len() as u64));
    group.bench_function("16MiB_zero_pages", |b| {
        b.iter(|| {
            buffer
                .chunks_exact(4096)
                .filter(|p| is_zero_page(std::hint::black_box(p)))
                .count()
        })
    });
    group.finish();
}

fn scenarios() -> [(&'static str, Scenario); 3] {
    [
        ("sparse_5pct", Scenario::SparseData { percent: 5 }),
        ("zero_50pct", Scenario::PopulatedZeros { zero_percent: 50 }),
        ("random", Scenario::Random),
    ]
}

fn writers(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut group = c.benchmark_group("write_64MiB");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(SIZE));
    for (name, scenario) in scenarios() {
        let memory = memfd_memory(SIZE).expect("memfd memory");
        fill(&memory, SIZE, scenario, 1).expect("fill");
        let out = dir.path().join("out");
        // Every iteration writes a new file: replacing (rename over, or truncate) an existing
        // one makes ext4 start write-back of it (auto_da_alloc), which would be measured too.
        let fresh = || {
            let _ = std::fs::remove_file(&out);
        };
        let mut write = |id: &str, writer: &dyn Fn(&GuestMemoryMmap)| {
            group.bench_with_input(BenchmarkId::new(id, name), &memory, |b, m| {
                b.iter_batched(fresh, |()| writer(m), BatchSize::PerIteration)
            });
        };
        write("ours", &|m| {
            SnapshotWriter::new(WriteOptions::default())
                .write_file(m, &out)
                .map(drop)
                .expect("write")
        });
        write("ours_guest_offset", &|m| {
            SnapshotWriter::new(WriteOptions::default())
                .file_layout(FileLayout::GuestOffset)
                .write_file(m, &out)
                .map(drop)
                .expect("write")
        });
        write("holes_only", &|m| {
            holes_only_copy(m, &out, false)
                .map(drop)
                .expect("holes-only copy")
        });
        write("dense", &|m| {
            dense_dump(m, &out, false).map(drop).expect("dense dump")
        });
    }
    group.finish();
}

fn readers(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut group = c.benchmark_group("read_64MiB");
    group.sample_size(10);
    for (name, scenario) in scenarios() {
        let memory = memfd_memory(SIZE).expect("memfd memory");
        fill(&memory, SIZE, scenario, 2).expect("fill");
        let path = dir.path().join(format!("{name}.snap"));
        SnapshotWriter::new(WriteOptions::default())
            .write_file(&memory, &path)
            .expect("write");
        let guest_offset = dir.path().join(format!("{name}.guest-offset.snap"));
        SnapshotWriter::new(WriteOptions::default())
            .file_layout(FileLayout::GuestOffset)
            .write_file(&memory, &guest_offset)
            .expect("write");
        drop(memory);
        group.bench_function(BenchmarkId::new("open_and_verify", name), |b| {
            b.iter(|| {
                let snapshot = SnapshotFile::open(&path).expect("open");
                snapshot.verify_data().expect("verify");
            })
        });
        group.bench_function(BenchmarkId::new("eager_restore", name), |b| {
            b.iter(|| {
                let snapshot = SnapshotFile::open(&path).expect("open");
                let target = fresh_memory(&snapshot.layout()).expect("memory");
                restore_eager(&snapshot, &target, EagerOptions::default()).expect("restore")
            })
        });
        // The baseline of the eager restore: the same extents pread into the same kind of
        // fresh memory on as many threads (2, `EagerOptions::default`), with no checks.
        let runs = baseline::data_runs(&path).expect("data runs");
        let layout = SnapshotFile::open(&path).expect("open").layout();
        group.bench_function(BenchmarkId::new("plain_copy", name), |b| {
            b.iter(|| copy_data_into_fresh_memory(&path, &layout, &runs, 2).expect("copy"))
        });
        group.bench_function(BenchmarkId::new("mapped_setup", name), |b| {
            b.iter(|| restore_mapped::<()>(&path, MappedOptions::default()).expect("mapped"))
        });
        group.bench_function(BenchmarkId::new("mapped_setup_guest_offset", name), |b| {
            b.iter(|| {
                restore_mapped::<()>(&guest_offset, MappedOptions::default()).expect("mapped")
            })
        });
        group.bench_function(BenchmarkId::new("lazy_setup", name), |b| {
            b.iter(|| {
                restore_lazy::<()>(&path)
                    .expect("lazy")
                    .finish()
                    .expect("finish")
            })
        });
    }
    group.finish();
}

/// Short warm-up and measurement: the machine is shared, and the full-size comparison is
/// `ext-snapshot bench`'s job.
fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(300))
        .measurement_time(std::time::Duration::from_secs(1))
}

// In a private module: `criterion_group!` generates an undocumented `pub fn`.
mod group {
    use super::{config, readers, writers, zero_check};
    criterion::criterion_group! {
        name = benches;
        config = config();
        targets = zero_check, writers, readers
    }
}
criterion_main!(group::benches);
