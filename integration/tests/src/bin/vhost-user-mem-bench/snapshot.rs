//! The daemon's snapshot against ext-vmm's in-process writer, on the same memory.
//!
//! The daemon writes through its control API (`PUT /api/v1/snapshot` with a `file://` URL),
//! reading guest memory through its own mapping of the memfd and typing the pages it inflated
//! `Invalid`. The baseline is what ext-vmm does in process: `SnapshotWriter` with default
//! options and the balloon's pages as a `GfnBitmap`, on the bench's mapping of the same memfd.
//! Both write into the same directory (`--snapshot-dir`, default the temporary directory); the
//! file system is synced (untimed) before each write, the files are deleted after each round
//! (page cache cannot be dropped without privileges the bench does not assume), and the order
//! alternates from round to round. Each round checks that both files hold the same pages of
//! each type and have the same length.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ext_snapshot::{GfnBitmap, PageType, SnapshotFile, SnapshotWriter, WriteOptions};
use vhost_user_mem::api::types::SnapshotResponse;

use crate::driver::{BenchError, DaemonProcess, Guest, Result};
use crate::median;
use crate::mix::Mix;

/// A snapshot file the bench wrote, removed when dropped (also when a round fails half way).
pub struct ScratchFile(PathBuf);

impl ScratchFile {
    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Median, fastest and slowest of one side's rounds, seconds.
#[derive(Debug, Clone, Copy)]
pub struct Spread {
    /// Median.
    pub median: f64,
    /// Fastest round.
    pub min: f64,
    /// Slowest round.
    pub max: f64,
}

impl Spread {
    fn of(samples: &[f64]) -> Spread {
        Spread {
            median: median(samples.to_vec()),
            min: samples.iter().copied().fold(f64::INFINITY, f64::min),
            max: samples.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        }
    }
}

/// What the rounds measured, and what the files held.
pub struct SnapshotTiming {
    /// Wall time of the daemon's HTTP call.
    pub daemon: Spread,
    /// The daemon's own `duration_ms`, median, seconds.
    pub daemon_reported_seconds: f64,
    /// The daemon's first round (seconds): its mapping of guest memory had no page tables yet.
    pub daemon_first_seconds: f64,
    /// The in-process writer.
    pub in_process: Spread,
    /// Each round's (daemon wall, in-process) seconds, in order; the daemon went first in
    /// even rounds.
    pub rounds: Vec<(f64, f64)>,
    /// Pages by type (`PageType as usize`), the same in both files.
    pub pages_by_type: [u64; 5],
    /// Length of each file (the same for both).
    pub file_bytes: u64,
    /// The daemon's file of the last round, kept for the fault figure.
    pub kept: ScratchFile,
}

impl SnapshotTiming {
    /// Daemon / in process with both in the same position of their rounds: `[first, second]`
    /// (medians of the rounds where each went first, and where each went second; `None`
    /// without such rounds, i.e. with fewer than two). The second write of a round is often
    /// the slow one (the file system still busy with the first file), so only writes in the
    /// same position are compared.
    pub fn by_position(&self) -> [Option<f64>; 2] {
        let pick = |daemon_round: usize| -> Option<f64> {
            // The daemon's samples of rounds of parity `daemon_round`, the in-process ones of
            // the other parity: both in the same position.
            let of_parity = |parity: usize| self.rounds.iter().skip(parity).step_by(2);
            let daemon: Vec<f64> = of_parity(daemon_round).map(|r| r.0).collect();
            let local: Vec<f64> = of_parity(1 - daemon_round).map(|r| r.1).collect();
            (!daemon.is_empty() && !local.is_empty()).then(|| median(daemon) / median(local))
        };
        [pick(0), pick(1)]
    }

    /// The figure: the geometric mean of [`Self::by_position`]'s two ratios, which cancels the
    /// cost of going second; with a single round, the plain ratio of the medians.
    pub fn ratio(&self) -> f64 {
        match self.by_position() {
            [Some(first), Some(second)] => (first * second).sqrt(),
            _ => self.daemon.median / self.in_process.median,
        }
    }
}

/// Flushes the dirty pages of the file system holding `dir` (`syncfs`, untimed, before each
/// write): otherwise the writeback of the previous round's file, or of anything else on the
/// machine, lands on whichever write comes next and decides the figure.
fn settle(dir: &Path) -> Result<()> {
    let handle = std::fs::File::open(dir).map_err(|source| BenchError::Io {
        what: format!("opening {}", dir.display()),
        source,
    })?;
    // SAFETY: syncfs takes a descriptor that `handle` keeps open for the call; it touches no
    // memory of this process.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&handle)) } != 0 {
        return Err(BenchError::Io {
            what: format!("syncfs of {}", dir.display()),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// One snapshot through the daemon's API: (wall seconds, the daemon's answer).
fn through_daemon(
    api: &mut ext_vmm_api::ApiClient,
    path: &Path,
) -> Result<(f64, SnapshotResponse)> {
    let body = serde_json::json!({ "destination_url": format!("file://{}", path.display()) });
    let body = body.to_string();
    settle(path.parent().unwrap_or(Path::new("/")))?;
    let start = Instant::now();
    let response = api
        .request("PUT", "snapshot", Some(body.as_bytes()))
        .map_err(|e| BenchError::Other(format!("PUT /api/v1/snapshot: {e}")))?;
    let seconds = start.elapsed().as_secs_f64();
    if !response.is_success() {
        return Err(BenchError::Other(format!(
            "PUT /api/v1/snapshot: {} {:?}",
            response.status,
            response.error_messages()
        )));
    }
    let answer = serde_json::from_slice(&response.body)
        .map_err(|e| BenchError::Other(format!("PUT /api/v1/snapshot answer: {e}")))?;
    Ok((seconds, answer))
}

/// One snapshot in this process, as ext-vmm writes it.
fn in_process(guest: &Guest, mix: &Mix, path: &Path) -> Result<f64> {
    let invalid = GfnBitmap::new(&mix.invalid_words);
    let writer = SnapshotWriter::new(WriteOptions::default()).invalid_pages(&invalid);
    settle(path.parent().unwrap_or(Path::new("/")))?;
    let start = Instant::now();
    writer
        .write_file(&guest.mem, path)
        .map_err(|e| BenchError::Other(format!("in-process snapshot: {e}")))?;
    Ok(start.elapsed().as_secs_f64())
}

fn length(path: &Path) -> Result<u64> {
    std::fs::metadata(path)
        .map(|meta| meta.len())
        .map_err(|source| BenchError::Io {
            what: format!("stat of {}", path.display()),
            source,
        })
}

fn pages_in(path: &Path) -> Result<[u64; 5]> {
    SnapshotFile::open(path)
        .map(|file| file.pages_by_type())
        .map_err(|e| BenchError::Other(format!("reading back {}: {e}", path.display())))
}

/// `rounds` snapshots each way, alternating which goes first; checks the page counts of every
/// pair of files against each other and the invalid pages against the mix.
pub fn measure(
    guest: &Guest,
    mix: &Mix,
    daemon: &DaemonProcess,
    dir: &Path,
    rounds: u32,
) -> Result<SnapshotTiming> {
    let mut api = ext_vmm_api::ApiClient::connect(daemon.api_socket())
        .map_err(|e| BenchError::Other(e.to_string()))?;
    let (mut wall, mut reported, mut local) = (Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    let tag = std::process::id();
    for round in 0..rounds {
        let daemon_file = ScratchFile(dir.join(format!("vum-bench-{tag}-daemon-{round}.snap")));
        let local_file = ScratchFile(dir.join(format!("vum-bench-{tag}-local-{round}.snap")));
        let answer = if round % 2 == 0 {
            let (seconds, answer) = through_daemon(&mut api, daemon_file.path())?;
            wall.push(seconds);
            local.push(in_process(guest, mix, local_file.path())?);
            answer
        } else {
            local.push(in_process(guest, mix, local_file.path())?);
            let (seconds, answer) = through_daemon(&mut api, daemon_file.path())?;
            wall.push(seconds);
            answer
        };
        reported.push(answer.duration_ms as f64 / 1e3);
        let daemon_pages = pages_in(daemon_file.path())?;
        let local_pages = pages_in(local_file.path())?;
        let answered = [
            answer.pages.not_populated,
            answer.pages.invalid,
            answer.pages.zero,
            answer.pages.data,
            0,
        ];
        let daemon_len = length(daemon_file.path())?;
        let local_len = length(local_file.path())?;
        if daemon_pages != local_pages || daemon_pages != answered || daemon_len != local_len {
            return Err(BenchError::Other(format!(
                "round {round}: the daemon's file has pages {daemon_pages:?} in {daemon_len} \
                 bytes (it answered {answered:?}), the in-process file {local_pages:?} in \
                 {local_len} bytes"
            )));
        }
        if daemon_pages[PageType::Invalid as usize] != mix.inflated.len() as u64 {
            return Err(BenchError::Other(format!(
                "round {round}: {} invalid pages in the snapshots, {} inflated",
                daemon_pages[PageType::Invalid as usize],
                mix.inflated.len()
            )));
        }
        // Dropping the previous round's file and this round's in-process file removes them.
        last = Some((daemon_file, daemon_pages, daemon_len));
    }
    let (kept, pages_by_type, file_bytes) =
        last.ok_or_else(|| BenchError::Other("no snapshot round".into()))?;
    Ok(SnapshotTiming {
        daemon: Spread::of(&wall),
        daemon_reported_seconds: median(reported),
        daemon_first_seconds: wall.first().copied().unwrap_or(f64::NAN),
        in_process: Spread::of(&local),
        rounds: wall.iter().copied().zip(local.iter().copied()).collect(),
        pages_by_type,
        file_bytes,
        kept,
    })
}
