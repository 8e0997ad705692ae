//! Cloning a running VM through its VMM's REST API.
//!
//! [`clone_vm`] pauses the source, has it write one sparse snapshot, resumes it (the source is
//! paused exactly as long as the snapshot takes, and resumed on every error path), then starts
//! N VMM processes in parallel that restore that one snapshot `mapped` (copy-on-write over one
//! shared page cache) or `ondemand`, paused. Each clone gets a new VM generation ID while still
//! paused, so no vCPU of a clone runs guest code with the source's identity, and only then
//! resumes. [`destroy_clones`] ends them again.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ext_vmm_api::VmState;
use serde::{Deserialize, Serialize};

use crate::api::VmmApi;
use crate::error::{CloneError, Result};
use crate::process::{api_socket, claim_clone_dir, CloneProcess, VmmCommand};
use crate::signals::HeldSignals;

/// The per-clone record, `clone.json` in the clone's directory.
pub const CLONE_RECORD: &str = "clone.json";

/// What to clone, how many times, where.
#[derive(Clone, Debug)]
pub struct CloneOptions {
    /// The source VMM's API socket.
    pub source: PathBuf,
    /// Number of clones.
    pub count: u32,
    /// Directory holding the snapshot (`snapshot-<n>`) and the clones (`clone-<n>`).
    pub out: PathBuf,
    /// Restore mode of the clones: `mapped` or `ondemand` (or `copy`).
    pub mode: String,
    /// The VMM the clones run in.
    pub vmm: VmmCommand,
    /// Bound of every API call, and of a clone's VMM coming up.
    pub timeout: Duration,
    /// Clone even when the VMM cannot give clones a new generation ID.
    pub allow_shared_identity: bool,
}

/// One clone that runs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloneRecord {
    /// Its index (`clone-<index>`).
    pub index: u32,
    /// Its directory: API socket, VMM log, console log, this record.
    pub dir: PathBuf,
    /// Its API socket.
    pub api_socket: PathBuf,
    /// Its VMM's process id.
    pub pid: u32,
    /// Its VM generation ID (`None`: the VMM has none).
    pub vmgenid: Option<String>,
    /// From starting its VMM to its API answering (restore included), milliseconds.
    pub start_ms: f64,
    /// From the clone request to its vCPUs running, milliseconds.
    pub latency_ms: f64,
}

/// What [`clone_vm`] did.
#[derive(Clone, Debug, Serialize)]
pub struct CloneReport {
    /// The snapshot every clone restored.
    pub snapshot: PathBuf,
    /// The source's generation ID (`None`: its VMM has none).
    pub source_vmgenid: Option<String>,
    /// How long the source was paused, milliseconds.
    pub source_paused_ms: f64,
    /// How long its snapshot took, milliseconds.
    pub snapshot_ms: f64,
    /// The clones that run, by index.
    pub clones: Vec<CloneRecord>,
    /// Why the others failed (each was cleaned up).
    pub failures: Vec<String>,
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

fn check_signals() -> Result<()> {
    match HeldSignals::pending() {
        Some(signal) => Err(CloneError::Interrupted(signal)),
        None => Ok(()),
    }
}

/// Refuses a source whose clones would share a writable disk with it.
fn check_source_config(config: &serde_json::Value) -> Result<()> {
    let disks = config.get("disks").and_then(|d| d.as_array());
    for disk in disks.into_iter().flatten() {
        let readonly = disk.get("readonly").and_then(|r| r.as_bool()) == Some(true);
        if !readonly {
            let path = disk.get("path").and_then(|p| p.as_str()).unwrap_or("?");
            return Err(CloneError::Source(format!(
                "disk {path} is writable: every clone would write to the same file"
            )));
        }
    }
    Ok(())
}

/// The source paused by us; dropping it resumes the source, so no error path leaves it
/// paused.
struct PausedSource<'a> {
    api: &'a VmmApi,
    paused_at: Option<Instant>,
}

impl PausedSource<'_> {
    /// Resumes now; how long the source was paused.
    fn resume(mut self) -> Result<Duration> {
        let since = self.paused_at.take();
        self.api.resume()?;
        Ok(since.map_or(Duration::ZERO, |t| t.elapsed()))
    }
}

impl Drop for PausedSource<'_> {
    fn drop(&mut self) {
        if self.paused_at.take().is_some() {
            if let Err(e) = self.api.resume() {
                tracing::error!("cannot resume the source after a failure: {e}");
            }
        }
    }
}

fn create_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|source| CloneError::Io {
        what: "creating",
        path: path.to_path_buf(),
        source,
    })
}

/// Claims the first free `snapshot-<n>` directory under `out`.
fn claim_snapshot_dir(out: &Path) -> Result<PathBuf> {
    for n in 0..100_000u32 {
        let dir = out.join(format!("snapshot-{n}"));
        match fs::create_dir(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(source) => {
                return Err(CloneError::Io {
                    what: "creating",
                    path: dir,
                    source,
                })
            }
        }
    }
    Err(CloneError::Internal("no free snapshot directory".into()))
}

/// Clones the VM behind `options.source` `options.count` times. Termination signals are
/// held for the whole call (see [`crate::signals`]); one that arrives ends it early, undone.
///
/// `Ok` when the snapshot was taken, even if some clones failed (listed in
/// [`CloneReport::failures`], each cleaned up); `Err` when nothing was cloned (the source is
/// then running again, or left as it was if it was paused before).
pub fn clone_vm(options: &CloneOptions) -> Result<CloneReport> {
    let _held = HeldSignals::hold().map_err(|e| CloneError::Internal(format!("sigmask: {e}")))?;
    let requested = Instant::now();
    if !matches!(options.mode.as_str(), "mapped" | "ondemand" | "copy") {
        return Err(CloneError::Source(format!(
            "restore mode {:?}: expected mapped, ondemand or copy",
            options.mode
        )));
    }
    let source = VmmApi::new(&options.source, options.timeout);
    let info = source.info()?;
    if !matches!(info.state, VmState::Running | VmState::Paused) {
        return Err(CloneError::Source(format!(
            "the source VM is {:?}; only a running or paused VM is cloned",
            info.state
        )));
    }
    check_source_config(&info.config)?;
    let source_vmgenid = source.identity()?.map(|i| i.vmgenid);
    if source_vmgenid.is_none() && !options.allow_shared_identity {
        return Err(CloneError::Source(
            "its VMM has no VM generation ID (GET ext/vm.identity: 404), so every clone would \
             run with the source's identity and RNG state; pass --allow-shared-identity to \
             clone anyway"
                .into(),
        ));
    }
    create_dir(&options.out)?;
    let snapshot = claim_snapshot_dir(&options.out)?;
    let remove_snapshot = |error: CloneError| {
        let _ = fs::remove_dir_all(&snapshot);
        error
    };
    check_signals().map_err(remove_snapshot)?;

    let paused = PausedSource {
        api: &source,
        paused_at: None,
    };
    let paused = if info.state == VmState::Running {
        source.pause().map_err(remove_snapshot)?;
        PausedSource {
            paused_at: Some(Instant::now()),
            ..paused
        }
    } else {
        paused
    };
    let snapshot_started = Instant::now();
    source.snapshot(&snapshot).map_err(remove_snapshot)?;
    let snapshot_ms = ms(snapshot_started.elapsed());
    let source_paused_ms = ms(paused.resume().map_err(remove_snapshot)?);
    check_signals().map_err(remove_snapshot)?;

    let results: Vec<Result<CloneRecord>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..options.count)
            .map(|_| {
                let (snapshot, source_vmgenid) = (&snapshot, source_vmgenid.as_deref());
                scope.spawn(move || clone_one(options, snapshot, source_vmgenid, requested))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(CloneError::Internal("a clone thread panicked".into())))
            })
            .collect()
    });
    let mut clones = Vec::new();
    let mut failures = Vec::new();
    for result in results {
        match result {
            Ok(record) => clones.push(record),
            Err(e) => failures.push(e.to_string()),
        }
    }
    clones.sort_by_key(|c| c.index);
    if let Some(signal) = HeldSignals::pending() {
        failures.push(CloneError::Interrupted(signal).to_string());
    }
    Ok(CloneReport {
        snapshot,
        source_vmgenid,
        source_paused_ms,
        snapshot_ms,
        clones,
        failures,
    })
}

/// Starts, configures and resumes one clone; on any failure its process and directory are
/// gone when this returns.
fn clone_one(
    options: &CloneOptions,
    snapshot: &Path,
    source_vmgenid: Option<&str>,
    requested: Instant,
) -> Result<CloneRecord> {
    let (index, dir) = claim_clone_dir(&options.out, 0)?;
    let started = Instant::now();
    let mut process = CloneProcess::start(
        &options.vmm,
        index,
        dir,
        snapshot,
        &options.mode,
        options.timeout,
    )?;
    process.wait_ready(started + options.timeout)?;
    let start_ms = ms(started.elapsed());
    check_signals()?;
    let state = process.api().state()?;
    if state != VmState::Paused {
        return Err(process.failure(format!(
            "restored in state {state:?}, not Paused: it may have run with the source's identity"
        )));
    }
    let vmgenid = match source_vmgenid {
        Some(source_id) => {
            let identity = process.api().set_identity(None)?;
            if identity.vmgenid == source_id {
                return Err(process.failure("its new generation ID equals the source's".into()));
            }
            Some(identity.vmgenid)
        }
        None => None,
    };
    check_signals()?;
    process.api().resume()?;
    let latency_ms = ms(requested.elapsed());
    let record = CloneRecord {
        index,
        dir: process.dir().to_path_buf(),
        api_socket: api_socket(process.dir()),
        pid: process.pid(),
        vmgenid,
        start_ms,
        latency_ms,
    };
    let json = serde_json::to_vec_pretty(&record)
        .map_err(|e| CloneError::Internal(format!("encoding {CLONE_RECORD}: {e}")))?;
    let path = process.dir().join(CLONE_RECORD);
    fs::write(&path, json).map_err(|source| CloneError::Io {
        what: "writing",
        path,
        source,
    })?;
    process.release();
    Ok(record)
}

/// The clones recorded under `out`, by index.
pub fn list_clones(out: &Path) -> Result<Vec<CloneRecord>> {
    let entries = fs::read_dir(out).map_err(|source| CloneError::Io {
        what: "reading",
        path: out.to_path_buf(),
        source,
    })?;
    let mut clones = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path().join(CLONE_RECORD);
        if let Ok(bytes) = fs::read(&path) {
            match serde_json::from_slice::<CloneRecord>(&bytes) {
                Ok(record) => clones.push(record),
                Err(e) => tracing::warn!("{}: {e}", path.display()),
            }
        }
    }
    clones.sort_by_key(|c| c.index);
    Ok(clones)
}

/// Whether `pid` is still the VMM of the clone whose socket is `socket` (and not a process
/// that reused the pid).
fn is_clone_vmm(pid: u32, socket: &Path) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let needle = socket.as_os_str().as_encoded_bytes();
    cmdline.windows(needle.len()).any(|w| w == needle)
}

/// Ends every clone under `out`: `vmm.shutdown` on its API, SIGKILL if it is still there after
/// `timeout`; then removes the clones' and snapshots' directories. Returns the indexes ended.
pub fn destroy_clones(out: &Path, timeout: Duration) -> Result<Vec<u32>> {
    let clones = list_clones(out)?;
    for clone in &clones {
        if let Err(e) = VmmApi::new(&clone.api_socket, timeout).shutdown_vmm() {
            tracing::info!("clone {}: {e}; killing it", clone.index);
        }
    }
    for clone in &clones {
        let deadline = Instant::now() + timeout;
        while is_clone_vmm(clone.pid, &clone.api_socket) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if is_clone_vmm(clone.pid, &clone.api_socket) {
            if let Ok(pid) = i32::try_from(clone.pid) {
                // SAFETY: kill(2) on a pid just checked to be this clone's VMM.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = fs::remove_dir_all(&clone.dir);
    }
    for entry in fs::read_dir(out).into_iter().flatten().flatten() {
        let name = entry.file_name();
        if name.to_string_lossy().starts_with("snapshot-") {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
    Ok(clones.iter().map(|c| c.index).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writable_disks_are_refused() {
        let ok = serde_json::json!({"disks": [{"path": "/a", "readonly": true}]});
        assert!(check_source_config(&ok).is_ok());
        assert!(check_source_config(&serde_json::json!({})).is_ok());
        let shared = serde_json::json!({"disks": [{"path": "/a"}]});
        assert!(check_source_config(&shared)
            .unwrap_err()
            .to_string()
            .contains("/a is writable"));
    }

    #[test]
    fn directories_are_claimed_once() {
        let out = tempfile::tempdir().unwrap();
        let (a, _) = claim_clone_dir(out.path(), 0).unwrap();
        let (b, _) = claim_clone_dir(out.path(), 0).unwrap();
        assert_eq!((a, b), (0, 1));
        let s0 = claim_snapshot_dir(out.path()).unwrap();
        let s1 = claim_snapshot_dir(out.path()).unwrap();
        assert_ne!(s0, s1);
    }
}
