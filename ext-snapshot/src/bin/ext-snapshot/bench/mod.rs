//! `ext-snapshot bench`: our writer and restorers against the baselines, side by side.
//!
//! For each scenario of issue 3 item 8 the same memfd-backed memory is written by our writer,
//! by a holes-only sparse copy (Cloud Hypervisor `shared=on`) and by a dense dump (Cloud
//! Hypervisor `shared=off`, Firecracker), and the time to write just the data bytes is
//! measured as the floor; our writer also runs in the guest-offset layout. Each writer runs
//! [`WRITER_RUNS`] times in a rotating order, each output to a fresh name and written back and
//! dropped from the page cache between runs (untimed), so no run pays for another's dirty
//! pages; medians are reported. Then both snapshots are restored eagerly, mapped and lazily.
//! The result is a [`BenchResult`] that [`BenchResult::render`] prints as a table with the
//! targets. All files go to a caller-chosen directory and are deleted when the run ends.

pub mod baseline;
pub mod error;
pub mod workload;

use std::path::{Path, PathBuf};
use std::time::Instant;

use vm_memory::{GuestMemory, GuestMemoryRegion};

use std::os::unix::fs::MetadataExt;

use ext_snapshot::restore::lazy::restore_lazy;
use ext_snapshot::restore::mapped::{restore_mapped, MappedOptions};
use ext_snapshot::{
    fresh_memory, is_zero_page, restore_eager, EagerOptions, FileLayout, PageType, Run,
    SnapshotFile, SnapshotWriter, WriteOptions,
};

use baseline::{dense_dump, holes_only_copy, write_data_runs_alone, BaselineReport};
use error::{BenchError, Result};
use workload::{fill, memfd_memory, Scenario};

const GIB: u64 = 1 << 30;

/// Options of a benchmark run.
#[derive(Clone, Debug)]
pub struct BenchOptions {
    /// Multiplies every memory size (1.0: 4 GiB, 4 GiB and 1 GiB).
    pub scale: f64,
    /// Directory for the files written (deleted afterwards).
    pub dir: PathBuf,
    /// `fsync` every output, ours and the baselines alike.
    pub fsync: bool,
    /// Threads of our writer.
    pub threads: usize,
}

/// One scenario's measurements.
#[derive(Clone, Debug)]
pub struct ScenarioResult {
    /// Name shown in the table.
    pub name: String,
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Our writer: seconds (wall clock around `write_file`) and file length.
    pub ours_seconds: f64,
    /// Of which typing pages (residency, invalid set, zero check).
    pub ours_scan_seconds: f64,
    /// Of which writing the file.
    pub ours_write_seconds: f64,
    /// Length of our snapshot file.
    pub ours_file_len: u64,
    /// Bytes our snapshot stores as data.
    pub ours_data_bytes: u64,
    /// The holes-only sparse copy.
    pub holes_only: BaselineReport,
    /// The dense dump.
    pub dense: BaselineReport,
    /// Writing `ours_data_bytes` from a buffer.
    pub data_alone: BaselineReport,
    /// Eager restore into fresh memory, the snapshot file not in the page cache: open,
    /// validation and copy seconds (median of [`RESTORE_RUNS`]).
    pub eager_seconds: f64,
    /// Of which copying (and verifying) data.
    pub eager_copy_seconds: f64,
    /// The same data copied plainly into the same kind of fresh memory from the uncached
    /// file (median of [`RESTORE_RUNS`]).
    pub plain_copy_seconds: f64,
    /// Eager restore with the file in the page cache (median of [`RESTORE_RUNS`]).
    pub eager_warm_seconds: f64,
    /// Plain copy with the file in the page cache (median of [`RESTORE_RUNS`]).
    pub plain_copy_warm_seconds: f64,
    /// Mapped restore setup, structure checks only (median of 5).
    pub mapped_setup_seconds: f64,
    /// Mapped restore setup with every data checksum verified first.
    pub mapped_verified_seconds: f64,
    /// Lazy restore setup (median of 5).
    pub lazy_setup_seconds: f64,
    /// Our writer in the guest-offset layout: seconds (median, like `ours_seconds`).
    pub guest_offset_seconds: f64,
    /// Bytes the filesystem allocated for the guest-offset file (`st_blocks` × 512).
    pub guest_offset_allocated: u64,
    /// Mapped restore setup of the guest-offset file (median of 5).
    pub guest_offset_mapped_setup_seconds: f64,
    /// Lazy restore setup of the guest-offset file (median of 5).
    pub guest_offset_lazy_setup_seconds: f64,
}

/// The whole run.
#[derive(Clone, Debug)]
pub struct BenchResult {
    /// The options used.
    pub scale: f64,
    /// Whether outputs were fsynced.
    pub fsync: bool,
    /// Threads of our writer and restore (and of the plain copy).
    pub threads: usize,
    /// Zero check throughput on one thread, bytes per second.
    pub zero_check_bytes_per_second: f64,
    /// Per scenario.
    pub scenarios: Vec<ScenarioResult>,
}

fn scaled(bytes: u64, scale: f64) -> u64 {
    let pages = ((bytes as f64 * scale) / 4096.0).round().max(256.0) as u64;
    pages * 4096
}

/// Runs every scenario and the zero-check measurement. `progress` receives a line per step.
pub fn run(options: &BenchOptions, progress: &mut dyn FnMut(&str)) -> Result<BenchResult> {
    std::fs::create_dir_all(&options.dir)
        .map_err(|e| BenchError::io(format!("creating {}", options.dir.display()), e))?;
    progress("zero check");
    let zero_check_bytes_per_second = zero_check_speed(scaled(GIB, options.scale.min(1.0)));
    let scenarios = [
        (
            "4 GiB never-populated + 5% data",
            4 * GIB,
            Scenario::SparseData { percent: 5 },
        ),
        (
            "4 GiB populated, 50% zero pages",
            4 * GIB,
            Scenario::PopulatedZeros { zero_percent: 50 },
        ),
        ("1 GiB fully random", GIB, Scenario::Random),
    ];
    let mut results = Vec::new();
    for (index, (name, size, scenario)) in scenarios.into_iter().enumerate() {
        let size = scaled(size, options.scale);
        progress(&format!("{name} ({} MiB)", size >> 20));
        results.push(run_scenario(
            options,
            name,
            size,
            scenario,
            index as u64 + 1,
        )?);
    }
    Ok(BenchResult {
        scale: options.scale,
        fsync: options.fsync,
        threads: options.threads.max(1),
        zero_check_bytes_per_second,
        scenarios: results,
    })
}

/// Bytes per second of [`is_zero_page`] over `bytes` of populated zero memory, one thread.
pub fn zero_check_speed(bytes: u64) -> f64 {
    let mut buffer = vec![1u8; bytes as usize];
    buffer.fill(0);
    let start = Instant::now();
    let zero_pages = buffer
        .chunks_exact(4096)
        .filter(|page| is_zero_page(std::hint::black_box(page)))
        .count();
    let seconds = start.elapsed().as_secs_f64();
    std::hint::black_box(zero_pages);
    bytes as f64 / seconds
}

/// Removes a file when dropped, so a failed step leaves nothing behind.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn run_scenario(
    options: &BenchOptions,
    name: &str,
    size: u64,
    scenario: Scenario,
    seed: u64,
) -> Result<ScenarioResult> {
    let memory = memfd_memory(size)?;
    fill(&memory, size, scenario, seed)?;
    let dir = &options.dir;
    let ours = Scratch(dir.join("bench-ours.snap"));
    let guest_offset = Scratch(dir.join("bench-guest-offset.snap"));
    let write_options = WriteOptions {
        fsync: options.fsync,
        threads: options.threads.max(1),
    };
    // The data runs our snapshot stores, for the data-alone floor: taken from a first write
    // that is not measured (it also brings every writer to the same warm state of guest
    // memory and of the code).
    SnapshotWriter::new(write_options).write_file(&memory, &ours.0)?;
    let data_runs = baseline::data_runs(&ours.0)?;
    baseline::settle(&ours.0)?;

    // Every writer runs WRITER_RUNS times, in a rotating order so none always follows the
    // same one; before each run the previous output is written back and dropped from the
    // page cache (untimed), so no run pays for another's dirty pages. Medians are reported.
    let mut ours_runs = Vec::new();
    let mut holes_runs = Vec::new();
    let mut dense_runs = Vec::new();
    let mut alone_runs = Vec::new();
    let mut guest_offset_runs = Vec::new();
    for repetition in 0..WRITER_RUNS {
        for step in 0..5 {
            match (step + repetition) % 5 {
                0 => {
                    // A fresh name each time, like the baselines: replacing an existing file by
                    // rename makes ext4 (auto_da_alloc) start write-back of the new file inside
                    // rename(), a cost of overwriting, not of writing a snapshot.
                    remove_if_present(&ours.0)?;
                    let start = Instant::now();
                    let report = SnapshotWriter::new(write_options).write_file(&memory, &ours.0)?;
                    ours_runs.push((start.elapsed().as_secs_f64(), report));
                    baseline::settle(&ours.0)?;
                }
                1 => holes_runs.push(measured(dir, "bench-holes.raw", |p| {
                    holes_only_copy(&memory, p, options.fsync)
                })?),
                2 => dense_runs.push(measured(dir, "bench-dense.raw", |p| {
                    dense_dump(&memory, p, options.fsync)
                })?),
                3 => {
                    remove_if_present(&guest_offset.0)?;
                    let start = Instant::now();
                    SnapshotWriter::new(write_options)
                        .file_layout(FileLayout::GuestOffset)
                        .write_file(&memory, &guest_offset.0)?;
                    guest_offset_runs.push(start.elapsed().as_secs_f64());
                    baseline::settle(&guest_offset.0)?;
                }
                _ => alone_runs.push(measured(dir, "bench-alone.raw", |p| {
                    write_data_runs_alone(&memory, &data_runs, p, options.fsync)
                })?),
            }
        }
    }
    ours_runs.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ours_seconds, report) = ours_runs.swap_remove(ours_runs.len() / 2);
    let ours_data_bytes = report.bytes(PageType::Data);
    let holes_only = median_report(holes_runs);
    let dense = median_report(dense_runs);
    let data_alone = median_report(alone_runs);
    guest_offset_runs.sort_by(f64::total_cmp);
    let guest_offset_seconds = guest_offset_runs[guest_offset_runs.len() / 2];
    let guest_offset_allocated = std::fs::metadata(&guest_offset.0)
        .map_err(|e| BenchError::io("stat of the guest-offset snapshot", e))?
        .blocks()
        * 512;
    drop(memory);

    let restores = restores(&ours.0, &data_runs, options.threads.max(1))?;
    // Setup times are a few milliseconds: take the median of a few runs so one preemption on
    // a busy machine does not decide the verdict.
    let mapped_setup_seconds = median_of(SETUP_RUNS, || mapped(&ours.0, false))?;
    let mapped_verified_seconds = mapped(&ours.0, true)?;
    let lazy_setup_seconds = median_of(SETUP_RUNS, || lazy(&ours.0))?;
    let guest_offset_mapped_setup_seconds =
        median_of(SETUP_RUNS, || mapped(&guest_offset.0, false))?;
    let guest_offset_lazy_setup_seconds = median_of(SETUP_RUNS, || lazy(&guest_offset.0))?;
    Ok(ScenarioResult {
        name: name.to_string(),
        memory_bytes: size,
        ours_seconds,
        ours_scan_seconds: report.scan_seconds,
        ours_write_seconds: report.write_seconds,
        ours_file_len: report.output_bytes,
        ours_data_bytes,
        holes_only,
        dense,
        data_alone,
        eager_seconds: restores.eager_cold.0,
        eager_copy_seconds: restores.eager_cold.1,
        plain_copy_seconds: restores.plain_cold,
        eager_warm_seconds: restores.eager_warm,
        plain_copy_warm_seconds: restores.plain_warm,
        mapped_setup_seconds,
        mapped_verified_seconds,
        lazy_setup_seconds,
        guest_offset_seconds,
        guest_offset_allocated,
        guest_offset_mapped_setup_seconds,
        guest_offset_lazy_setup_seconds,
    })
}

/// Runs of each restore setup measurement; the median is reported.
const SETUP_RUNS: usize = 5;

fn median_of(runs: usize, mut measure: impl FnMut() -> Result<f64>) -> Result<f64> {
    let mut samples = (0..runs).map(|_| measure()).collect::<Result<Vec<f64>>>()?;
    samples.sort_by(f64::total_cmp);
    Ok(samples[samples.len() / 2])
}

fn measured(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&Path) -> Result<BaselineReport>,
) -> Result<BaselineReport> {
    let scratch = Scratch(dir.join(name));
    let report = write(&scratch.0)?;
    baseline::settle(&scratch.0)?;
    Ok(report)
}

fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(BenchError::io(format!("removing {}", path.display()), e))
        }
        _ => Ok(()),
    }
}

/// Repetitions of each writer measurement; the median is reported.
pub const WRITER_RUNS: usize = 3;

fn median_report(mut runs: Vec<BaselineReport>) -> BaselineReport {
    runs.sort_by(|a, b| a.seconds.total_cmp(&b.seconds));
    runs.get(runs.len() / 2).copied().unwrap_or_default()
}

/// Repetitions of each eager-restore and plain-copy measurement; the median is reported.
pub const RESTORE_RUNS: usize = 3;

/// Medians of the eager restore against the plain copy, cold and warm.
struct Restores {
    /// Eager, file dropped from the page cache first: (total, copy) seconds.
    eager_cold: (f64, f64),
    plain_cold: f64,
    eager_warm: f64,
    plain_warm: f64,
}

/// Eager restores of `path` and plain copies of its `data_runs`, alternating which goes first,
/// [`RESTORE_RUNS`] times with the file dropped from the page cache before each (untimed),
/// then as many times with it cached.
fn restores(path: &Path, data_runs: &[(usize, Run)], threads: usize) -> Result<Restores> {
    let layout = SnapshotFile::open(path)?.layout();
    let eager = || -> Result<(f64, f64)> {
        let start = Instant::now();
        let snapshot = SnapshotFile::open(path)?;
        let memory = fresh_memory(&snapshot.layout())?;
        let options = EagerOptions {
            threads,
            ..EagerOptions::default()
        };
        let report = restore_eager(&snapshot, &memory, options)?;
        let seconds = start.elapsed().as_secs_f64();
        drop(memory);
        Ok((seconds, report.restore_seconds))
    };
    let plain = || baseline::copy_data_into_fresh_memory(path, &layout, data_runs, threads);
    let (mut eager_cold, mut plain_cold, mut eager_warm, mut plain_warm) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for cached in [false, true] {
        for repetition in 0..RESTORE_RUNS {
            for step in 0..2 {
                if !cached {
                    baseline::settle(path)?;
                }
                match ((step + repetition) % 2, cached) {
                    (0, false) => eager_cold.push(eager()?),
                    (0, true) => eager_warm.push(eager()?.0),
                    (_, false) => plain_cold.push(plain()?),
                    (_, true) => plain_warm.push(plain()?),
                }
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    eager_cold.sort_by(|a, b| a.0.total_cmp(&b.0));
    Ok(Restores {
        eager_cold: eager_cold[eager_cold.len() / 2],
        plain_cold: median(plain_cold),
        eager_warm: median(eager_warm),
        plain_warm: median(plain_warm),
    })
}

fn mapped(path: &Path, verify_data: bool) -> Result<f64> {
    let start = Instant::now();
    let (memory, _) = restore_mapped::<()>(path, MappedOptions { verify_data })?;
    let seconds = start.elapsed().as_secs_f64();
    drop(memory);
    Ok(seconds)
}

fn lazy(path: &Path) -> Result<f64> {
    let start = Instant::now();
    let restore = restore_lazy::<()>(path)?;
    let seconds = start.elapsed().as_secs_f64();
    // Touch one page so the handler is exercised, then shut it down.
    let first = restore
        .memory()
        .iter()
        .next()
        .map(|region| region.start_addr())
        .ok_or_else(|| BenchError::Memory("no regions".into()))?;
    let mut byte = [0u8; 1];
    vm_memory::Bytes::read_slice(restore.memory(), &mut byte, first)
        .map_err(|e| BenchError::Memory(e.to_string()))?;
    restore.finish()?;
    Ok(seconds)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

fn ms(seconds: f64) -> f64 {
    seconds * 1000.0
}

fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "NOT MET"
    }
}

impl BenchResult {
    /// The table, the ratios against the baselines and the targets.
    pub fn render(&self) -> String {
        use std::fmt::Write;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "ext-snapshot bench (scale {}, fsync {}; memfd-backed memory, the same for every writer; \
             writer times are medians of {WRITER_RUNS} runs in rotating order, each output \
             written back and dropped from the page cache between runs)",
            self.scale, self.fsync
        );
        let _ = writeln!(
            out,
            "\n{:<34} {:>9} {:>9} | {:>10} {:>10} | {:>10} {:>10} | {:>10} {:>10} | {:>10}",
            "scenario",
            "memory",
            "data",
            "ours ms",
            "ours MiB",
            "holes ms",
            "holes MiB",
            "dense ms",
            "dense MiB",
            "data-only ms"
        );
        for s in &self.scenarios {
            let _ = writeln!(
                out,
                "{:<34} {:>8.0}M {:>8.0}M | {:>10.1} {:>10.1} | {:>10.1} {:>10.1} | {:>10.1} {:>10.1} | {:>10.1}",
                s.name,
                mib(s.memory_bytes),
                mib(s.ours_data_bytes),
                ms(s.ours_seconds),
                mib(s.ours_file_len),
                ms(s.holes_only.seconds),
                mib(s.holes_only.allocated),
                ms(s.dense.seconds),
                mib(s.dense.allocated),
                ms(s.data_alone.seconds),
            );
        }
        let _ = writeln!(
            out,
            "\n(file sizes: ours = file length; baselines = allocated blocks; data-only = the bytes \
             our snapshot stores, from the same memory, in our writer's pwritev batches)\n\n{:<34} {:>10} {:>10}",
            "our writer", "typing ms", "writing ms"
        );
        for s in &self.scenarios {
            let _ = writeln!(
                out,
                "{:<34} {:>10.1} {:>10.1}",
                s.name,
                ms(s.ours_scan_seconds),
                ms(s.ours_write_seconds)
            );
        }
        let _ = writeln!(
            out,
            "\n{:<34} {:>12} {:>12} {:>12} {:>12} {:>14}",
            "ratios", "size/holes", "size/dense", "time/holes", "time/dense", "time/data-only"
        );
        for s in &self.scenarios {
            let _ = writeln!(
                out,
                "{:<34} {:>12.3} {:>12.3} {:>12.2} {:>12.2} {:>14.2}",
                s.name,
                s.ours_file_len as f64 / s.holes_only.allocated.max(1) as f64,
                s.ours_file_len as f64 / s.dense.allocated.max(1) as f64,
                s.ours_seconds / s.holes_only.seconds,
                s.ours_seconds / s.dense.seconds,
                s.ours_seconds / s.data_alone.seconds,
            );
        }
        let _ = writeln!(
            out,
            "\n{:<34} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12} {:>12} {:>10}",
            "restore",
            "eager ms",
            "copy ms",
            "plain ms",
            "warm ms",
            "plain warm",
            "GB/s data",
            "mapped ms",
            "mapped+crc",
            "lazy ms"
        );
        for s in &self.scenarios {
            let _ = writeln!(
                out,
                "{:<34} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.2} {:>12.2} {:>12.1} {:>10.2}",
                s.name,
                ms(s.eager_seconds),
                ms(s.eager_copy_seconds),
                ms(s.plain_copy_seconds),
                ms(s.eager_warm_seconds),
                ms(s.plain_copy_warm_seconds),
                s.ours_data_bytes as f64 / s.eager_seconds / 1e9,
                ms(s.mapped_setup_seconds),
                ms(s.mapped_verified_seconds),
                ms(s.lazy_setup_seconds),
            );
        }
        let _ = writeln!(
            out,
            "\n{:<34} {:>10} {:>12} {:>14} {:>12} {:>10}",
            "guest-offset layout",
            "create ms",
            "alloc MiB",
            "time/data-only",
            "mapped ms",
            "lazy ms"
        );
        for s in &self.scenarios {
            let _ = writeln!(
                out,
                "{:<34} {:>10.1} {:>12.1} {:>14.2} {:>12.2} {:>10.2}",
                s.name,
                ms(s.guest_offset_seconds),
                mib(s.guest_offset_allocated),
                s.guest_offset_seconds / s.data_alone.seconds,
                ms(s.guest_offset_mapped_setup_seconds),
                ms(s.guest_offset_lazy_setup_seconds),
            );
        }
        let _ = writeln!(
            out,
            "(eager: open, fresh memory, verify and copy, snapshot file dropped from the page \
             cache first, median of {RESTORE_RUNS}; plain: the same data extents pread into the \
             same kind of fresh memory on as many threads, no checks; warm: both with the file \
             cached; mapped, lazy: setup time, median of {SETUP_RUNS} runs; mapped+crc: one run \
             that verifies every extent first)\n\nzero check: {:.1} GB/s on one thread",
            self.zero_check_bytes_per_second / 1e9
        );
        out.push_str(&self.render_targets());
        out
    }

    /// Whether each target of issue 12 (ext-snapshot at the physical limit) is met, one line
    /// each: create time against the holes-only copy and the data alone, eager restore against
    /// a plain copy (cold and warm page cache), mapped setup of the default layout.
    pub fn render_limit_targets(&self) -> String {
        use std::fmt::Write;
        let mut out = format!("\ntargets (issue 12, {} thread(s)):\n", self.threads);
        for s in &self.scenarios {
            let holes = s.ours_seconds / s.holes_only.seconds;
            let alone = s.ours_seconds / s.data_alone.seconds;
            let _ = writeln!(
                out,
                "  create <= 1.0 x holes-only copy and <= 1.1 x data alone [{}]: {holes:.2}x, \
                 {alone:.2}x: {}",
                s.name,
                verdict(holes <= 1.0 && alone <= 1.1)
            );
        }
        for s in &self.scenarios {
            let cold = s.eager_seconds / s.plain_copy_seconds;
            let warm = s.eager_warm_seconds / s.plain_copy_warm_seconds;
            let _ = writeln!(
                out,
                "  eager restore <= 1.2 x plain copy [{}]: uncached {cold:.2}x, cached {warm:.2}x: {}",
                s.name,
                verdict(cold <= 1.2 && warm <= 1.2)
            );
        }
        for s in &self.scenarios {
            let _ = writeln!(
                out,
                "  mapped setup < 5 ms, default layout [{}, {:.0} MiB]: {:.2} ms: {}",
                s.name,
                mib(s.memory_bytes),
                ms(s.mapped_setup_seconds),
                verdict(s.mapped_setup_seconds < 0.005)
            );
        }
        out
    }

    /// Whether each target of issue 3 item 8 is met, one line each.
    pub fn render_targets(&self) -> String {
        use std::fmt::Write;
        let mut out = String::from("\ntargets (issue 3, item 8):\n");
        for s in &self.scenarios {
            let limit = s.ours_data_bytes as f64 * 1.01
                + 65536.0 * (s.memory_bytes as f64 / GIB as f64).max(1.0);
            let _ = writeln!(
                out,
                "  size <= data x 1.01 + 64 KiB/GiB [{}]: {:.1} MiB <= {:.1} MiB: {}",
                s.name,
                mib(s.ours_file_len),
                limit / (1u64 << 20) as f64,
                verdict(s.ours_file_len as f64 <= limit)
            );
        }
        for s in &self.scenarios {
            let ratio = s.ours_seconds / s.data_alone.seconds;
            let _ = writeln!(
                out,
                "  create <= 1.2 x writing data alone [{}]: {ratio:.2}x: {}",
                s.name,
                verdict(ratio <= 1.2)
            );
        }
        let gbps = self.zero_check_bytes_per_second / 1e9;
        let _ = writeln!(
            out,
            "  zero check >= 10 GB/s per core: {gbps:.1} GB/s: {}",
            verdict(gbps >= 10.0)
        );
        let rates: Vec<f64> = self
            .scenarios
            .iter()
            .map(|s| s.ours_data_bytes as f64 / s.eager_seconds)
            .collect();
        let (low, high) = rates
            .iter()
            .fold((f64::MAX, 0.0f64), |(l, h), &r| (l.min(r), h.max(r)));
        let _ = writeln!(
            out,
            "  eager restore proportional to data bytes (data GB/s within 2x across scenarios): \
             {:.2}..{:.2} GB/s: {}",
            low / 1e9,
            high / 1e9,
            verdict(high <= 2.0 * low)
        );
        for s in &self.scenarios {
            let worst = s.mapped_setup_seconds.max(s.lazy_setup_seconds);
            let _ = writeln!(
                out,
                "  mapped and lazy setup < 5 ms [{}, {:.0} MiB]: mapped {:.2} ms, lazy {:.2} ms: {}",
                s.name,
                mib(s.memory_bytes),
                ms(s.mapped_setup_seconds),
                ms(s.lazy_setup_seconds),
                verdict(worst < 0.005)
            );
        }
        for s in &self.scenarios {
            let limit = s.ours_data_bytes as f64 * 1.01
                + 65536.0 * (s.memory_bytes as f64 / GIB as f64).max(1.0);
            let ratio = s.guest_offset_seconds / s.data_alone.seconds;
            let worst = s
                .guest_offset_mapped_setup_seconds
                .max(s.guest_offset_lazy_setup_seconds);
            let _ = writeln!(
                out,
                "  guest-offset layout [{}]: allocated {:.1} MiB <= {:.1} MiB: {}; create {ratio:.2}x: {}; \
                 mapped {:.2} ms, lazy {:.2} ms < 5 ms: {}",
                s.name,
                mib(s.guest_offset_allocated),
                limit / (1u64 << 20) as f64,
                verdict(s.guest_offset_allocated as f64 <= limit),
                verdict(ratio <= 1.2),
                ms(s.guest_offset_mapped_setup_seconds),
                ms(s.guest_offset_lazy_setup_seconds),
                verdict(worst < 0.005)
            );
        }
        out.push_str(&self.render_limit_targets());
        if self.scale != 1.0 {
            out.push_str(
                "  (scaled run: sizes are not the issue's; rerun with --scale 1 for the record)\n",
            );
        }
        out
    }
}
