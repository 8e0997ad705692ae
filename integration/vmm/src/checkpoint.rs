//! `vm.snapshot` and restore for [`Vmm`]: collects the state of a paused VM (vCPU state read by
//! each parked vCPU thread on its own vCPU, VM and device state, memory through ext-snapshot)
//! and builds a new VM from a validated snapshot directory in one of the three memory modes.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ext_snapshot::{
    GfnBitmap, PageType, RegionBitmaps, RestoreMode, SnapshotFile, SnapshotWriter, WriteOptions,
};
use kvm_ioctls::Kvm;

use super::error::{Error, Result};
use super::figures::SnapshotFigures;
use super::memory::{enable_dirty_logging, take_dirty_logs};
use super::persist::{MachineState, VcpuState};
use super::restored_memory::restore_memory;
use super::snapshot::{MemoryRef, NamedTransport, RestoreConfig, SnapshotDir, VmSnapshotState};
use super::vcpu::{self, Vcpu};
use super::vm::Vm;
use super::Vmm;
use ext_vmm_api::{VmSnapshotConfig, VmState};

/// Dirty-page tracking for diff snapshots: KVM's dirty log (pages vCPUs write) and the guest
/// memory's vm-memory dirty bitmaps (pages the VMM's devices write), started, read and reset
/// together by [`enable_dirty_logging`] and [`take_dirty_logs`]. Logging starts with the
/// first snapshot the VM takes (or when it is restored), not at boot: a VM that is never
/// snapshotted pays nothing, and the first snapshot is a full one anyway.
#[derive(Default)]
pub(super) struct DirtyTracking {
    /// ext-perm's memslot operation count when logging began (`None`: logging is off). ext-perm
    /// re-creates memslots without the logging flag, so a diff is refused once it has.
    perm_operations: Option<u64>,
    /// The snapshot directory the dirty log counts from: the last one written or restored.
    base: Option<PathBuf>,
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
        for slot in &self.virtio {
            let transport = slot.transport.lock().unwrap_or_else(|p| p.into_inner());
            virtio.push(NamedTransport {
                name: slot.name.clone(),
                state: transport.state(),
            });
        }
        let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(parent) = &parent {
            self.check_diff_base(&dirty, parent)?;
        }
        // Reading the log clears it (KVM's log and the memory's dirty bitmaps alike): from
        // here on it counts from this snapshot, or from nothing if this one fails.
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
        let invalid_map = crate::invalid_pages::fetch(&self.config.vhost_user);
        let invalid = invalid_map
            .as_ref()
            .map(|map| GfnBitmap::new(map.gfn_words()));
        let mut writer = SnapshotWriter::new(WriteOptions::default());
        if let Some(invalid) = invalid.as_ref() {
            writer = writer.invalid_pages(invalid);
        }
        let report = match &parent {
            None => writer.write_file(memory, &dir.memory_path()),
            Some(parent) => {
                let Some(logs) = logs else {
                    return Err(Error::Snapshot("dirty logging is off".into()));
                };
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
        let figures = SnapshotFigures {
            pages: report.pages_by_type,
            bytes: report.output_bytes,
            allocated_bytes: allocated_bytes(&dir.memory_path()),
            memory_seconds,
            seconds,
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
        let mut config = loaded.config.clone();
        if let Some(serial) = &restore.serial {
            config.serial = serial.clone();
        }
        let keeps_memfd = restore.memory_restore_mode == RestoreMode::Eager
            || (restore.memory_restore_mode == RestoreMode::Lazy && restore.page_server.is_some());
        if !config.vhost_user.is_empty() && !keeps_memfd {
            return Err(Error::Unsupported(
                "a VM with vhost-user devices restores with memory_restore_mode=copy, or \
                 ondemand with page_server=: mapped and in-process ondemand restores give \
                 private memory, which a vhost-user backend cannot map"
                    .into(),
            ));
        }
        let (memory, restored, mut figures) = restore_memory(
            &loaded.memory_chain,
            restore.memory_restore_mode,
            restore.page_server.as_deref(),
            &config,
        )?;
        vcpu::register_kick_handler()?;
        let vm = Vm::restore(&config, memory, &loaded.state)?;
        restored.attach_exit(&vm.exit);
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
