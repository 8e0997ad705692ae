//! Writing into guest memory regions: copying data in, making pages read as zero.

use std::fs::File;
use std::os::fd::AsRawFd;

use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemory, GuestMemoryRegion, GuestRegionMmap};

use crate::error::{Error, Result};
use crate::format::{checksum, Extent, PAGE_SIZE};

/// Bytes read and checksummed at a time when verifying while copying: small enough to be
/// checksummed from the CPU's cache right after `pread` put them in guest memory.
const VERIFY_PIECE: usize = 256 << 10;

/// The regions of a restore target, checked against a snapshot layout.
pub(crate) struct Target<'m, B: Bitmap> {
    regions: Vec<&'m GuestRegionMmap<B>>,
}

impl<'m, B: Bitmap> Target<'m, B> {
    /// `Err(RegionMismatch)` unless `mem` has exactly `layout`'s regions, `Err(UnsupportedMemory)`
    /// if one is not writable.
    pub(crate) fn new<M: GuestMemory<R = GuestRegionMmap<B>>>(
        mem: &'m M,
        layout: &[(u64, u64)],
    ) -> Result<Self> {
        let regions: Vec<&GuestRegionMmap<B>> = mem.iter().collect();
        let have: Vec<(u64, u64)> = regions
            .iter()
            .map(|r| (r.start_addr().0, r.len()))
            .collect();
        if have != layout {
            return Err(Error::RegionMismatch(format!(
                "memory has regions {have:x?}, snapshot has {layout:x?}"
            )));
        }
        if let Some(r) = regions.iter().find(|r| r.prot() & libc::PROT_WRITE == 0) {
            return Err(Error::UnsupportedMemory(format!(
                "region at {:#x} is not writable",
                r.start_addr().0
            )));
        }
        Ok(Target { regions })
    }

    /// Pointer to page `first_page` of region `ri` after checking that `pages` pages fit.
    fn range(&self, ri: usize, first_page: u64, pages: u64) -> Result<(*mut u8, usize)> {
        let r = self
            .regions
            .get(ri)
            .ok_or_else(|| Error::Inconsistent(format!("no region {ri}")))?;
        let end = first_page
            .checked_add(pages)
            .and_then(|p| p.checked_mul(PAGE_SIZE))
            .filter(|&e| e <= r.len())
            .ok_or_else(|| Error::Inconsistent(format!("pages past the end of region {ri}")))?;
        let start = first_page * PAGE_SIZE;
        // SAFETY: `start` is inside the mapping (checked above), so the offset pointer stays in
        // the same allocation.
        let ptr = unsafe { r.as_ptr().add(start as usize) };
        Ok((ptr, (end - start) as usize))
    }

    /// Reads `pages` pages from `file` at `offset` straight into region `ri` at `first_page`.
    pub(crate) fn read_from(
        &self,
        ri: usize,
        first_page: u64,
        pages: u64,
        file: &File,
        offset: u64,
    ) -> Result<()> {
        let (ptr, len) = self.range(ri, first_page, pages)?;
        // Faulting the pages in with one call is much cheaper than one fault per page inside
        // `pread`'s copy. Best effort: on kernels without MADV_POPULATE_WRITE (before 5.14)
        // the copy faults them in as before.
        // SAFETY: the range is inside a writable mapping of guest memory (checked by `range`
        // and `new`); populating pages that are about to be written changes no contents.
        unsafe { libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE) };
        self.pread_exact(ptr, 0, len, file, offset)
    }

    /// Reads data extent `extent` from `file` straight into region `ri` at `first_page`
    /// (`extent.len` bytes) and, with `check`, verifies its crc32c on the bytes just written,
    /// piece by piece while they are still in the CPU's cache. `Err(BadChecksum)` if they do
    /// not match: the range then holds unverified bytes, which the caller must release.
    pub(crate) fn read_extent_into(
        &self,
        ri: usize,
        first_page: u64,
        file: &File,
        extent: &Extent,
        check: bool,
    ) -> Result<()> {
        let pages = extent.len / PAGE_SIZE;
        if !check {
            return self.read_from(ri, first_page, pages, file, extent.offset);
        }
        let (ptr, len) = self.range(ri, first_page, pages)?;
        // SAFETY: as in `read_from`: a writable range of guest memory, populated before it is
        // written; no contents change.
        unsafe { libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE) };
        let mut crc = 0;
        let mut done = 0usize;
        while done < len {
            let piece = (len - done).min(VERIFY_PIECE);
            self.pread_exact(ptr, done, piece, file, extent.offset)?;
            // SAFETY: `ptr + done .. ptr + done + piece` lies inside the checked range and
            // was just written by `pread`; the guest does not run during a restore and no
            // mutable reference to these bytes exists while this shared one lives.
            let bytes = unsafe { std::slice::from_raw_parts(ptr.add(done), piece) };
            crc = checksum::crc32c_append(crc, bytes);
            done += piece;
        }
        extent.check_crc(crc)
    }

    /// Fills `ptr + at .. ptr + at + len` (inside a range checked by `range`) from `file` at
    /// `offset + at`.
    fn pread_exact(
        &self,
        ptr: *mut u8,
        at: usize,
        len: usize,
        file: &File,
        offset: u64,
    ) -> Result<()> {
        let mut done = 0usize;
        while done < len {
            let off = libc::off_t::try_from(offset + (at + done) as u64)
                .map_err(|_| Error::Inconsistent("file offset too large".into()))?;
            // SAFETY: the destination lies inside a writable mapping of guest memory (the
            // caller's range was checked by `range` and `new`); the kernel writes at most
            // `len - done` bytes there. The guest is not running during a restore, so no Rust
            // reference to these bytes exists.
            let n = unsafe {
                libc::pread(file.as_raw_fd(), ptr.add(at + done).cast(), len - done, off)
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::io("reading snapshot data into guest memory", e));
            }
            if n == 0 {
                return Err(Error::Truncated("snapshot data ends early".into()));
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Copies `data` (whole pages) into region `ri` at `first_page`.
    pub(crate) fn copy_in(&self, ri: usize, first_page: u64, data: &[u8]) -> Result<()> {
        let (ptr, len) = self.range(ri, first_page, data.len() as u64 / PAGE_SIZE)?;
        // SAFETY: the destination is `len` bytes of writable guest memory (checked by `range`
        // and `new`), `data` has at least `len` bytes and lives in our own buffer, so the two
        // do not overlap.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), ptr, len) };
        Ok(())
    }

    /// Makes `pages` pages of region `ri` at `first_page` read as zero, releasing their host
    /// memory where the backing allows it.
    pub(crate) fn discard(&self, ri: usize, first_page: u64, pages: u64) -> Result<()> {
        let (ptr, len) = self.range(ri, first_page, pages)?;
        let r = self.regions[ri];
        let shared = r.flags() & libc::MAP_SHARED != 0;
        match (r.file_offset(), shared) {
            (None, false) => {
                // SAFETY: the range is inside a private anonymous mapping we do not hold
                // references into; MADV_DONTNEED on it drops the pages, which then read as zero.
                let rc = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_DONTNEED) };
                if rc == 0 {
                    return Ok(());
                }
            }
            (Some(fo), true) => {
                let off = fo.start() + first_page * PAGE_SIZE;
                // SAFETY: fallocate on an open descriptor has no memory-safety effects; punching
                // a hole in the shared file makes the mapped range read as zero.
                let rc = unsafe {
                    libc::fallocate(
                        fo.file().as_raw_fd(),
                        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                        off as libc::off_t,
                        len as libc::off_t,
                    )
                };
                if rc == 0 {
                    return Ok(());
                }
            }
            _ => {}
        }
        // SAFETY: the range is `len` bytes of writable guest memory (checked by `range` and
        // `new`) with no Rust references into it.
        unsafe { std::ptr::write_bytes(ptr, 0, len) };
        Ok(())
    }
}
