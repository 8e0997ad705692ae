//! `vm.snapshot` and restore for [`Vmm`]: collects the state of a paused VM (vCPU state read by
//! each parked vCPU thread on its own vCPU, VM and device state, memory through ext-snapshot)
//! and builds a new VM from a validated snapshot directory in one of the three memory modes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ext_snapshot::bench::baseline::{dense_dump, holes_only_copy};
use ext_snapshot::restore::lazy::{restore_lazy, LazyRestore};
use ext_snapshot::restore::mapped::{restore_mapped, MappedOptions};
use ext_snapshot::{
    restore_chain_eager, restore_eager, EagerOptions, PageType, RegionBitmaps, SnapshotChain,
    SnapshotFile, SnapshotWriter, WriteOptions,
};
use kvm_ioctls::Kvm;
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use super::error::{Error, Result};
use super::memory::{create_guest_memory, enable_dirty_logging, take_dirty_logs};
use super::persist::{MachineState, VcpuState};
use super::snapshot::{
    MemoryRef, MemoryRestoreMode, NamedTransport, RestoreConfig, SnapshotDir, VmSnapshotState,
};
use super::vcpu::{self, Vcpu};
use super::vm::Vm;
use super::Vmm;
use crate::api::{VmSnapshotConfig, VmState};

/// What the last snapshot or restore of this VMM did, for `vm.info` and `vm.counters`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SnapshotFigures {
    /// Pages by type (`unpopulated`, `invalid`, `zero`, `data`, `same_as_parent`).
    pub pages: [u64; 5],
    /// Bytes of the memory file (snapshot) or of data copied/mapped (restore).
    pub bytes: u64,
    /// Bytes the filesystem allocated for the memory file (snapshot only).
    pub allocated_bytes: u64,
    /// Seconds ext-snapshot spent on the memory file (typing and writing, or restoring).
    pub memory_seconds: f64,
    /// Wall-clock seconds of the whole operation (vCPU and device state included).
    pub seconds: f64,
    /// Cloud Hypervisor's way of writing the same memory, when asked for: seconds and
    /// allocated bytes.
    pub baseline: Option<(f64, u64)>,
}

impl SnapshotFigures {
    /// Name/value pairs for `vm.counters` (seconds in microseconds, counters are integers).
    pub fn counters(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = PAGE_TYPE_NAMES
            .iter()
            .zip(self.pages)
            .map(|(name, pages)| (format!("{name}_pages"), pages))
            .collect();
        out.push(("bytes".into(), self.bytes));
        out.push(("allocated_bytes".into(), self.allocated_bytes));
        out.push(("memory_micros".into(), (self.memory_seconds * 1e6) as u64));
        out.push(("micros".into(), (self.seconds * 1e6) as u64));
        if let Some((seconds, allocated)) = self.baseline {
            out.push(("baseline_micros".into(), (seconds * 1e6) as u64));
            out.push(("baseline_allocated_bytes".into(), allocated));
        }
        out
    }

    /// The figures as JSON for `vm.info`.
    pub fn to_json(&self) -> serde_json::Value {
        let pages: serde_json::Map<String, serde_json::Value> = PAGE_TYPE_NAMES
            .iter()
            .zip(self.pages)
            .map(|(name, pages)| (name.to_string(), pages.into()))
            .collect();
        serde_json::json!({
            "pages": pages,
            "bytes": self.bytes,
            "allocated_bytes": self.allocated_bytes,
            "memory_seconds": self.memory_seconds,
            "seconds": self.seconds,
            "baseline": self.baseline.map(|(seconds, allocated)| serde_json::json!({
                "seconds": seconds, "allocated_bytes": allocated,
            })),
        })
    }
}

/// Page type names in `PageType as usize` order.
const PAGE_TYPE_NAMES: [&str; 5] = ["unpopulated", "invalid", "zero", "data", "same_as_parent"];

/// KVM dirty logging for diff snapshots. Logging starts with the first snapshot the VM takes
/// (or when it is restored), not at boot: a VM that is never snapshotted pays nothing, and
/// the first snapshot is a full one anyway.
#[derive(Default)]
pub(super) struct DirtyTracking {
    /// ext-perm's memslot operation count when logging began (`None`: logging is off). ext-perm
    /// re-creates memslots without the logging flag, so a diff is refused once it has.
    perm_operations: Option<u64>,
    /// The snapshot directory the dirty log counts from: the last one written or restored.
    base: Option<PathBuf>,
}

/// Guest memory that came from a snapshot, and what must stay alive for it.
pub(super) enum RestoredMemory {
    /// Ordinary memory: booted, or restored by copy.
    Ready,
    /// Mapped from, or served on demand from, the memory file `source`. Pages the guest has
    /// not touched yet are not resident, so they look never-populated to ext-snapshot's
    /// residency check: before the first snapshot of such a VM they are faulted in
    /// (`populated` records that it was done).
    FromFile {
        /// The memory file the pages come from.
        source: PathBuf,
        /// The userfaultfd handler of an on-demand restore, alive as long as the VMM.
        lazy: Option<LazyRestore>,
        /// The file's data pages were faulted in already.
        populated: std::sync::atomic::AtomicBool,
    },
}

impl RestoredMemory {
    /// Makes every data page of the source file resident in `memory` (once), so a snapshot
    /// of it does not mistake untouched pages for never-populated ones.
    fn make_resident(&self, memory: &GuestMemoryMmap) -> Result<()> {
        use std::sync::atomic::Ordering;
        let RestoredMemory::FromFile {
            source, populated, ..
        } = self
        else {
            return Ok(());
        };
        if populated.load(Ordering::SeqCst) {
            return Ok(());
        }
        let file = SnapshotFile::open(source).map_err(Error::SnapshotMemory)?;
        for (region, guest) in file.regions().iter().zip(memory.iter()) {
            for run in region.runs.iter().filter(|r| r.page_type == PageType::Data) {
                let offset = run.first_page * ext_snapshot::PAGE_SIZE;
                let len = run.pages * ext_snapshot::PAGE_SIZE;
                let host = guest
                    .get_host_address(vm_memory::MemoryRegionAddress(offset))
                    .map_err(|e| Error::Memory(e.to_string()))?;
                // SAFETY: `host..host + len` lies inside the guest region's live mapping
                // (runs are bounded by the region size, checked when the file was opened);
                // MADV_POPULATE_READ only faults pages in, as a guest read would.
                let rc =
                    unsafe { libc::madvise(host.cast(), len as usize, libc::MADV_POPULATE_READ) };
                if rc != 0 {
                    return Err(Error::last_os(
                        "madvise(MADV_POPULATE_READ) restored memory",
                    ));
                }
            }
        }
        populated.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// The userfaultfd handler's live counters (on-demand restores only).
    pub(super) fn counters(&self) -> Option<Vec<(String, u64)>> {
        let RestoredMemory::FromFile {
            lazy: Some(lazy), ..
        } = self
        else {
            return None;
        };
        let stats = lazy.stats();
        Some(vec![
            ("faults".into(), stats.faults),
            ("data_pages_copied".into(), stats.data_pages_copied),
            ("zero_pages_mapped".into(), stats.zero_pages_mapped),
            ("extents_verified".into(), stats.extents_verified),
        ])
    }
}

impl Vmm {
    /// Writes a snapshot of the paused VM to `request.destination_url` (see
    /// [`super::snapshot`]), a diff when `request.parent` names the last snapshot.
    /// `Err(InvalidState)` when the VM is not paused.
    pub fn snapshot(&self, request: &VmSnapshotConfig) -> Result<SnapshotFigures> {
        let started = Instant::now();
        let dir = SnapshotDir::from_url(&request.destination_url)?;
        let parent = request
            .parent
            .as_deref()
            .map(SnapshotDir::from_url)
            .transpose()?;
        let lifecycle = self.lock();
        if lifecycle.state != VmState::Paused {
            return Err(Error::InvalidState(lifecycle.state, "snapshot"));
        }
        let Some((vm_fd, memory)) = lifecycle.booted.as_ref() else {
            return Err(Error::InvalidState(lifecycle.state, "snapshot"));
        };
        if parent.is_none() {
            // A diff needs no residency: its pages are the dirty ones, which are resident.
            self.restored_memory.make_resident(memory)?;
        }
        let vcpus = self.save_vcpus()?;
        let machine = MachineState::save(vm_fd)?;
        let serial = self
            .serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .state();
        let mut virtio = Vec::with_capacity(self.virtio.len());
        let mut device_pages = Vec::new();
        for slot in &self.virtio {
            let mut transport = slot.transport.lock().unwrap_or_else(|p| p.into_inner());
            device_pages.extend(transport.take_written_pages());
            virtio.push(NamedTransport {
                name: slot.name.clone(),
                state: transport.state(),
            });
        }
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(parent) = &parent {
            self.check_diff_base(&dirty, parent)?;
        }
        // Reading the log clears it: from here on it counts from this snapshot, or from
        // nothing if this one fails.
        dirty.base = None;
        let logs = match dirty.perm_operations {
            Some(_) => Some(take_dirty_logs(vm_fd, memory)?),
            None => None,
        };
        let mut state = VmSnapshotState {
            vcpus,
            machine,
            serial,
            virtio,
            memory: MemoryRef::default(),
        };
        dir.create()?;
        let memory_started = Instant::now();
        let writer = SnapshotWriter::new(WriteOptions::default());
        let report = match &parent {
            None => writer.write_file(memory, &dir.memory_path()),
            Some(parent) => {
                let Some(mut logs) = logs else {
                    return Err(Error::Snapshot("dirty logging is off".into()));
                };
                mark_pages(memory, &mut logs, &device_pages);
                let parent_memory =
                    SnapshotFile::open(&parent.memory_path()).map_err(Error::SnapshotMemory)?;
                let bitmaps = RegionBitmaps::new(logs.iter().map(Vec::as_slice).collect());
                state.memory.parent = Some(parent.path().to_path_buf());
                writer
                    .diff_against(&parent_memory, &bitmaps)
                    .write_file(memory, &dir.memory_path())
            }
        }
        .map_err(Error::SnapshotMemory)?;
        let memory_seconds = memory_started.elapsed().as_secs_f64();
        dir.write_state(&self.config, &state)?;
        if dirty.perm_operations.is_none() {
            enable_dirty_logging(vm_fd, memory)?;
            dirty.perm_operations = Some(self.perm_memslot_operations());
        }
        dirty.base = Some(dir.path().to_path_buf());
        let seconds = started.elapsed().as_secs_f64();
        let baseline = if request.cloud_hypervisor_baseline {
            let path = dir.path().join("baseline-memory");
            let written = if self.config.memory_shared {
                holes_only_copy(memory, &path, false)
            } else {
                dense_dump(memory, &path, false)
            }
            .map_err(Error::SnapshotMemory)?;
            Some((written.seconds, written.allocated))
        } else {
            None
        };
        let figures = SnapshotFigures {
            pages: report.pages_by_type,
            bytes: report.output_bytes,
            allocated_bytes: allocated_bytes(&dir.memory_path()),
            memory_seconds,
            seconds,
            baseline,
        };
        tracing::info!(
            "snapshot written to {}: {} data pages, {} bytes, {:.3} s",
            dir.path().display(),
            report.pages(PageType::Data),
            report.output_bytes,
            figures.seconds
        );
        *self.figures.lock().unwrap_or_else(|p| p.into_inner()) = (Some(figures.clone()), None);
        Ok(figures)
    }

    /// A diff is only sound against the snapshot the dirty log counts from, and only while
    /// every memslot still has logging on.
    fn check_diff_base(&self, dirty: &DirtyTracking, parent: &SnapshotDir) -> Result<()> {
        let base = dirty.base.as_deref();
        if base != Some(parent.path()) {
            return Err(Error::Snapshot(format!(
                "parent {} is not the last snapshot this VM took or was restored from ({})",
                parent.path().display(),
                base.map_or("none".into(), |b| b.display().to_string())
            )));
        }
        if dirty.perm_operations != Some(self.perm_memslot_operations()) {
            return Err(Error::Snapshot(
                "ext-perm changed memslots since the parent (their dirty log is gone); take a \
                 full snapshot"
                    .into(),
            ));
        }
        Ok(())
    }

    fn perm_memslot_operations(&self) -> u64 {
        self.perm
            .as_ref()
            .map_or(0, |perm| perm.capabilities().memslot_operations)
    }

    /// Starts dirty logging on a restored VM, counting from the snapshot it came from.
    fn track_dirty_pages_from(&self, dir: &Path) -> Result<()> {
        let lifecycle = self.lock();
        let Some((vm_fd, memory)) = lifecycle.booted.as_ref() else {
            return Err(Error::InvalidState(lifecycle.state, "track dirty pages"));
        };
        enable_dirty_logging(vm_fd, memory)?;
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        dirty.perm_operations = Some(self.perm_memslot_operations());
        dirty.base = Some(dir.to_path_buf());
        Ok(())
    }

    /// Each parked vCPU thread reads its own vCPU's state.
    fn save_vcpus(&self) -> Result<Vec<VcpuState>> {
        let kvm = Arc::new(Kvm::new().map_err(|e| Error::Kvm("open /dev/kvm", e))?);
        let results: Arc<Mutex<Vec<Result<VcpuState>>>> = Arc::default();
        let sink = results.clone();
        let work = Arc::new(move |vcpu: &Vcpu| {
            let state = VcpuState::save(&kvm, &vcpu.fd, vcpu.id);
            sink.lock().unwrap_or_else(|p| p.into_inner()).push(state);
        });
        let done = vcpu::run_on_parked(&self.control, work);
        let mut states = std::mem::take(&mut *results.lock().unwrap_or_else(|p| p.into_inner()))
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        if done != usize::from(self.config.cpus) || states.len() != done {
            return Err(Error::Snapshot(format!(
                "{done} of {} vCPU threads answered; a vCPU that stopped cannot be saved",
                self.config.cpus
            )));
        }
        states.sort_by_key(|s| s.id);
        Ok(states)
    }

    /// Builds a VMM from a snapshot: validates everything, restores memory in the requested
    /// mode, re-creates the VM and its devices from the saved state, and starts the vCPU
    /// threads paused (or running with `resume`).
    pub fn restore(restore: &RestoreConfig) -> Result<Self> {
        let started = Instant::now();
        let loaded = SnapshotDir::from_url(&restore.source_url)?.load()?;
        let config = loaded.config.clone();
        let (memory, restored, mut figures) =
            restore_memory(&loaded.memory_chain, restore.memory_restore_mode, &config)?;
        vcpu::register_kick_handler()?;
        let vm = Vm::restore(&config, memory, &loaded.state)?;
        let vmm = Vmm::from_vm(config, vm, restored);
        vmm.boot_paused()?;
        vmm.track_dirty_pages_from(loaded.dir.path())?;
        figures.seconds = started.elapsed().as_secs_f64();
        tracing::info!(
            "restored from {} ({:?}) in {:.3} s",
            loaded.dir.path().display(),
            restore.memory_restore_mode,
            figures.seconds
        );
        *vmm.figures.lock().unwrap_or_else(|p| p.into_inner()) = (None, Some(figures));
        if restore.resume {
            vmm.resume()?;
        }
        Ok(vmm)
    }

    /// Starts the vCPU threads of a restored VM parked (Created → Paused).
    fn boot_paused(&self) -> Result<()> {
        vcpu::hold_before_start(&self.control);
        self.boot()?;
        let mut lifecycle = self.lock();
        vcpu::pause_all(&self.control, &lifecycle.handles);
        lifecycle.state = VmState::Paused;
        self.state_changed.notify_all();
        Ok(())
    }
}

/// Bytes the filesystem allocated for `path` (0 if it cannot be read).
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// Adds guest frames `pages` to the per-region bitmaps `logs` (region order of `memory`).
fn mark_pages(memory: &GuestMemoryMmap, logs: &mut [Vec<u64>], pages: &[u64]) {
    for &gfn in pages {
        let address = GuestAddress(gfn * ext_snapshot::PAGE_SIZE);
        for (index, region) in memory.iter().enumerate() {
            if let Some(offset) = address.checked_offset_from(region.start_addr()) {
                if offset < region.len() {
                    let page = (offset / ext_snapshot::PAGE_SIZE) as usize;
                    if let Some(word) = logs.get_mut(index).and_then(|l| l.get_mut(page / 64)) {
                        *word |= 1 << (page % 64);
                    }
                }
            }
        }
    }
}

/// Fills new guest memory from the snapshot's memory files (oldest first).
fn restore_memory(
    chain: &[std::path::PathBuf],
    mode: MemoryRestoreMode,
    config: &super::config::VmConfig,
) -> Result<(GuestMemoryMmap, RestoredMemory, SnapshotFigures)> {
    let eager = EagerOptions {
        target_is_fresh: true,
        threads: 2,
    };
    let mut figures = SnapshotFigures::default();
    let started = Instant::now();
    let [path] = chain else {
        if mode != MemoryRestoreMode::Copy {
            return Err(Error::Snapshot(format!(
                "a diff snapshot ({} layers) restores with memory_restore_mode=copy only",
                chain.len()
            )));
        }
        let chain = SnapshotChain::open(chain).map_err(Error::SnapshotMemory)?;
        let memory = create_guest_memory(config.memory_size, config.memory_shared)?;
        let report = restore_chain_eager(&chain, &memory, eager).map_err(Error::SnapshotMemory)?;
        figures.pages[PageType::Data as usize] = report.data_pages;
        figures.bytes = report.data_pages * ext_snapshot::PAGE_SIZE;
        figures.memory_seconds = started.elapsed().as_secs_f64();
        return Ok((memory, RestoredMemory::Ready, figures));
    };
    let file = SnapshotFile::open(path).map_err(Error::SnapshotMemory)?;
    figures.pages = file.pages_by_type();
    figures.bytes = file.data_bytes();
    drop(file);
    if mode != MemoryRestoreMode::Copy && config.memory_shared {
        tracing::warn!("memory_restore_mode={mode:?} gives private memory; shared=on is not kept");
    }
    match mode {
        MemoryRestoreMode::Copy => {
            let file = SnapshotFile::open(path).map_err(Error::SnapshotMemory)?;
            let memory = create_guest_memory(config.memory_size, config.memory_shared)?;
            restore_eager(&file, &memory, eager).map_err(Error::SnapshotMemory)?;
            figures.memory_seconds = started.elapsed().as_secs_f64();
            Ok((memory, RestoredMemory::Ready, figures))
        }
        MemoryRestoreMode::Mapped => {
            let (memory, _report) = restore_mapped(path, MappedOptions { verify_data: true })
                .map_err(Error::SnapshotMemory)?;
            figures.memory_seconds = started.elapsed().as_secs_f64();
            let restored = RestoredMemory::FromFile {
                source: path.clone(),
                lazy: None,
                populated: Default::default(),
            };
            Ok((memory, restored, figures))
        }
        MemoryRestoreMode::OnDemand => {
            let lazy = restore_lazy(path).map_err(Error::SnapshotMemory)?;
            let memory = lazy.memory().clone();
            figures.memory_seconds = started.elapsed().as_secs_f64();
            let restored = RestoredMemory::FromFile {
                source: path.clone(),
                lazy: Some(lazy),
                populated: Default::default(),
            };
            Ok((memory, restored, figures))
        }
    }
}
