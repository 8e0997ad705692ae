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

use std::fs::File;
use std::os::fd::AsRawFd;
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
        })
    }

    /// The bytes `[offset, offset + len)`; the parser guaranteed extents lie in the file.
    fn bytes(&self, offset: u64, len: u64) -> &[u8] {
        assert!(
            offset + len <= self.len as u64,
            "extent outside the snapshot file"
        );
        // SAFETY: in bounds (checked above) of a live read-only mapping owned by `self`. The
        // file is a snapshot nobody writes while it is restored; a truncation by another
        // process would raise SIGBUS, not undefined behaviour in safe code reading it.
        unsafe { std::slice::from_raw_parts(self.address.add(offset as usize), len as usize) }
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

fn bit(bits: &[u64], page: u64) -> bool {
    bits[(page / 64) as usize] & (1 << (page % 64)) != 0
}

fn set_bits(bits: &mut [u64], first: u64, count: u64) {
    for page in first..first + count {
        bits[(page / 64) as usize] |= 1 << (page % 64);
    }
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
    if snapshot.is_diff()
        || snapshot
            .regions()
            .iter()
            .flat_map(|r| &r.runs)
            .any(|run| run.page_type == PageType::SameAsParent)
    {
        return Err(Error::NeedsParent);
    }
    let source = FileMap::new(snapshot.file())?;
    let uffd = UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(false)
        .user_mode_only(false)
        .require_features(FeatureFlags::EVENT_UNMAP | FeatureFlags::EVENT_REMOVE)
        .create()
        .map_err(|e| Error::UnsupportedMemory(format!("userfaultfd: {e}")))?;

    let mut guest_regions = Vec::with_capacity(snapshot.regions().len());
    let mut states = Vec::with_capacity(snapshot.regions().len());
    for region in snapshot.regions().iter().cloned() {
        let size = usize::try_from(region.size)
            .map_err(|_| Error::UnsupportedMemory(format!("region of {:#x} bytes", region.size)))?;
        let mapping =
            MmapRegion::<B>::new(size).map_err(|e| Error::UnsupportedMemory(e.to_string()))?;
        let registered = uffd
            .register(mapping.as_ptr().cast(), size)
            .map_err(|e| Error::UnsupportedMemory(format!("userfaultfd register: {e}")))?;
        if !registered.contains(IoctlFlags::COPY | IoctlFlags::ZEROPAGE) {
            return Err(Error::UnsupportedMemory(
                "userfaultfd lacks UFFDIO_COPY or UFFDIO_ZEROPAGE".into(),
            ));
        }
        let words = region.pages().div_ceil(64) as usize;
        states.push(RegionState {
            host_start: mapping.as_ptr() as usize,
            size: region.size,
            served: vec![0; words],
            discarded: vec![0; words],
            verified: vec![false; region.runs.len()],
            runs: region.runs,
            unmapped: false,
        });
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

    let counters = Arc::new(LazyCounters::default());
    let failure = Arc::new(Mutex::new(None));
    let mut handler = Handler {
        uffd,
        source,
        regions: states,
        counters: Arc::clone(&counters),
    };
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

struct Handler {
    uffd: Uffd,
    source: FileMap,
    regions: Vec<RegionState>,
    counters: Arc<LazyCounters>,
}

impl Handler {
    fn run(&mut self) -> Result<()> {
        while self.regions.iter().any(|r| !r.unmapped) {
            let event = self
                .uffd
                .read_event()
                .map_err(|e| Error::UnsupportedMemory(format!("reading userfaultfd: {e}")))?;
            match event {
                Some(Event::Pagefault { addr, .. }) => self.serve(addr as usize)?,
                Some(Event::Remove { start, end }) => {
                    self.for_pages(start as usize, end as usize, |state, first, count| {
                        set_bits(&mut state.discarded, first, count);
                    })
                }
                Some(Event::Unmap { start, end }) => {
                    let (start, end) = (start as usize, end as usize);
                    for state in &mut self.regions {
                        if start <= state.host_start
                            && end >= state.host_start + state.size as usize
                        {
                            state.unmapped = true;
                        }
                    }
                }
                // Fork and remap events are not requested; a spurious empty read is retried.
                Some(_) | None => {}
            }
        }
        Ok(())
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
        self.counters.faults.fetch_add(1, Ordering::Relaxed);
        let Some(index) = self
            .regions
            .iter()
            .position(|r| address >= r.host_start && address < r.host_start + r.size as usize)
        else {
            return Err(Error::UnsupportedMemory(format!(
                "fault at {address:#x} outside the restored regions"
            )));
        };
        let state = &mut self.regions[index];
        let page = (address - state.host_start) as u64 / PAGE_SIZE;
        let run_index = state.runs.partition_point(|r| r.first_page <= page) - 1;
        let run = state.runs[run_index];
        if bit(&state.discarded, page) || !run.page_type.has_data() {
            return self.zero_page(index, page);
        }
        if bit(&state.served, page) {
            // Several threads faulted on the page; the first fault's copy already filled it.
            let target = state.host_start + (page * PAGE_SIZE) as usize;
            return self.wake(target);
        }
        let Some(extent) = run.extent else {
            return Err(Error::Inconsistent("data run without extent".into()));
        };
        if !state.verified[run_index] {
            let bytes = self.source.bytes(extent.offset, extent.len);
            let computed = crc32c::crc32c(bytes);
            if computed != extent.crc {
                return Err(Error::BadChecksum {
                    what: format!("extent at offset {:#x}", extent.offset),
                    stored: extent.crc,
                    computed,
                });
            }
            state.verified[run_index] = true;
            self.counters
                .extents_verified
                .fetch_add(1, Ordering::Relaxed);
        }
        // The stretch of unserved, not discarded pages of this run around the fault.
        let run_end = run.first_page + run.pages;
        let mut first = page;
        while first > run.first_page
            && !bit(&state.served, first - 1)
            && !bit(&state.discarded, first - 1)
        {
            first -= 1;
        }
        let mut last = page + 1;
        while last < run_end && !bit(&state.served, last) && !bit(&state.discarded, last) {
            last += 1;
        }
        let source = self
            .source
            .bytes(
                extent.offset + (first - run.first_page) * PAGE_SIZE,
                (last - first) * PAGE_SIZE,
            )
            .as_ptr();
        let target = state.host_start + (first * PAGE_SIZE) as usize;
        let len = ((last - first) * PAGE_SIZE) as usize;
        // SAFETY: `source` is `len` readable bytes of the live file mapping; `target` is `len`
        // bytes inside a region registered with this userfaultfd and still mapped (unmapped
        // regions raise no faults). UFFDIO_COPY only fills missing pages there.
        let copied = unsafe { self.uffd.copy(source.cast(), target as *mut _, len, true) };
        match copied {
            Ok(_) => {
                set_bits(&mut state.served, first, last - first);
                self.counters
                    .data_pages_copied
                    .fetch_add(last - first, Ordering::Relaxed);
                Ok(())
            }
            // Part of the stretch was populated behind our back (or only partly copied):
            // serve just the faulting page and wake its waiter.
            Err(userfaultfd::Error::PartiallyCopied(_))
            | Err(userfaultfd::Error::CopyFailed(_)) => self.copy_one(
                index,
                page,
                extent.offset + (page - run.first_page) * PAGE_SIZE,
            ),
            Err(e) => Err(Error::UnsupportedMemory(format!("UFFDIO_COPY: {e}"))),
        }
    }

    fn copy_one(&mut self, index: usize, page: u64, file_offset: u64) -> Result<()> {
        let target = self.regions[index].host_start + (page * PAGE_SIZE) as usize;
        let source = self.source.bytes(file_offset, PAGE_SIZE).as_ptr();
        // SAFETY: as in `serve`, for one page.
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
            Err(e) => return Err(Error::UnsupportedMemory(format!("UFFDIO_COPY: {e}"))),
        }
        set_bits(&mut self.regions[index].served, page, 1);
        Ok(())
    }

    fn zero_page(&mut self, index: usize, page: u64) -> Result<()> {
        let target = self.regions[index].host_start + (page * PAGE_SIZE) as usize;
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
            Err(e) => Err(Error::UnsupportedMemory(format!("UFFDIO_ZEROPAGE: {e}"))),
        }
    }

    fn wake(&self, target: usize) -> Result<()> {
        self.uffd
            .wake(target as *mut _, PAGE_SIZE as usize)
            .map_err(|e| Error::UnsupportedMemory(format!("UFFDIO_WAKE: {e}")))
    }
}
