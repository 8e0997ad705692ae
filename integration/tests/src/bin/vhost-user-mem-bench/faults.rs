//! Page-server fault latency against ext-snapshot's in-process lazy restore, from one snapshot
//! file.
//!
//! (a) `vhost-user-mem serve --snapshot <file> --socket <path>` runs as its own process; the
//! bench maps fresh memory, registers it with a userfaultfd and hands it over
//! (`vhost_user_mem::page_server::client::connect_memory`), as a restoring VMM does. (b)
//! `ext_snapshot::restore::lazy::restore_lazy` serves the same file from a handler thread in
//! this process, as ext-vmm's `memory_restore_mode=ondemand` does. Both run the same fault loop
//! (`FaultHandler`); the difference measured is the process boundary.
//!
//! A touching thread (never the one serving) reads one word of every data page, once in a
//! shuffled order and once in ascending order, each on fresh memory. Before each read it asks
//! `/proc/self/pagemap` (untimed) whether the page is present already (brought in with a
//! neighbour of its run): only reads of pages not yet present are timed, so every sample is one
//! fault, from the read to the resolved page. The two restores alternate which goes first from
//! round to round.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;

use ext_snapshot::restore::lazy::restore_lazy;
use ext_snapshot::{fresh_memory, PageType, SnapshotFile, PAGE_SIZE};
use vhost_user_mem::page_server::client::connect_memory;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap};

use crate::driver::{BenchError, PageServerProcess, Result};
use crate::median;
use crate::mix::SplitMix;

/// Latency of one kind of pass, pooled over the rounds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    /// Median fault, µs.
    pub median_us: f64,
    /// 99th percentile, µs.
    pub p99_us: f64,
    /// Faults per pass (the data pages not brought in with a neighbour).
    pub faults_per_pass: u64,
}

/// The figure: page server and in-process lazy restore, shuffled and ascending passes.
pub struct FaultFigures {
    /// Data pages touched in every pass.
    pub data_pages: u64,
    /// Shuffled order: `[page server, in process]`.
    pub shuffled: [Latency; 2],
    /// Ascending order: `[page server, in process]`.
    pub sequential: [Latency; 2],
    /// Median over the rounds of (page server / in process) shuffled medians, for the rounds
    /// in which the page server went first and those in which it went second (`None` when
    /// there was no such round).
    pub by_order: [Option<f64>; 2],
}

impl FaultFigures {
    /// Page server / in process, shuffled medians.
    pub fn ratio(&self) -> f64 {
        self.shuffled[0].median_us / self.shuffled[1].median_us
    }

    /// Page server / in process, ascending medians.
    pub fn sequential_ratio(&self) -> f64 {
        self.sequential[0].median_us / self.sequential[1].median_us
    }
}

fn other(what: &str) -> impl FnOnce(String) -> BenchError + '_ {
    move |e| BenchError::Other(format!("{what}: {e}"))
}

/// Whether the page at host address `host` is present, from `/proc/self/pagemap`.
fn present(pagemap: &File, host: u64) -> Result<bool> {
    let mut entry = [0u8; 8];
    pagemap
        .read_exact_at(&mut entry, host / PAGE_SIZE * 8)
        .map_err(|source| BenchError::Io {
            what: "reading /proc/self/pagemap".into(),
            source,
        })?;
    Ok(u64::from_le_bytes(entry) & (1 << 63) != 0)
}

/// Reads one word of each page of `pages` (guest addresses) in that order, on a thread of its
/// own; returns the µs of each read that faulted.
fn touch(memory: &GuestMemoryMmap, pages: &[u64]) -> Result<Vec<f64>> {
    let reader = || -> Result<Vec<f64>> {
        let pagemap = File::open("/proc/self/pagemap").map_err(|source| BenchError::Io {
            what: "opening /proc/self/pagemap".into(),
            source,
        })?;
        let mut samples = Vec::with_capacity(pages.len());
        for &gpa in pages {
            let address = GuestAddress(gpa);
            let host = memory
                .get_host_address(address)
                .map_err(|e| other("guest memory")(e.to_string()))?;
            if present(&pagemap, host as u64)? {
                continue;
            }
            let start = Instant::now();
            let word: u64 = memory
                .read_obj(address)
                .map_err(|e| other("reading a restored page")(e.to_string()))?;
            samples.push(start.elapsed().as_secs_f64() * 1e6);
            std::hint::black_box(word);
        }
        Ok(samples)
    };
    std::thread::scope(|scope| {
        scope
            .spawn(reader)
            .join()
            .map_err(|_| BenchError::Other("the touching thread panicked".into()))?
    })
}

/// The snapshot's data pages (guest addresses, ascending) and its region layout.
fn data_pages(snapshot: &SnapshotFile) -> (Vec<u64>, Vec<(u64, u64)>) {
    let mut pages = Vec::new();
    for region in snapshot.regions() {
        for run in region.runs.iter().filter(|r| r.page_type == PageType::Data) {
            pages.extend(
                (run.first_page..run.first_page + run.pages)
                    .map(|page| region.guest_addr + page * PAGE_SIZE),
            );
        }
    }
    let layout = snapshot
        .regions()
        .iter()
        .map(|region| (region.guest_addr, region.size))
        .collect();
    (pages, layout)
}

/// The two restores, as indices of [`FaultFigures::shuffled`].
const PAGE_SERVER: usize = 0;
const IN_PROCESS: usize = 1;

/// One pass over `pages` on memory restored by `restorer` from `snapshot`.
fn pass(
    restorer: usize,
    server: &PageServerProcess,
    snapshot: &Path,
    layout: &[(u64, u64)],
    id: &str,
    pages: &[u64],
) -> Result<Vec<f64>> {
    if restorer == PAGE_SERVER {
        let memory = fresh_memory(layout).map_err(|e| other("fresh memory")(e.to_string()))?;
        let connection = connect_memory(server.socket(), &memory, Some(id), Box::new(|_| {}))
            .map_err(|e| other("connecting to the page server")(e.to_string()))?;
        let samples = touch(&memory, pages)?;
        if let Some(failure) = connection.failure() {
            return Err(BenchError::Other(format!("page server: {failure}")));
        }
        drop(connection);
        Ok(samples)
    } else {
        let restore = restore_lazy::<()>(snapshot)
            .map_err(|e| other("in-process lazy restore")(e.to_string()))?;
        let samples = touch(restore.memory(), pages)?;
        restore
            .finish()
            .map_err(|e| other("in-process lazy restore")(e.to_string()))?;
        Ok(samples)
    }
}

fn latency(mut samples: Vec<f64>, passes: u32) -> Latency {
    samples.sort_by(f64::total_cmp);
    let p99 = samples
        .get((samples.len() * 99 / 100).min(samples.len().saturating_sub(1)))
        .copied()
        .unwrap_or(f64::NAN);
    Latency {
        faults_per_pass: samples.len() as u64 / u64::from(passes.max(1)),
        p99_us: p99,
        median_us: median(samples),
    }
}

/// Serves `snapshot` with `binary serve` (its socket in `dir`) and lazily in process, `rounds`
/// rounds of a shuffled and an ascending pass each, alternating which restore goes first.
pub fn measure(binary: &Path, snapshot: &Path, dir: &Path, rounds: u32) -> Result<FaultFigures> {
    let file =
        SnapshotFile::open(snapshot).map_err(|e| other("opening the snapshot")(e.to_string()))?;
    let id = file.header().id.to_string();
    let (sequential, layout) = data_pages(&file);
    drop(file);
    let mut shuffled = sequential.clone();
    SplitMix::new(0xfa17_5eed).shuffle(&mut shuffled);
    let server = PageServerProcess::start(binary, snapshot, &dir.join("pages.sock"))?;

    // [restorer][shuffled, sequential]: samples pooled over the rounds.
    let mut pooled: [[Vec<f64>; 2]; 2] = Default::default();
    let mut by_order: [Vec<f64>; 2] = Default::default();
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [PAGE_SERVER, IN_PROCESS]
        } else {
            [IN_PROCESS, PAGE_SERVER]
        };
        let mut round_medians = [0.0; 2];
        for restorer in order {
            for (kind, pages) in [&shuffled, &sequential].into_iter().enumerate() {
                let samples = pass(restorer, &server, snapshot, &layout, &id, pages)?;
                if kind == 0 {
                    round_medians[restorer] = median(samples.clone());
                }
                pooled[restorer][kind].extend(samples);
            }
        }
        by_order[round as usize % 2].push(round_medians[PAGE_SERVER] / round_medians[IN_PROCESS]);
    }
    let [[server_shuffled, server_sequential], [local_shuffled, local_sequential]] = pooled;
    let [server_first, server_second] = by_order;
    let order_median = |ratios: Vec<f64>| (!ratios.is_empty()).then(|| median(ratios));
    Ok(FaultFigures {
        data_pages: sequential.len() as u64,
        shuffled: [
            latency(server_shuffled, rounds),
            latency(local_shuffled, rounds),
        ],
        sequential: [
            latency(server_sequential, rounds),
            latency(local_sequential, rounds),
        ],
        by_order: [order_median(server_first), order_median(server_second)],
    })
}
