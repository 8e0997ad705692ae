//! Helpers shared by the integration tests: real guest memory (anonymous or memfd), filled
//! page by page, and a pagemap probe to see which pages the host populated.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;

use ext_snapshot::PAGE_SIZE;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

/// What a test puts into one guest page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Never touched: stays unpopulated on the host.
    Untouched,
    /// Written with zero bytes: populated, all zero.
    Zeros,
    /// Written with bytes derived from the seed (never all zero).
    Data(u8),
    /// Written with data, then declared invalid through the invalid-page bitmap.
    Invalid(u8),
}

/// Anonymous private guest memory.
pub fn anon_memory(layout: &[(u64, u64)]) -> GuestMemoryMmap {
    let ranges: Vec<_> = layout
        .iter()
        .map(|&(a, s)| (GuestAddress(a), s as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("map anonymous memory")
}

/// Guest memory backed by one memfd, regions back to back in it, mapped shared.
pub fn memfd_memory(layout: &[(u64, u64)]) -> GuestMemoryMmap {
    // SAFETY: the name is a valid C string; the returned fd is checked and then owned by File.
    let fd = unsafe { libc::memfd_create(c"ext-snapshot-test".as_ptr(), 0) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let file = std::sync::Arc::new(unsafe { File::from_raw_fd(fd) });
    let total: u64 = layout.iter().map(|&(_, s)| s).sum();
    file.set_len(total).expect("size memfd");
    let mut offset = 0;
    let ranges: Vec<_> = layout
        .iter()
        .map(|&(a, s)| {
            let r = (
                GuestAddress(a),
                s as usize,
                Some(FileOffset::from_arc(file.clone(), offset)),
            );
            offset += s;
            r
        })
        .collect();
    GuestMemoryMmap::from_ranges_with_files(&ranges).expect("map memfd memory")
}

/// The bytes a `Data(seed)` page holds.
pub fn page_bytes(seed: u8, gfn: u64) -> Vec<u8> {
    let mut state = (u64::from(seed).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ gfn.wrapping_mul(0x1234_5678_9abc_def1))
        | 1;
    (0..PAGE_SIZE)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state as u8) | 1
        })
        .collect()
}

/// Fills `mem` as `fills` says (one entry per page of each region, in order) and returns the
/// invalid-page bitmap over gfns.
pub fn fill_memory(mem: &GuestMemoryMmap, layout: &[(u64, u64)], fills: &[Vec<Fill>]) -> Vec<u64> {
    let max_gfn = layout
        .iter()
        .map(|&(a, s)| (a + s) / PAGE_SIZE)
        .max()
        .unwrap_or(0);
    let mut invalid = vec![0u64; max_gfn.div_ceil(64) as usize + 1];
    for (&(addr, _), pages) in layout.iter().zip(fills) {
        for (i, f) in pages.iter().enumerate() {
            let gpa = addr + i as u64 * PAGE_SIZE;
            let gfn = gpa / PAGE_SIZE;
            match *f {
                Fill::Untouched => {}
                Fill::Zeros => mem
                    .write_slice(&[0u8; PAGE_SIZE as usize], GuestAddress(gpa))
                    .expect("write zeros"),
                Fill::Data(seed) | Fill::Invalid(seed) => mem
                    .write_slice(&page_bytes(seed, gfn), GuestAddress(gpa))
                    .expect("write data"),
            }
            if matches!(f, Fill::Invalid(_)) {
                invalid[(gfn / 64) as usize] |= 1 << (gfn % 64);
            }
        }
    }
    invalid
}

/// What memory filled with `fills` must read as after a restore (invalid pages read as zero).
pub fn expected_bytes(layout: &[(u64, u64)], fills: &[Vec<Fill>]) -> Vec<Vec<u8>> {
    layout
        .iter()
        .zip(fills)
        .map(|(&(addr, _), pages)| {
            pages
                .iter()
                .enumerate()
                .flat_map(|(i, f)| match *f {
                    Fill::Data(seed) => page_bytes(seed, addr / PAGE_SIZE + i as u64),
                    _ => vec![0u8; PAGE_SIZE as usize],
                })
                .collect()
        })
        .collect()
}

/// Reads every region of `mem` (this populates the pages: probe residency first).
pub fn read_memory(mem: &GuestMemoryMmap) -> Vec<Vec<u8>> {
    mem.iter()
        .map(|r| {
            let mut buf = vec![0u8; r.len() as usize];
            mem.read_slice(&mut buf, r.start_addr())
                .expect("read memory");
            buf
        })
        .collect()
}

/// For every page of every region: present or swapped in `/proc/self/pagemap`.
pub fn resident_pages(mem: &GuestMemoryMmap) -> Vec<Vec<bool>> {
    let pagemap = File::open("/proc/self/pagemap").expect("open pagemap");
    mem.iter()
        .map(|r| {
            let pages = (r.len() / PAGE_SIZE) as usize;
            let mut buf = vec![0u8; pages * 8];
            let vpn = r.as_ptr() as u64 / PAGE_SIZE;
            pagemap
                .read_exact_at(&mut buf, vpn * 8)
                .expect("read pagemap");
            buf.chunks_exact(8)
                .map(|e| u64::from_le_bytes(e.try_into().expect("8 bytes")) & (3 << 62) != 0)
                .collect()
        })
        .collect()
}
