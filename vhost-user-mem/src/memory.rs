//! Guest memory as the frontend's SET_MEM_TABLE gave it: checking guest ranges against the
//! table and giving pages back to the host.
//!
//! Each region of the table is a shared mapping of a file (a memfd with Cloud Hypervisor's
//! `--memory shared=on`) at the offset the frontend sent (`mmap_offset`). Giving memory back
//! means punching a hole in that *file*
//! (`fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)`): the host frees the pages for every
//! process that maps it, and the next guest access faults in a zero page. `MADV_DONTNEED` on the
//! daemon's own mapping would only drop this process's page-table entries and free nothing.
//!
//! Every function here checks the whole range before touching anything, so a refused range
//! punches nothing.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;

use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::error::{Error, Result};

/// Size of the pages the balloon protocol counts in (`VIRTIO_BALLOON_PFN_SHIFT` = 12).
pub const PAGE_SIZE: u64 = 4096;
/// `log2(PAGE_SIZE)`.
pub const PAGE_SHIFT: u32 = 12;

/// One piece of a guest range that lies inside one region: where to punch it.
struct Piece<'a> {
    file: &'a File,
    offset: u64,
    len: u64,
}

/// Checks that `[addr, addr + len)` is non-empty, page aligned and entirely inside guest memory
/// (it may span adjacent regions). `Ok(())` means every byte of it is backed by a region.
pub fn check_range<M: GuestMemory>(mem: &M, addr: u64, len: u64) -> Result<()> {
    check_shape(addr, len)?;
    let mut cursor = addr;
    let end = addr + len;
    while cursor < end {
        let region = mem
            .find_region(GuestAddress(cursor))
            .ok_or(Error::OutsideMemory { addr, len })?;
        cursor = region_end(region).min(end);
    }
    Ok(())
}

/// Punches `[addr, addr + len)` out of the files behind guest memory. The range is checked
/// first (see [`check_range`]) and every region it touches must be file backed; on any such
/// error nothing is punched. `Err(Error::Punch)` means the system refused a hole (pieces
/// before it may be punched already).
pub fn punch_range<B: Bitmap>(mem: &GuestMemoryMmap<B>, addr: u64, len: u64) -> Result<()> {
    let pieces = pieces(mem, addr, len)?;
    for piece in pieces {
        punch_file(piece.file, piece.offset, piece.len)?;
    }
    Ok(())
}

/// Bytes the host has allocated for the files behind guest memory (`st_blocks * 512`, each
/// file counted once even when several regions map it).
pub fn allocated_bytes<B: Bitmap>(mem: &GuestMemoryMmap<B>) -> std::io::Result<u64> {
    let mut seen = HashSet::new();
    let mut total = 0;
    for region in mem.iter() {
        if let Some(file_offset) = region.file_offset() {
            let meta = file_offset.file().metadata()?;
            if seen.insert((meta.dev(), meta.ino())) {
                total += meta.blocks() * 512;
            }
        }
    }
    Ok(total)
}

fn check_shape(addr: u64, len: u64) -> Result<()> {
    if len == 0 || addr.checked_add(len).is_none() {
        return Err(Error::BadLength { addr, len });
    }
    if addr % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
        return Err(Error::Unaligned { addr, len });
    }
    Ok(())
}

fn region_end<R: GuestMemoryRegion>(region: &R) -> u64 {
    region.start_addr().raw_value().saturating_add(region.len())
}

fn pieces<B: Bitmap>(mem: &GuestMemoryMmap<B>, addr: u64, len: u64) -> Result<Vec<Piece<'_>>> {
    check_shape(addr, len)?;
    let end = addr + len;
    let mut cursor = addr;
    let mut pieces = Vec::new();
    while cursor < end {
        let region = mem
            .find_region(GuestAddress(cursor))
            .ok_or(Error::OutsideMemory { addr, len })?;
        let piece_end = region_end(region).min(end);
        let file_offset = region
            .file_offset()
            .ok_or(Error::NotFileBacked { addr: cursor })?;
        let in_region = cursor - region.start_addr().raw_value();
        pieces.push(Piece {
            file: file_offset.file(),
            offset: file_offset.start() + in_region,
            len: piece_end - cursor,
        });
        cursor = piece_end;
    }
    Ok(pieces)
}

fn punch_file(file: &File, offset: u64, len: u64) -> Result<()> {
    let punch_error = |source| Error::Punch {
        offset,
        len,
        source,
    };
    let c_offset = libc::off_t::try_from(offset)
        .map_err(|_| punch_error(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
    let c_len = libc::off_t::try_from(len)
        .map_err(|_| punch_error(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))?;
    // SAFETY: fallocate only reads its integer arguments; `file` is an open descriptor borrowed
    // for the duration of the call.
    let ret = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            c_offset,
            c_len,
        )
    };
    if ret != 0 {
        return Err(punch_error(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Test helpers: memfd-backed guest memory and a look at which of its pages hold data.
#[cfg(test)]
pub(crate) mod test_util {
    use std::ffi::CString;
    use std::fs::File;
    use std::os::unix::io::{AsRawFd, FromRawFd};

    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

    use super::PAGE_SIZE;

    /// A memfd of `len` bytes, every page written (so allocated).
    pub fn populated_memfd(len: u64) -> File {
        let name = CString::new("vhost-user-mem-test").unwrap();
        // SAFETY: `name` is a valid NUL-terminated string; the returned fd is checked.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
        // SAFETY: `fd` was just created and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(len).unwrap();
        let page = vec![0xa5u8; PAGE_SIZE as usize];
        for i in 0..len / PAGE_SIZE {
            std::os::unix::fs::FileExt::write_all_at(&file, &page, i * PAGE_SIZE).unwrap();
        }
        file
    }

    /// Guest memory of the given `(guest address, length, file offset)` regions, all mapping
    /// `file`.
    pub fn memory(file: &File, regions: &[(u64, u64, u64)]) -> GuestMemoryMmap<()> {
        let regions = regions
            .iter()
            .map(|&(gpa, len, offset)| {
                let mmap = MmapRegion::<()>::from_file(
                    FileOffset::new(file.try_clone().unwrap(), offset),
                    len as usize,
                )
                .unwrap();
                GuestRegionMmap::new(mmap, GuestAddress(gpa)).unwrap()
            })
            .collect();
        GuestMemoryMmap::from_regions(regions).unwrap()
    }

    /// Which file pages in `[0, len)` hold data (`SEEK_DATA`), as page indices.
    pub fn data_pages(file: &File, len: u64) -> Vec<u64> {
        let mut pages = Vec::new();
        for i in 0..len / PAGE_SIZE {
            let offset = (i * PAGE_SIZE) as libc::off_t;
            // SAFETY: lseek only reads its integer arguments on an open descriptor.
            let data = unsafe { libc::lseek(file.as_raw_fd(), offset, libc::SEEK_DATA) };
            if data == offset {
                pages.push(i);
            }
        }
        pages
    }

    /// All page indices in `[0, len)` except those in `holes`.
    pub fn all_but(len: u64, holes: &[u64]) -> Vec<u64> {
        (0..len / PAGE_SIZE)
            .filter(|p| !holes.contains(p))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn punch_uses_the_region_file_offset() {
        // Region 0: gpa 0..64 KiB at file offset 64 KiB; region 1: gpa 1 MiB..+64 KiB at 0.
        let file = populated_memfd(128 * 1024);
        let mem = memory(&file, &[(0, 0x1_0000, 0x1_0000), (MIB, 0x1_0000, 0)]);
        punch_range(&mem, 0x2000, 0x2000).unwrap();
        punch_range(&mem, MIB + 0x3000, 0x1000).unwrap();
        // gpa 0x2000 is file page 16 + 2; gpa 1 MiB + 0x3000 is file page 3.
        assert_eq!(
            data_pages(&file, 128 * 1024),
            all_but(128 * 1024, &[3, 18, 19])
        );
    }

    #[test]
    fn punch_spans_adjacent_regions() {
        let file = populated_memfd(0x4000);
        let mem = memory(&file, &[(0, 0x2000, 0), (0x2000, 0x2000, 0x2000)]);
        punch_range(&mem, 0x1000, 0x2000).unwrap();
        assert_eq!(data_pages(&file, 0x4000), vec![0, 3]);
    }

    #[test]
    fn bad_ranges_punch_nothing() {
        let file = populated_memfd(0x4000);
        // A gap between the regions at 0x2000..0x3000.
        let mem = memory(&file, &[(0, 0x2000, 0), (0x3000, 0x1000, 0x3000)]);
        for (addr, len) in [
            (0x1000, 0x2000),           // runs into the gap
            (0x3000, 0x2000),           // runs past the end
            (0x10_0000, 0x1000),        // entirely outside
            (0x800, 0x1000),            // unaligned start
            (0x1000, 0x800),            // unaligned length
            (0, 0),                     // empty
            (u64::MAX - 0xfff, 0x2000), // overflows
        ] {
            assert!(punch_range(&mem, addr, len).is_err(), "{addr:#x}+{len:#x}");
            assert!(check_range(&mem, addr, len).is_err(), "{addr:#x}+{len:#x}");
        }
        assert_eq!(data_pages(&file, 0x4000), vec![0, 1, 2, 3]);
    }

    #[test]
    fn anonymous_memory_cannot_be_punched() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        assert!(check_range(&mem, 0, 0x1000).is_ok());
        assert!(matches!(
            punch_range(&mem, 0x1000, 0x1000),
            Err(Error::NotFileBacked { addr: 0x1000 })
        ));
        assert_eq!(allocated_bytes(&mem).unwrap(), 0);
    }

    #[test]
    fn allocated_bytes_counts_a_shared_file_once() {
        let file = populated_memfd(0x4000);
        let mem = memory(&file, &[(0, 0x2000, 0), (0x2000, 0x2000, 0x2000)]);
        assert_eq!(allocated_bytes(&mem).unwrap(), 0x4000);
        punch_range(&mem, 0, 0x1000).unwrap();
        assert_eq!(allocated_bytes(&mem).unwrap(), 0x3000);
    }
}
