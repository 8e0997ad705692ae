//! Lazy restore: guest memory filled on first touch by a userfaultfd handler thread.
//!
//! Each region is a fresh anonymous mapping owned by `vm-memory`, registered with a
//! userfaultfd in missing mode. Setup validates the snapshot's structure, maps the snapshot
//! file read-only and starts one handler thread; no guest page is written, so a restore of
//! any size is ready in milliseconds. When a vCPU (or anything else) first touches a page:
//!
//! * in a data run: the handler checks the extent's crc32c the first time the extent is used,
//!   then copies (`UFFDIO_COPY`) the whole not-yet-served stretch of the run around the fault,
//!   up to 4 MiB, because guests touch neighbouring pages next;
//! * anywhere else (never populated, invalid, zero): `UFFDIO_ZEROPAGE` for that page only —
//!   invalid pages are never prefaulted, and a read maps the shared zero page, so they cost the
//!   host no memory until the guest writes them.
//!
//! Pages the guest later discards (`MADV_DONTNEED`/`MADV_REMOVE` by a balloon) are reported as
//! remove events and served as zero from then on, never as stale snapshot data. The handler
//! stops by itself when the last clone of the guest memory is dropped: `vm-memory` unmaps the
//! regions and the handler receives the unmap events.
//!
//! If the handler fails (an I/O error, a corrupt extent) or panics, the page it was serving
//! stays unresolved and no other fault is answered: a guest never reads zeros where its data
//! was. The handler records the error ([`LazyRestore::failure`], [`LazyRestore::finish`]) and
//! calls the caller's failure hook ([`restore_lazy_with_hook`]), with which a VMM ends the VM
//! with that error. Only once the caller drops the [`LazyRestore`] (or after
//! [`FAILURE_GRACE`], so that threads blocked in faults cannot hang a VMM that is stopping
//! them) does it close the userfaultfd, which wakes every blocked fault.
//!
//! The fault loop itself is [`FaultHandler`], public so that a process that receives a
//! userfaultfd from a VMM (the `vhost-user-mem` page server) serves it the same way.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use userfaultfd::{Event, FeatureFlags, IoctlFlags, Uffd, UffdBuilder};
use vm_memory::bitmap::{Bitmap, NewBitmap};
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::error::{Error, Result};
use crate::format::{Run, PAGE_SIZE};
use crate::page_type::PageType;
use crate::reader::SnapshotFile;

/// Counters of a lazy restore, readable while it runs.
#[derive(Debug, Default)]
pub struct LazyCounters {
    /// Page faults served.
    pub faults: AtomicU64,
    /// Pages copied from the snapshot (`UFFDIO_COPY`).
    pub data_pages_copied: AtomicU64,
    /// Pages resolved with the zero page (`UFFDIO_ZEROPAGE`).
    pub zero_pages_mapped: AtomicU64,
    /// Data extents whose checksum was verified.
    pub extents_verified: AtomicU64,
}

/// A snapshot of [`LazyCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LazyStats {
    /// Page faults served.
    pub faults: u64,
    /// Pages copied from the snapshot.
    pub data_pages_copied: u64,
    /// Pages resolved with the zero page.
    pub zero_pages_mapped: u64,
    /// Data extents whose checksum was verified.
    pub extents_verified: u64,
}

impl LazyCounters {
    fn stats(&self) -> LazyStats {
        LazyStats {
            faults: self.faults.load(Ordering::Relaxed),
            data_pages_copied: self.data_pages_copied.load(Ordering::Relaxed),
            zero_pages_mapped: self.zero_pages_mapped.load(Ordering::Relaxed),
            extents_verified: self.extents_verified.load(Ordering::Relaxed),
        }
    }
}

/// How long a failed handler keeps faults blocked while its caller stops the threads that
/// touch guest memory; after that it closes the userfaultfd so none of them hangs.
pub const FAILURE_GRACE: Duration = Duration::from_secs(2);

/// Called once, from the handler thread, with the error when the handler fails or panics.
pub type FailureHook = Box<dyn FnOnce(&str) + Send>;

/// Guest memory being restored lazily, and the handler thread serving it. `B` is the dirty
/// bitmap of its regions (`()` for none); pages the handler fills are not marked in it.
pub struct LazyRestore<B: Bitmap = ()> {
    memory: Option<GuestMemoryMmap<B>>,
    handler: Option<JoinHandle<()>>,
    counters: Arc<LazyCounters>,
    failure: Arc<Mutex<Option<String>>>,
    /// Set when this handle goes away: a failed handler may close the userfaultfd.
    released: Arc<(Mutex<bool>, Condvar)>,
}

impl<B: Bitmap> LazyRestore<B> {
    /// The restored guest memory. Clones may be kept: the handler serves faults until the last
    /// clone is dropped.
    pub fn memory(&self) -> &GuestMemoryMmap<B> {
        // `memory` is only taken by `finish`, which consumes `self`.
        self.memory
            .as_ref()
            .unwrap_or_else(|| unreachable!("memory taken before finish"))
    }

    /// Live counters of the handler.
    pub fn stats(&self) -> LazyStats {
        self.counters.stats()
    }

    /// Why the handler stopped early, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }

    /// Drops this handle's guest memory and waits for the handler to stop, which happens when
    /// every clone of the memory is gone. Returns the final counters, or the handler's failure.
    pub fn finish(mut self) -> Result<LazyStats> {
        drop(self.memory.take());
        self.release();
        if let Some(handler) = self.handler.take() {
            handler
                .join()
                .map_err(|_| Error::UnsupportedMemory("lazy restore handler panicked".into()))?;
        }
        match self.failure() {
            Some(failure) => Err(Error::UnsupportedMemory(format!(
                "lazy restore handler failed: {failure}"
            ))),
            None => Ok(self.counters.stats()),
        }
    }
}

impl<B: Bitmap> LazyRestore<B> {
    fn release(&self) {
        let (released, changed) = &*self.released;
        *released.lock().unwrap_or_else(|p| p.into_inner()) = true;
        changed.notify_all();
    }
}

impl<B: Bitmap> Drop for LazyRestore<B> {
    fn drop(&mut self) {
        // Dropping the memory unmaps it unless clones live on; the handler exits on its own
        // once the last region is unmapped, so it is not joined here (that could block).
        drop(self.memory.take());
        self.release();
    }
}

/// A read-only shared mapping of the whole snapshot file: the source of `UFFDIO_COPY`.
struct FileMap {
    address: *mut u8,
    len: usize,
    /// The mapped file, to check its length before reading an extent.
    file: File,
}

// SAFETY: the mapping is read-only and owned by this value alone; sending it to the handler
// thread moves that ownership.
unsafe impl Send for FileMap {}

impl FileMap {
    fn new(file: &File) -> Result<Self> {
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat snapshot file", e))?
            .len();
        let len = usize::try_from(len).map_err(|_| {
            Error::UnsupportedMemory("snapshot larger than the address space".into())
        })?;
        // SAFETY: a new read-only shared mapping chosen by the kernel (no MAP_FIXED), of a valid
        // descriptor; it aliases no Rust object.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(Error::io(
                "mapping the snapshot file",
                std::io::Error::last_os_error(),
            ));
        }
        Ok(FileMap {
            address: address.cast(),
            len,
            file: file
                .try_clone()
                .map_err(|e| Error::io("dup snapshot file", e))?,
        })
    }

    /// The bytes of the mapping that are still backed by the file now.
    fn readable_len(&self) -> Result<u64> {
        let now = self
            .file
            .metadata()
            .map_err(|e| Error::io("stat snapshot file", e))?
            .len();
        Ok(now.min(self.len as u64))
    }

    /// The bytes `[offset, offset + len)`; `Err(Truncated)` if they are not all in the mapping
    /// (the file was shorter when mapped than its extents say).
    fn bytes(&self, offset: u64, len: u64) -> Result<&[u8]> {
        offset
            .checked_add(len)
            .filter(|&end| end <= self.len as u64)
            .ok_or_else(|| {
                Error::Truncated(format!(
                    "extent at {offset:#x} of {len:#x} bytes is past the end of the snapshot"
                ))
            })?;
        // SAFETY: in bounds (checked above) of a live read-only mapping owned by `self`. The
        // file is a snapshot nobody writes while it is restored; a truncation by another
        // process would raise SIGBUS, not undefined behaviour in safe code reading it (the
        // handler checks the file's length before it first reads an extent).
        Ok(unsafe { std::slice::from_raw_parts(self.address.add(offset as usize), len as usize) })
    }
}

impl Drop for FileMap {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping created in `new`; no slice from `bytes` outlives
        // `self`.
        unsafe { libc::munmap(self.address.cast(), self.len) };
    }
}

/// What the handler knows about one registered region.
struct RegionState {
    host_start: usize,
    size: u64,
    runs: Vec<Run>,
    served: Vec<u64>,
    discarded: Vec<u64>,
    verified: Vec<bool>,
    unmapped: bool,
}

impl RegionState {
    fn contains(&self, address: usize) -> bool {
        !self.unmapped
            && address >= self.host_start
            && address - self.host_start < self.size as usize
    }

    fn page_address(&self, page: u64) -> usize {
        self.host_start + (page * PAGE_SIZE) as usize
    }

    /// Whether `page` can still be copied from the snapshot: not served, not discarded.
    fn copyable(&self, page: u64) -> bool {
        !bit(&self.served, page) && !bit(&self.discarded, page)
    }
}

fn bit(bits: &[u64], page: u64) -> bool {
    bits[(page / 64) as usize] & (1 << (page % 64)) != 0
}

fn set_bits(bits: &mut [u64], first: u64, count: u64) {
    for page in first..first + count {
        bits[(page / 64) as usize] |= 1 << (page % 64);
    }
}

/// `Err(NeedsParent)` for a snapshot that cannot be restored on its own.
fn check_standalone(snapshot: &SnapshotFile) -> Result<()> {
    let same_as_parent = snapshot
        .regions()
        .iter()
        .flat_map(|r| &r.runs)
        .any(|run| run.page_type == PageType::SameAsParent);
    if snapshot.is_diff() || same_as_parent {
        return Err(Error::NeedsParent);
    }
    Ok(())
}

/// Restores the snapshot file at `path` lazily. The snapshot's structure is validated before
/// any memory is created; data extents are verified when first used. The regions carry a
/// fresh, clean dirty bitmap of type `B` (`()` for none).
pub fn restore_lazy<B: NewBitmap>(path: &Path) -> Result<LazyRestore<B>> {
    restore_lazy_with_hook(path, Box::new(|_| {}))
}

/// [`restore_lazy`], calling `on_failure` (once, from the handler thread) if the handler
/// fails or panics later, so that the caller can stop whatever runs on the memory.
pub fn restore_lazy_with_hook<B: NewBitmap>(
    path: &Path,
    on_failure: FailureHook,
) -> Result<LazyRestore<B>> {
    let snapshot = SnapshotFile::open(path)?;
    check_standalone(&snapshot)?;
    let uffd = create_userfaultfd()?;

    let mut guest_regions = Vec::with_capacity(snapshot.regions().len());
    let mut host_starts = Vec::with_capacity(snapshot.regions().len());
    for region in snapshot.regions() {
        let size = usize::try_from(region.size)
            .map_err(|_| Error::UnsupportedMemory(format!("region of {:#x} bytes", region.size)))?;
        let mapping =
            MmapRegion::<B>::new(size).map_err(|e| Error::UnsupportedMemory(e.to_string()))?;
        register_missing(&uffd, mapping.as_ptr(), size)?;
        host_starts.push(mapping.as_ptr() as usize);
        guest_regions.push(
            GuestRegionMmap::new(mapping, GuestAddress(region.guest_addr)).ok_or_else(|| {
                Error::UnsupportedMemory(format!(
                    "region at {:#x} overflows the guest address space",
                    region.guest_addr
                ))
            })?,
        );
    }
    let memory = GuestMemoryMmap::from_regions(guest_regions)
        .map_err(|e| Error::UnsupportedMemory(e.to_string()))?;

    let mut handler = FaultHandler::new(&snapshot, uffd, &host_starts)?;
    let counters = handler.counters();
    let failure = Arc::new(Mutex::new(None));
    let thread_failure = Arc::clone(&failure);
    let released = Arc::new((Mutex::new(false), Condvar::new()));
    let thread_released = Arc::clone(&released);
    let thread = std::thread::Builder::new()
        .name("snapshot-lazy".into())
        .spawn(move || {
            let outcome = panic::catch_unwind(AssertUnwindSafe(|| handler.run()));
            let error = match outcome {
                Ok(Ok(())) => return,
                Ok(Err(error)) => error.to_string(),
                Err(panic) => format!(
                    "the handler panicked: {}",
                    panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default()
                ),
            };
            if let Ok(mut slot) = thread_failure.lock() {
                *slot = Some(error.clone());
            }
            on_failure(&error);
            // Faults stay blocked (the guest reads nothing it should not) until the caller
            // lets go or the grace time is up; then dropping the handler closes the
            // userfaultfd, which wakes every pending fault.
            let (lock, changed) = &*thread_released;
            let released = lock.lock().unwrap_or_else(|p| p.into_inner());
            let _wait = changed.wait_timeout_while(released, FAILURE_GRACE, |released| !*released);
            drop(handler);
        })
        .map_err(|e| Error::io("spawning the lazy restore handler", e))?;
    Ok(LazyRestore {
        memory: Some(memory),
        handler: Some(thread),
        counters,
        failure,
        released,
    })
}

/// A new userfaultfd (close-on-exec, non-blocking) with the remove and unmap events a
/// [`FaultHandler`] needs to serve discarded pages as zero and to notice unmapped memory.
pub fn create_userfaultfd() -> Result<Uffd> {
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(FeatureFlags::EVENT_UNMAP | FeatureFlags::EVENT_REMOVE)
        .create()
        .map_err(|e| Error::UnsupportedMemory(format!("userfaultfd: {e}")))
}

/// Registers the `len` bytes at `start` with `uffd` in missing mode; `Err` unless the kernel
/// offers `UFFDIO_COPY` and `UFFDIO_ZEROPAGE` there.
pub fn register_missing(uffd: &Uffd, start: *mut u8, len: usize) -> Result<()> {
    let registered = uffd
        .register(start.cast(), len)
        .map_err(|e| Error::UnsupportedMemory(format!("userfaultfd register: {e}")))?;
    if !registered.contains(IoctlFlags::COPY | IoctlFlags::ZEROPAGE) {
        return Err(Error::UnsupportedMemory(
            "userfaultfd lacks UFFDIO_COPY or UFFDIO_ZEROPAGE".into(),
        ));
    }
    Ok(())
}

/// How long a fault whose `UFFDIO_COPY` or `UFFDIO_ZEROPAGE` met a changing address space
/// (`EAGAIN`: a remove or unmap event not read yet) waits before it is tried again.
pub const DEFERRED_RETRY: Duration = Duration::from_millis(1);

/// Serves the page faults of memory registered with a userfaultfd (missing mode) from a
/// snapshot file: the fault loop of [`restore_lazy`], usable by any process that holds the
/// userfaultfd, including one that received it from the VMM over a unix socket (the
/// `vhost-user-mem` page server).
///
/// Data pages are copied (`UFFDIO_COPY`) after their extent's crc32c was checked on first use,
/// a stretch of not yet served pages of the faulting run at once (at most
/// [`set_max_copy_pages`](Self::set_max_copy_pages) pages); other pages, and pages the guest
/// discarded since (remove events), get the zero page (`UFFDIO_ZEROPAGE`), only the faulting
/// one. A copy that meets a changing address space (`EAGAIN`) is retried after the pending
/// events are read; a page that is already present (`EEXIST`) just wakes its waiter. When the
/// faulting process is gone (`ESRCH`) every region counts as unmapped.
///
/// An `Err` from any method means the handler failed: the fault it was serving stays
/// unresolved, and no further fault should be served (never a zero page where data was). The
/// faulting threads stay blocked until the userfaultfd is closed by every holder.
pub struct FaultHandler {
    uffd: Uffd,
    source: FileMap,
    regions: Vec<RegionState>,
    counters: Arc<LazyCounters>,
    max_copy_pages: u64,
    /// Faults whose resolution met `EAGAIN`, to try again.
    deferred: Vec<usize>,
    /// Background copy position `(region, run)`; `None` when off or done.
    prefault: Option<(usize, usize)>,
}

impl FaultHandler {
    /// A handler for `uffd`, with region `i` of `snapshot` mapped at `host_starts[i]` in the
    /// process that registered it (the whole region, in missing mode). Puts `uffd` into
    /// non-blocking mode. `Err(NeedsParent)` for a diff, `Err(RegionMismatch)` when
    /// `host_starts` does not have one page-aligned address per region.
    pub fn new(snapshot: &SnapshotFile, uffd: Uffd, host_starts: &[usize]) -> Result<Self> {
        check_standalone(snapshot)?;
        if host_starts.len() != snapshot.regions().len() {
            return Err(Error::RegionMismatch(format!(
                "{} host addresses for {} snapshot regions",
                host_starts.len(),
                snapshot.regions().len()
            )));
        }
        set_non_blocking(&uffd)?;
        let source = FileMap::new(snapshot.file())?;
        let mut regions = Vec::with_capacity(host_starts.len());
        for (region, &host_start) in snapshot.regions().iter().zip(host_starts) {
            let fits = usize::try_from(region.size)
                .ok()
                .and_then(|size| host_start.checked_add(size))
                .is_some();
            if host_start == 0 || host_start as u64 % PAGE_SIZE != 0 || !fits {
                return Err(Error::RegionMismatch(format!(
                    "host address {host_start:#x} for the region at {:#x} of {:#x} bytes",
                    region.guest_addr, region.size
                )));
            }
            let words = region.pages().div_ceil(64) as usize;
            regions.push(RegionState {
                host_start,
                size: region.size,
                served: vec![0; words],
                discarded: vec![0; words],
                verified: vec![false; region.runs.len()],
                runs: region.runs.clone(),
                unmapped: false,
            });
        }
        Ok(FaultHandler {
            uffd,
            source,
            regions,
            counters: Arc::default(),
            max_copy_pages: crate::format::MAX_DATA_RUN_PAGES,
            deferred: Vec::new(),
            prefault: None,
        })
    }

    /// Copies at most `pages` pages (at least 1) per `UFFDIO_COPY`. The default is a whole
    /// data run (up to 4 MiB).
    pub fn set_max_copy_pages(&mut self, pages: u64) {
        self.max_copy_pages = pages.max(1);
    }

    /// Turns on the background copy of every data page: [`prefault_step`](Self::prefault_step)
    /// then copies the next stretch. Pages without data are never prefaulted.
    pub fn enable_prefault(&mut self) {
        self.prefault = Some((0, 0));
    }

    /// The live counters (shared: they keep counting while the handler runs).
    pub fn counters(&self) -> Arc<LazyCounters> {
        Arc::clone(&self.counters)
    }

    /// The userfaultfd served (for polling it together with other descriptors).
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Whether every region was unmapped (or the faulting process is gone): nothing can
    /// fault any more.
    pub fn finished(&self) -> bool {
        self.regions.iter().all(|r| r.unmapped)
    }

    /// Whether there is work besides waiting for events: deferred faults, or a background copy
    /// not yet done.
    pub fn has_work(&self) -> bool {
        !self.deferred.is_empty() || self.prefault.is_some()
    }

    /// Whether faults wait for a retry ([`DEFERRED_RETRY`]).
    pub fn has_deferred(&self) -> bool {
        !self.deferred.is_empty()
    }

    /// Serves until every region is unmapped: the loop of [`restore_lazy`]'s handler thread.
    pub fn run(&mut self) -> Result<()> {
        while !self.finished() {
            let timeout = self.has_deferred().then_some(DEFERRED_RETRY);
            poll_readable(self.uffd.as_raw_fd(), timeout)?;
            self.serve_pending()?;
        }
        Ok(())
    }

    /// Reads and serves every event queued on the userfaultfd now (without blocking), then
    /// tries the deferred faults again.
    pub fn serve_pending(&mut self) -> Result<()> {
        loop {
            match self.uffd.read_event() {
                Ok(Some(event)) => self.handle_event(event)?,
                Ok(None) => break,
                Err(e) => {
                    return Err(Error::UnsupportedMemory(format!(
                        "reading userfaultfd: {e}"
                    )))
                }
            }
        }
        for address in std::mem::take(&mut self.deferred) {
            self.serve(address)?;
        }
        Ok(())
    }

    /// Serves one event read from the userfaultfd.
    pub fn handle_event(&mut self, event: Event) -> Result<()> {
        match event {
            Event::Pagefault { addr, .. } => {
                self.counters.faults.fetch_add(1, Ordering::Relaxed);
                self.serve(addr as usize)
            }
            Event::Remove { start, end } => {
                self.for_pages(start as usize, end as usize, |state, first, count| {
                    set_bits(&mut state.discarded, first, count);
                });
                Ok(())
            }
            Event::Unmap { start, end } => {
                let (start, end) = (start as usize, end as usize);
                // Pages unmapped from part of a region fault no more; a later mapping there
                // is not registered. A region unmapped whole is done.
                self.for_pages(start, end, |state, first, count| {
                    set_bits(&mut state.discarded, first, count);
                });
                for state in &mut self.regions {
                    if start <= state.host_start && end >= state.host_start + state.size as usize {
                        state.unmapped = true;
                    }
                }
                Ok(())
            }
            Event::Remap { from, to, len } => {
                let (from, to) = (from as usize, to as usize);
                for state in &mut self.regions {
                    let end = state.host_start + state.size as usize;
                    if state.host_start >= from && end <= from + len {
                        state.host_start = to + (state.host_start - from);
                    } else if state.host_start < from + len && end > from {
                        return Err(Error::UnsupportedMemory(format!(
                            "mremap of part of the restored region at {:#x}",
                            state.host_start
                        )));
                    }
                }
                Ok(())
            }
            // The child of a fork gets its own userfaultfd; dropping it leaves the child's
            // copy of the memory to the kernel (it is not a guest).
            Event::Fork { uffd } => {
                drop(uffd);
                Ok(())
            }
        }
    }

    /// Copies the next stretch of data pages not served yet (the background copy turned on
    /// by [`enable_prefault`](Self::enable_prefault)). `Ok(false)` when there is nothing
    /// (left) to copy.
    pub fn prefault_step(&mut self) -> Result<bool> {
        while let Some((index, run_index)) = self.prefault {
            let Some(state) = self.regions.get(index) else {
                self.prefault = None;
                return Ok(false);
            };
            let Some(run) = state
                .runs
                .get(run_index)
                .copied()
                .filter(|_| !state.unmapped)
            else {
                self.prefault = Some((index + 1, 0));
                continue;
            };
            let next = (run.first_page..run.first_page + run.pages)
                .find(|&page| run.page_type.has_data() && state.copyable(page));
            match next {
                Some(page) => {
                    self.copy_data(index, run_index, page, false)?;
                    return Ok(true);
                }
                None => self.prefault = Some((index, run_index + 1)),
            }
        }
        Ok(false)
    }

    /// Applies `action` to the pages of every region overlapping `[start, end)`.
    fn for_pages(
        &mut self,
        start: usize,
        end: usize,
        mut action: impl FnMut(&mut RegionState, u64, u64),
    ) {
        for state in &mut self.regions {
            let region_end = state.host_start + state.size as usize;
            let (low, high) = (start.max(state.host_start), end.min(region_end));
            if low < high {
                let first = (low - state.host_start) as u64 / PAGE_SIZE;
                let last = ((high - state.host_start) as u64).div_ceil(PAGE_SIZE);
                action(state, first, last - first);
            }
        }
    }

    fn serve(&mut self, address: usize) -> Result<()> {
        let Some(index) = self.regions.iter().position(|r| r.contains(address)) else {
            return Err(Error::UnsupportedMemory(format!(
                "fault at {address:#x} outside the restored regions"
            )));
        };
        let state = &self.regions[index];
        let page = (address - state.host_start) as u64 / PAGE_SIZE;
        let run_index = state.runs.partition_point(|r| r.first_page <= page) - 1;
        let run = state.runs[run_index];
        // A served page that faults again was either resolved already for another thread
        // (the zero page then finds it present and only wakes) or dropped without a remove
        // event, where zero is what the guest must read.
        if !run.page_type.has_data() || !state.copyable(page) {
            return self.zero_page(index, page);
        }
        self.copy_data(index, run_index, page, true)
    }

    /// Copies the stretch of not yet served pages of run `run_index` around `page` (only
    /// after it when `around` is false), at most `max_copy_pages` pages.
    fn copy_data(&mut self, index: usize, run_index: usize, page: u64, around: bool) -> Result<()> {
        self.verify(index, run_index)?;
        let max = self.max_copy_pages;
        let state = &self.regions[index];
        let run = state.runs[run_index];
        let Some(extent) = run.extent else {
            return Err(Error::Inconsistent("data run without extent".into()));
        };
        let run_end = run.first_page + run.pages;
        let mut last = page + 1;
        while last < run_end && last - page < max && state.copyable(last) {
            last += 1;
        }
        let mut first = page;
        while around && first > run.first_page && last - first < max && state.copyable(first - 1) {
            first -= 1;
        }
        let source = self
            .source
            .bytes(
                extent.offset + (first - run.first_page) * PAGE_SIZE,
                (last - first) * PAGE_SIZE,
            )?
            .as_ptr();
        let target = state.page_address(first);
        let len = ((last - first) * PAGE_SIZE) as usize;
        // SAFETY: `source` is `len` readable bytes of the live file mapping; `target` is `len`
        // bytes inside a region registered with this userfaultfd in the faulting process and
        // still mapped there (unmapped regions raise no faults). UFFDIO_COPY only fills
        // missing pages there and touches no memory of this process but the source.
        let copied = unsafe { self.uffd.copy(source.cast(), target as *mut _, len, true) };
        let done = match copied {
            Ok(_) => last - first,
            Err(userfaultfd::Error::PartiallyCopied(bytes)) if bytes > 0 && bytes < len => {
                bytes as u64 / PAGE_SIZE
            }
            // Nothing copied because the address space is changing: try once the pending
            // events are read.
            Err(userfaultfd::Error::PartiallyCopied(_)) => {
                self.deferred.push(self.regions[index].page_address(page));
                return Ok(());
            }
            Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::ESRCH => {
                self.process_gone();
                return Ok(());
            }
            // Some page of the stretch is present already: go page by page.
            Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => 0,
            Err(e) => return Err(Error::UnsupportedMemory(format!("UFFDIO_COPY: {e}"))),
        };
        set_bits(&mut self.regions[index].served, first, done);
        self.counters
            .data_pages_copied
            .fetch_add(done, Ordering::Relaxed);
        if done == last - first {
            return Ok(());
        }
        // What the kernel did not copy: the faulting page alone (woken when done), or for a
        // background copy the rest of the stretch, one page at a time.
        let rest = if around {
            page..page + 1
        } else {
            first + done..last
        };
        for page in rest {
            if self.regions[index].copyable(page) {
                let offset = extent.offset + (page - run.first_page) * PAGE_SIZE;
                self.copy_one(index, page, offset)?;
            }
        }
        Ok(())
    }

    /// Checks the crc32c of run `run_index`'s extent the first time the run is used.
    fn verify(&mut self, index: usize, run_index: usize) -> Result<()> {
        if self.regions[index].verified[run_index] {
            return Ok(());
        }
        let Some(extent) = self.regions[index].runs[run_index].extent else {
            return Err(Error::Inconsistent("data run without extent".into()));
        };
        // Reading past the end of a file truncated since it was mapped would raise SIGBUS.
        let file_len = self.source.readable_len()?;
        if extent.offset + extent.len > file_len {
            return Err(Error::Truncated(format!(
                "the snapshot file is {file_len:#x} bytes, the extent at {:#x} ends past it",
                extent.offset
            )));
        }
        extent.check_crc(crc32c::crc32c(
            self.source.bytes(extent.offset, extent.len)?,
        ))?;
        self.regions[index].verified[run_index] = true;
        self.counters
            .extents_verified
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn copy_one(&mut self, index: usize, page: u64, file_offset: u64) -> Result<()> {
        let target = self.regions[index].page_address(page);
        let source = self.source.bytes(file_offset, PAGE_SIZE)?.as_ptr();
        // SAFETY: as in `copy_data`, for one page.
        let result = unsafe {
            self.uffd
                .copy(source.cast(), target as *mut _, PAGE_SIZE as usize, true)
        };
        match result {
            Ok(_) => {
                self.counters
                    .data_pages_copied
                    .fetch_add(1, Ordering::Relaxed);
            }
            Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {
                self.wake(target)?;
            }
            Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::ESRCH => {
                self.process_gone();
                return Ok(());
            }
            Err(userfaultfd::Error::PartiallyCopied(_)) => {
                self.deferred.push(target);
                return Ok(());
            }
            Err(e) => return Err(Error::UnsupportedMemory(format!("UFFDIO_COPY: {e}"))),
        }
        set_bits(&mut self.regions[index].served, page, 1);
        Ok(())
    }

    fn zero_page(&mut self, index: usize, page: u64) -> Result<()> {
        let target = self.regions[index].page_address(page);
        // SAFETY: one page inside a registered, mapped region; UFFDIO_ZEROPAGE maps the zero
        // page only where nothing is mapped.
        let result = unsafe {
            self.uffd
                .zeropage(target as *mut _, PAGE_SIZE as usize, true)
        };
        match result {
            Ok(_) => {
                self.counters
                    .zero_pages_mapped
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(userfaultfd::Error::ZeropageFailed(errno)) if errno as i32 == libc::EEXIST => {
                self.wake(target)
            }
            Err(userfaultfd::Error::ZeropageFailed(errno)) if errno as i32 == libc::EAGAIN => {
                self.deferred.push(target);
                Ok(())
            }
            Err(userfaultfd::Error::ZeropageFailed(errno)) if errno as i32 == libc::ESRCH => {
                self.process_gone();
                Ok(())
            }
            Err(e) => Err(Error::UnsupportedMemory(format!("UFFDIO_ZEROPAGE: {e}"))),
        }
    }

    fn wake(&self, target: usize) -> Result<()> {
        self.uffd
            .wake(target as *mut _, PAGE_SIZE as usize)
            .map_err(|e| Error::UnsupportedMemory(format!("UFFDIO_WAKE: {e}")))
    }

    /// The faulting process exited: nothing will fault again.
    fn process_gone(&mut self) {
        for state in &mut self.regions {
            state.unmapped = true;
        }
        self.deferred.clear();
        self.prefault = None;
    }
}

/// Puts `uffd` into non-blocking mode: poll(2) on a blocking userfaultfd reports `POLLERR`.
fn set_non_blocking(uffd: &Uffd) -> Result<()> {
    let fd = uffd.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor owned by `uffd` reads its status flags only.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: F_SETFL on the same descriptor changes only its status flags.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(Error::io(
            "making the userfaultfd non-blocking",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// Waits until the userfaultfd `fd` has events or `timeout` passes (`None`: no limit).
/// `Ok(true)` when it has events; `Err` when it cannot be polled (not a userfaultfd, or one
/// without the `UFFDIO_API` handshake, reports `POLLERR`).
pub fn poll_readable(fd: RawFd, timeout: Option<Duration>) -> Result<bool> {
    let mut pollfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = timeout.map_or(-1, |t| {
        i32::try_from(t.as_millis().max(1)).unwrap_or(i32::MAX)
    });
    // SAFETY: one valid pollfd for the whole call.
    let rc = unsafe { libc::poll(&mut pollfd, 1, millis) };
    if rc < 0 {
        let error = std::io::Error::last_os_error();
        if error.kind() == std::io::ErrorKind::Interrupted {
            return Ok(false);
        }
        return Err(Error::io("polling the userfaultfd", error));
    }
    if pollfd.revents & (libc::POLLERR | libc::POLLNVAL) != 0 {
        return Err(Error::UnsupportedMemory(
            "the userfaultfd cannot be polled (not initialized with UFFDIO_API?)".into(),
        ));
    }
    Ok(pollfd.revents & libc::POLLIN != 0)
}
