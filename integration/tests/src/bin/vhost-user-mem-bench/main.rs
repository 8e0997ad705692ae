//! `vhost-user-mem-bench`: what the out-of-process balloon costs, against the same work done
//! in process, measured side by side in one run (issue 9, item 8).
//!
//! It starts the real `vhost-user-mem` binary, connects the `vhost` crate's real `Frontend`
//! with a memfd as guest memory (1 GiB at `--scale 1`, every page written first), drives the
//! inflate and reporting queues as Linux's driver does, and prints one line per figure with its
//! ratio, target and MET / NOT MET:
//! - reporting throughput: 2 MiB ranges reported (chains of 32, one in flight) and punched by
//!   the daemon, against `fallocate(PUNCH_HOLE)` of the same ranges from this process;
//! - inflate cost per MiB: 4 KiB PFNs in 256-PFN requests, against punching the same runs of
//!   pages from this process;
//! - snapshot time: `PUT /api/v1/snapshot` on the daemon's control API against ext-snapshot's
//!   writer in this process (what ext-vmm does), on the same memory: a random mix of data,
//!   zero, untouched and ballooned pages ([`mix`], [`snapshot`]);
//! - fault latency: `vhost-user-mem serve` on that snapshot, in its own process, against
//!   ext-snapshot's in-process lazy restore of the same file ([`faults`]);
//! - the daemon's resident memory after its snapshot and after all runs (`VmRSS`, `RssAnon`,
//!   `RssFile`, `RssShmem`): its own memory (`VmRSS` without the guest pages it maps, which
//!   are the guest's and counted once for the host) against 16 MiB plus its invalid-page
//!   bitmap.
//!
//! Every punch is checked: the memfd's allocated bytes (`st_blocks`) must drop by exactly what
//! was reported or inflated; both snapshots of a round must hold the same pages of each type.
//! No timing is asserted anywhere; the figures are printed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use vhost_user_mem::balloon::page_runs;
use vhost_user_mem::memory::{punch_range, PAGE_SHIFT, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

mod driver;
mod faults;
mod mix;
mod snapshot;
use driver::{
    BenchError, Buffer, Connection, DaemonProcess, Guest, Resident, Result, Virtqueue,
    INFLATE_QUEUE, PFN_BUFFER, REPORTING_QUEUE, RESERVED,
};
use ext_snapshot::PageType;

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
/// Linux reports free memory in blocks of order 9 (`pageblock_order` on x86-64).
const REPORT_BLOCK: u64 = 2 * MIB;
/// Ranges per reporting chain (`PAGE_REPORTING_CAPACITY` in Linux).
const RANGES_PER_CHAIN: usize = 32;
/// PFNs per inflate request (`VIRTIO_BALLOON_ARRAY_PFNS_MAX` in Linux).
const PFNS_PER_REQUEST: usize = 256;
/// The resident-memory target of issue 9: 16 MiB plus the invalid-page bitmap.
const RSS_TARGET_BASE: u64 = 16 * MIB;

/// Measure vhost-user-mem against in-process hole punching, in one run.
#[derive(Parser, Debug)]
#[command(name = "vhost-user-mem-bench")]
struct Args {
    /// Guest memory as a fraction of 1 GiB (rounded down to 2 MiB, at least 4 MiB).
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Rounds of each measurement (daemon and direct alternate); the median is printed.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// The vhost-user-mem binary (default: $VHOST_USER_MEM_BIN, else next to this one).
    #[arg(long)]
    daemon: Option<PathBuf>,
    /// Where both snapshot writers write (default: the temporary directory); files are removed.
    #[arg(long)]
    snapshot_dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vhost-user-mem-bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Guest memory for `scale`: a whole number of 2 MiB blocks, the first one reserved.
fn memory_size(scale: f64) -> Result<u64> {
    if !(scale.is_finite() && scale > 0.0 && scale <= 64.0) {
        return Err(BenchError::Other(format!(
            "--scale must be in (0, 64], not {scale}"
        )));
    }
    let bytes = (GIB as f64 * scale) as u64 / REPORT_BLOCK * REPORT_BLOCK;
    Ok(bytes.max(RESERVED + REPORT_BLOCK))
}

/// Medians of one figure over the rounds.
#[derive(Debug, Clone, Copy)]
struct Timing {
    daemon_seconds: f64,
    direct_seconds: f64,
}

impl Timing {
    fn ratio(&self) -> f64 {
        self.daemon_seconds / self.direct_seconds
    }
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples.get(samples.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs `daemon` and `direct` `rounds` times each, alternating, over freshly populated ranges;
/// both closures return the seconds they measured.
fn alternate(
    rounds: u32,
    mut daemon: impl FnMut() -> Result<f64>,
    mut direct: impl FnMut() -> Result<f64>,
) -> Result<Timing> {
    let (mut on_daemon, mut in_process) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        on_daemon.push(daemon()?);
        in_process.push(direct()?);
    }
    Ok(Timing {
        daemon_seconds: median(on_daemon),
        direct_seconds: median(in_process),
    })
}

/// One run: writes the measured memory again, times `work`, then checks that the memfd's
/// allocation dropped by exactly `expected` bytes. Returns the seconds `work` took.
fn timed_run(
    guest: &Guest,
    expected: u64,
    what: &str,
    work: impl FnOnce() -> Result<()>,
) -> Result<f64> {
    guest.populate(RESERVED, guest.size - RESERVED)?;
    let before = guest.allocated()?;
    let start = Instant::now();
    work()?;
    let seconds = start.elapsed().as_secs_f64();
    let dropped = before.saturating_sub(guest.allocated()?);
    if dropped != expected {
        return Err(BenchError::Other(format!(
            "{what}: the memfd's allocation dropped by {dropped} bytes, not {expected}"
        )));
    }
    Ok(seconds)
}

/// `punch_range` from this process, the baselines' way of punching.
fn punch_directly(guest: &Guest, addr: u64, len: u64) -> Result<()> {
    punch_range(&guest.mem, addr, len).map_err(|e| BenchError::Other(format!("direct punch: {e}")))
}

/// The reported ranges: every 2 MiB block above the reserved one.
fn report_ranges(guest: &Guest) -> Vec<(u64, u64)> {
    (RESERVED..guest.size)
        .step_by(REPORT_BLOCK as usize)
        .map(|addr| (addr, REPORT_BLOCK))
        .collect()
}

fn measure_reporting(guest: &Guest, connection: &mut Connection, rounds: u32) -> Result<Timing> {
    let ranges = report_ranges(guest);
    let bytes = ranges.len() as u64 * REPORT_BLOCK;
    let queue = &mut connection.queues[REPORTING_QUEUE];
    let daemon = || {
        timed_run(guest, bytes, "reporting through the daemon", || {
            for chain in ranges.chunks(RANGES_PER_CHAIN) {
                let buffers: Vec<Buffer> = chain
                    .iter()
                    .map(|&(addr, len)| Buffer {
                        addr,
                        len: len as u32,
                        writable: true,
                    })
                    .collect();
                queue.request(&guest.mem, &buffers)?;
            }
            Ok(())
        })
    };
    let direct = || {
        timed_run(guest, bytes, "direct punching", || {
            ranges
                .iter()
                .try_for_each(|&(addr, len)| punch_directly(guest, addr, len))
        })
    };
    alternate(rounds, daemon, direct)
}

/// Inflate or deflate requests for the frames `gfns`, 256 PFNs per request, in ascending
/// order (as a fresh guest's allocator tends to hand pages to the balloon).
fn pfn_requests(gfns: std::ops::Range<u64>) -> Result<Vec<Vec<u32>>> {
    let pfns: Vec<u32> = gfns
        .map(u32::try_from)
        .collect::<std::result::Result<_, _>>()
        .map_err(|_| BenchError::Other("guest memory too large for 32-bit PFNs".into()))?;
    Ok(pfns.chunks(PFNS_PER_REQUEST).map(<[u32]>::to_vec).collect())
}

/// One inflate or deflate request (by `queue`): `pfns` as little-endian u32 in the PFN buffer,
/// one device-readable descriptor, waited for until used.
fn send_pfns(guest: &Guest, queue: &mut Virtqueue, pfns: &[u32]) -> Result<()> {
    let payload: Vec<u8> = pfns.iter().flat_map(|pfn| pfn.to_le_bytes()).collect();
    guest
        .mem
        .write_slice(&payload, GuestAddress(PFN_BUFFER))
        .map_err(|e| BenchError::Other(format!("writing PFNs: {e}")))?;
    let buffer = Buffer {
        addr: PFN_BUFFER,
        len: payload.len() as u32,
        writable: false,
    };
    queue.request(&guest.mem, &[buffer])
}

fn measure_inflate(guest: &Guest, connection: &mut Connection, rounds: u32) -> Result<Timing> {
    let requests = pfn_requests(RESERVED >> PAGE_SHIFT..guest.size >> PAGE_SHIFT)?;
    let bytes = guest.size - RESERVED;
    let queue = &mut connection.queues[INFLATE_QUEUE];
    let daemon = || {
        timed_run(guest, bytes, "inflating through the daemon", || {
            requests
                .iter()
                .try_for_each(|request| send_pfns(guest, queue, request))
        })
    };
    let direct = || {
        timed_run(guest, bytes, "direct punching", || {
            for request in &requests {
                // The same holes the daemon punches: each request's runs of consecutive pages.
                let pfns: Vec<u64> = request.iter().map(|&pfn| u64::from(pfn)).collect();
                for (first, count) in page_runs(&pfns) {
                    punch_directly(guest, first << PAGE_SHIFT, count << PAGE_SHIFT)?;
                }
            }
            Ok(())
        })
    };
    alternate(rounds, daemon, direct)
}

fn verdict(met: bool) -> &'static str {
    if met {
        "MET"
    } else {
        "NOT MET"
    }
}

fn run(args: &Args) -> Result<()> {
    if args.rounds == 0 {
        return Err(BenchError::Other("--rounds must be at least 1".into()));
    }
    let size = memory_size(args.scale)?;
    let binary = driver::find_daemon(args.daemon.as_deref())?;
    let daemon = DaemonProcess::start(&binary)?;
    let guest = Guest::new(size)?;
    guest.populate(0, size)?;
    let mut connection = driver::connect(daemon.socket(), &guest)?;
    let mut api = ext_vmm_api::ApiClient::connect(daemon.api_socket())
        .map_err(|e| BenchError::Other(e.to_string()))?;

    let measured = size - RESERVED;
    let reporting = measure_reporting(&guest, &mut connection, args.rounds)?;
    let inflate = measure_inflate(&guest, &mut connection, args.rounds)?;
    let mix = mix::fill(&guest, &mut connection, &mut api)?;
    // Absolute: the daemon refuses relative snapshot paths.
    let snapshot_dir = match &args.snapshot_dir {
        Some(dir) => std::fs::canonicalize(dir).map_err(|source| BenchError::Io {
            what: format!("--snapshot-dir {}", dir.display()),
            source,
        })?,
        None => daemon.dir().to_path_buf(),
    };
    let snapshot = snapshot::measure(&guest, &mix, &daemon, &snapshot_dir, args.rounds)?;
    let after_snapshot = driver::resident(daemon.pid())?;
    let faults = faults::measure(&binary, snapshot.kept.path(), daemon.dir(), args.rounds)?;
    let resident = driver::resident(daemon.pid())?;

    println!(
        "vhost-user-mem-bench (scale {}): guest memory {} MiB in a memfd, every page written \
         before each run; {} MiB reported as {} ranges of 2 MiB in chains of {RANGES_PER_CHAIN}, \
         {} MiB inflated as 4 KiB PFNs in {PFNS_PER_REQUEST}-PFN requests, one chain in flight \
         as Linux's driver does; medians of {} rounds, daemon and direct alternating; daemon {} \
         (pid {})",
        args.scale,
        size / MIB,
        measured / MIB,
        measured / REPORT_BLOCK,
        measured / MIB,
        args.rounds,
        binary.display(),
        daemon.pid()
    );
    println!(
        "allocation checked: the memfd's st_blocks dropped by exactly the reported and the \
         inflated bytes in every round, through the daemon and directly"
    );
    let gib_per_second = |seconds: f64| measured as f64 / GIB as f64 / seconds;
    println!(
        "reporting throughput: daemon {:.2} GiB/s, direct fallocate {:.2} GiB/s, ratio {:.2} \
         (daemon time / direct time); target: none set",
        gib_per_second(reporting.daemon_seconds),
        gib_per_second(reporting.direct_seconds),
        reporting.ratio()
    );
    let micros_per_mib = |seconds: f64| seconds * 1e6 / (measured as f64 / MIB as f64);
    println!(
        "inflate cost: daemon {:.1} µs/MiB, direct fallocate {:.1} µs/MiB, ratio {:.2} \
         (daemon time / direct time); target: none set",
        micros_per_mib(inflate.daemon_seconds),
        micros_per_mib(inflate.direct_seconds),
        inflate.ratio()
    );
    print_snapshot(&mix, &snapshot, &snapshot_dir);
    print_faults(&faults);
    print_resident(
        "daemon resident memory after its snapshot",
        &after_snapshot,
        size,
    );
    print_resident("daemon resident memory", &resident, size);
    Ok(())
}

fn print_snapshot(mix: &mix::Mix, timing: &snapshot::SnapshotTiming, dir: &std::path::Path) {
    let pages = |page_type: PageType| timing.pages_by_type[page_type as usize];
    println!(
        "snapshot memory: above the reserved 2 MiB, page by page at random, {} data pages of \
         random bytes ({}%), {} written zero ({}%), {} never touched, {} inflated through the \
         daemon ({}%); both files: {} data, {} zero, {} not populated, {} invalid pages, {:.1} \
         MiB, the same counts and length in every round; written to {}, synced before each \
         write",
        mix.data_pages,
        mix::DATA_PERCENT,
        mix.zero_pages,
        mix::ZERO_PERCENT,
        mix.untouched_pages,
        mix.inflated.len(),
        mix::INFLATED_PERCENT,
        pages(PageType::Data),
        pages(PageType::Zero),
        pages(PageType::NotPopulated),
        pages(PageType::Invalid),
        timing.file_bytes as f64 / MIB as f64,
        dir.display()
    );
    let ms = |seconds: f64| seconds * 1e3;
    let [first, second] = timing.by_position();
    let position = |ratio: Option<f64>| ratio.map_or("-".to_string(), |r| format!("{r:.2}"));
    println!(
        "daemon snapshot time vs ext-vmm's in-process writer: daemon {:.1} ms ({:.1}..{:.1}; \
         PUT /api/v1/snapshot wall time, {:.1} ms by its duration_ms; first round, its mapping \
         cold, {:.1} ms), in process {:.1} ms ({:.1}..{:.1}; SnapshotWriter::write_file, \
         invalid pages as a GfnBitmap), ratio {:.2} (daemon wall / in process: geometric \
         mean of the ratios of medians of writes in the same position, first {}, second {}); \
         target <= 1.1x: {}",
        ms(timing.daemon.median),
        ms(timing.daemon.min),
        ms(timing.daemon.max),
        ms(timing.daemon_reported_seconds),
        ms(timing.daemon_first_seconds),
        ms(timing.in_process.median),
        ms(timing.in_process.min),
        ms(timing.in_process.max),
        timing.ratio(),
        position(first),
        position(second),
        verdict(timing.ratio() <= 1.1)
    );
    let rounds: Vec<String> = timing
        .rounds
        .iter()
        .enumerate()
        .map(|(round, &(daemon, local))| {
            if round % 2 == 0 {
                format!("daemon {:.0} then in process {:.0}", ms(daemon), ms(local))
            } else {
                format!("in process {:.0} then daemon {:.0}", ms(local), ms(daemon))
            }
        })
        .collect();
    println!("snapshot rounds (ms): {}", rounds.join("; "));
}

fn print_faults(figures: &faults::FaultFigures) {
    let describe = |latency: &faults::Latency| {
        format!(
            "median {:.2} µs, p99 {:.2} µs, {} faults",
            latency.median_us, latency.p99_us, latency.faults_per_pass
        )
    };
    let order = |ratio: Option<f64>| ratio.map_or("-".to_string(), |r| format!("{r:.2}"));
    println!(
        "page-server fault latency, ascending pass: page server {}, in process {}, ratio {:.2}",
        describe(&figures.sequential[0]),
        describe(&figures.sequential[1]),
        figures.sequential_ratio()
    );
    println!(
        "page-server fault latency vs ext-snapshot's in-process lazy restore: {} data pages \
         touched in a shuffled order, one read each from a thread of the bench; page server \
         (vhost-user-mem serve, own process) {}, in process (restore_lazy) {}, ratio {:.2} \
         (page server / in process, medians; page server first {}, second {}); target <= \
         1.5x: {}",
        figures.data_pages,
        describe(&figures.shuffled[0]),
        describe(&figures.shuffled[1]),
        figures.ratio(),
        order(figures.by_order[0]),
        order(figures.by_order[1]),
        verdict(figures.ratio() <= 1.5)
    );
}

fn print_resident(what: &str, resident: &Resident, guest_bytes: u64) {
    // One bit per 4 KiB guest page.
    let bitmap = guest_bytes / PAGE_SIZE / 8;
    let limit = RSS_TARGET_BASE + bitmap;
    // The guest pages it maps are the guest's memory, shared with the VMM: not the daemon's.
    let own = resident.total.saturating_sub(resident.shmem);
    let mib = |bytes: u64| bytes as f64 / MIB as f64;
    println!(
        "{what}: VmRSS {:.2} MiB (RssAnon {:.2} MiB, RssFile {:.2} MiB, RssShmem {:.2} MiB of \
         guest pages it touched), its own {:.2} MiB (VmRSS - RssShmem), bitmap {:.1} KiB; \
         target own <= 16 MiB + bitmap = {:.2} MiB: {}",
        mib(resident.total),
        mib(resident.anon),
        mib(resident.file),
        mib(resident.shmem),
        mib(own),
        bitmap as f64 / 1024.0,
        mib(limit),
        verdict(own <= limit)
    );
}
