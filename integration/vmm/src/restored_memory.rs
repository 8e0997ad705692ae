//! Guest memory of a restored VM: filled from the snapshot's memory files in the requested
//! mode (ext-snapshot's eager, mapped or lazy restore, or a lazy restore served by a
//! `vhost-user-mem serve` page server in another process), and what must stay alive with it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ext_snapshot::restore::lazy::{restore_lazy_with_hook, LazyRestore};
use ext_snapshot::restore::mapped::{restore_mapped, MappedOptions};
use ext_snapshot::{
    restore_chain_eager, restore_eager, EagerOptions, PageType, SnapshotChain, SnapshotFile,
};
use vhost_user_mem::page_server::client::{connect_memory, PageServerConnection};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryRegion, MemoryRegionAddress};

use super::config::VmConfig;
use super::error::{Error, Result};
use super::exit::{ExitEvent, ExitReason};
use super::figures::SnapshotFigures;
use super::memory::{create_guest_memory, GuestRam};
use ext_snapshot::RestoreMode;

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
        lazy: Option<LazyRestore<AtomicBitmap>>,
        /// The page server serving an on-demand restore instead, connected as long as the
        /// VMM (its userfaultfd must outlive every use of the memory).
        page_server: Option<PageServerConnection>,
        /// Where that handler's (or page server's) failure goes: the VM's exit event.
        failure: Arc<LazyFailure>,
        /// The file's data pages were faulted in already.
        populated: AtomicBool,
    },
}

/// An on-demand restore's handler (or page server) failure, delivered to the VM's exit event (the VM ends with
/// that error) once the VM exists; a failure before that is kept and delivered on attach.
#[derive(Default)]
pub(super) struct LazyFailure {
    /// The VM's exit event, and a failure that came before it.
    state: Mutex<(Option<Arc<ExitEvent>>, Option<String>)>,
}

impl LazyFailure {
    fn report(&self, error: &str) {
        let message = format!("on-demand restore failed, the VM is stopped: {error}");
        tracing::error!("{message}");
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match &state.0 {
            Some(exit) => exit.request(ExitReason::Error(message)),
            None => state.1 = Some(message),
        }
    }

    fn attach(&self, exit: Arc<ExitEvent>) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(message) = state.1.take() {
            exit.request(ExitReason::Error(message));
        }
        state.0 = Some(exit);
    }
}

impl RestoredMemory {
    /// Hands an on-demand restore's failures to the VM's exit event.
    pub(super) fn attach_exit(&self, exit: &Arc<ExitEvent>) {
        if let RestoredMemory::FromFile { failure, .. } = self {
            failure.attach(exit.clone());
        }
    }

    /// Makes every data page of the source file resident in `memory` (once), so a snapshot
    /// of it does not mistake untouched pages for never-populated ones.
    pub(super) fn make_resident(&self, memory: &GuestRam) -> Result<()> {
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
                    .get_host_address(MemoryRegionAddress(offset))
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

    /// The userfaultfd handler's live counters (on-demand restores only; for one served by a
    /// page server, whether the server is still serving).
    pub(super) fn counters(&self) -> Option<Vec<(String, u64)>> {
        if let RestoredMemory::FromFile {
            page_server: Some(server),
            ..
        } = self
        {
            return Some(vec![
                ("page_server".into(), 1),
                (
                    "page_server_failed".into(),
                    u64::from(server.failure().is_some()),
                ),
                ("snapshot_data_pages".into(), server.accepted().data_pages),
            ]);
        }
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

/// Fills new guest memory from the snapshot's memory files (oldest first). Its dirty bitmaps
/// may hold the restore's own writes (an eager restore writes through vm-memory); dirty
/// tracking clears them when it starts on the restored VM. With `page_server` (on-demand
/// only), the page server at that socket serves the faults.
pub(super) fn restore_memory(
    chain: &[std::path::PathBuf],
    mode: RestoreMode,
    page_server: Option<&Path>,
    config: &VmConfig,
) -> Result<(GuestRam, RestoredMemory, SnapshotFigures)> {
    let eager = EagerOptions {
        target_is_fresh: true,
        threads: 2,
    };
    let mut figures = SnapshotFigures::default();
    let started = Instant::now();
    let [path] = chain else {
        if mode != RestoreMode::Eager {
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
    if let Some(socket) = page_server {
        if mode != RestoreMode::Lazy {
            return Err(Error::InvalidOption(
                "page_server needs memory_restore_mode=ondemand".into(),
            ));
        }
        let (memory, restored) = serve_from_page_server(&file, socket, config)?;
        figures.memory_seconds = started.elapsed().as_secs_f64();
        return Ok((memory, restored, figures));
    }
    drop(file);
    if mode != RestoreMode::Eager && config.memory_shared {
        tracing::warn!("memory_restore_mode={mode:?} gives private memory; shared=on is not kept");
    }
    match mode {
        RestoreMode::Eager => {
            let file = SnapshotFile::open(path).map_err(Error::SnapshotMemory)?;
            let memory = create_guest_memory(config.memory_size, config.memory_shared)?;
            restore_eager(&file, &memory, eager).map_err(Error::SnapshotMemory)?;
            figures.memory_seconds = started.elapsed().as_secs_f64();
            Ok((memory, RestoredMemory::Ready, figures))
        }
        RestoreMode::Mapped => {
            let (memory, _report) = restore_mapped(path, MappedOptions { verify_data: true })
                .map_err(Error::SnapshotMemory)?;
            figures.memory_seconds = started.elapsed().as_secs_f64();
            let restored = RestoredMemory::FromFile {
                source: path.clone(),
                lazy: None,
                page_server: None,
                failure: Arc::default(),
                populated: Default::default(),
            };
            Ok((memory, restored, figures))
        }
        RestoreMode::Lazy => {
            let failure = Arc::new(LazyFailure::default());
            let sink = failure.clone();
            let lazy = restore_lazy_with_hook::<AtomicBitmap>(
                path,
                Box::new(move |error| sink.report(error)),
            )
            .map_err(Error::SnapshotMemory)?;
            let memory = lazy.memory().clone();
            figures.memory_seconds = started.elapsed().as_secs_f64();
            let restored = RestoredMemory::FromFile {
                source: path.clone(),
                lazy: Some(lazy),
                page_server: None,
                failure,
                populated: Default::default(),
            };
            Ok((memory, restored, figures))
        }
    }
}

/// Fresh memory with the snapshot's regions (a memfd with `shared=on`), registered with a
/// userfaultfd that the page server at `socket` serves (this process serves no fault). The
/// server checks the region table and the snapshot identity; its refusal is the restore's error, and a later
/// failure (or its disappearance) ends the VM through [`LazyFailure`].
fn serve_from_page_server(
    file: &SnapshotFile,
    socket: &Path,
    config: &VmConfig,
) -> Result<(GuestRam, RestoredMemory)> {
    if file.is_diff() {
        return Err(Error::Snapshot(
            "a diff snapshot restores with memory_restore_mode=copy only".into(),
        ));
    }
    let ranges = file
        .layout()
        .into_iter()
        .map(|(addr, size)| {
            usize::try_from(size)
                .map(|size| (GuestAddress(addr), size))
                .map_err(|_| Error::Memory(format!("region of {size:#x} bytes")))
        })
        .collect::<Result<Vec<_>>>()?;
    // shared=on (a vhost-user backend maps guest memory) keeps its memfd: userfaultfd's missing
    // mode works on shmem, and a page the backend punches later faults again and reads as 0.
    let memory = if config.memory_shared {
        let memory = create_guest_memory(config.memory_size, true)?;
        let layout: Vec<(GuestAddress, usize)> = memory
            .iter()
            .map(|r| (r.start_addr(), r.len() as usize))
            .collect();
        if layout != ranges {
            return Err(Error::Snapshot(format!(
                "the snapshot's regions {ranges:?} are not the layout of {} bytes of memory",
                config.memory_size
            )));
        }
        memory
    } else {
        GuestRam::from_ranges(&ranges).map_err(|e| Error::Memory(e.to_string()))?
    };
    let failure = Arc::new(LazyFailure::default());
    let sink = failure.clone();
    let snapshot_id = file.header().id.to_string();
    let connection = connect_memory(
        socket,
        &memory,
        Some(&snapshot_id),
        Box::new(move |error| sink.report(error)),
    )
    .map_err(|e| Error::Snapshot(format!("page server {}: {e}", socket.display())))?;
    tracing::info!(
        "on-demand restore of {} served by the page server at {}",
        file.path().display(),
        socket.display()
    );
    let restored = RestoredMemory::FromFile {
        source: file.path().to_path_buf(),
        lazy: None,
        page_server: Some(connection),
        failure,
        populated: Default::default(),
    };
    Ok((memory, restored))
}
