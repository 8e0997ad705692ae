//! Guest RAM: anonymous private memory or a shared memfd (`shared=on`, which vhost-user
//! backends need to map the same pages), split around the 32-bit MMIO gap and registered with
//! KVM one memslot per region.
//!
//! Every region carries vm-memory's dirty bitmap ([`GuestRam`]): whatever the VMM writes into
//! guest memory through vm-memory (`Bytes`, `VolatileSlice`: virtio-queue's used rings, the
//! virtio-blk `Writer`, ext-perm's emulated accesses, boot and ACPI tables) marks the pages it
//! touched. KVM's dirty log sees only what vCPUs write; [`take_dirty_logs`] merges the two.

use std::ffi::CStr;
use std::fs::File;
use std::os::fd::FromRawFd;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MmapRegion,
};

use super::error::{Error, Result};
use super::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Guest RAM as the VMM names it everywhere: vm-memory's mmap regions, each with an
/// [`AtomicBitmap`] of one bit per 4 KiB page (bit `i % 64` of word `i / 64` for page `i` of
/// the region, the layout of KVM's dirty log) that vm-memory sets on every write it makes.
pub type GuestRam = GuestMemoryMmap<AtomicBitmap>;

/// Where the RAM of a guest of `size` bytes lives: below the MMIO gap, then above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), size - low));
    }
    ranges
}

fn memfd(size: u64) -> Result<File> {
    let name: &CStr = c"ext-vmm-guest-ram";
    // SAFETY: `name` is a valid NUL-terminated string; the returned fd is checked below and
    // owned by the `File` from then on.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(Error::last_os("memfd_create"));
    }
    // SAFETY: `fd` is a fresh, valid descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|e| Error::Sys("ftruncate guest memfd", e))?;
    Ok(file)
}

/// Creates guest memory of `size` bytes. With `shared`, all regions are slices of one memfd
/// mapped `MAP_SHARED`, so the memory can be handed to another process.
pub fn create_guest_memory(size: u64, shared: bool) -> Result<GuestRam> {
    let ranges = ram_ranges(size);
    if !shared {
        let ranges: Vec<(GuestAddress, usize)> =
            ranges.iter().map(|(a, s)| (*a, *s as usize)).collect();
        return GuestRam::from_ranges(&ranges).map_err(|e| Error::Memory(e.to_string()));
    }
    let file = memfd(size)?;
    let mut offset = 0u64;
    let mut regions = Vec::new();
    for (addr, len) in ranges {
        let clone = file
            .try_clone()
            .map_err(|e| Error::Sys("dup guest memfd", e))?;
        let mapping =
            MmapRegion::<AtomicBitmap>::from_file(FileOffset::new(clone, offset), len as usize)
                .map_err(|e| Error::Memory(e.to_string()))?;
        regions.push(GuestRegionMmap::new(mapping, addr).ok_or_else(|| {
            Error::Memory(format!(
                "region at {:#x} overflows the guest address space",
                addr.0
            ))
        })?);
        offset += len;
    }
    GuestRam::from_regions(regions).map_err(|e| Error::Memory(e.to_string()))
}

/// Registers every region of `memory` as a KVM memslot (slot numbers from 0, in address order).
///
/// The caller keeps `memory` mapped for as long as `vm` exists (the `Vmm` and the tests hold
/// both together); KVM would otherwise read and write whatever is mapped there later.
pub fn register_memory(vm: &VmFd, memory: &GuestRam) -> Result<()> {
    set_memslots(vm, memory, 0)
}

/// Turns KVM's dirty-page logging on for every RAM memslot `register_memory` created (same
/// slots, addresses and mappings; only the flags change, which KVM allows on a live slot), and
/// clears the regions' dirty bitmaps, so that both count from now: from then on
/// [`take_dirty_logs`] reports the pages vCPUs and the VMM wrote.
pub fn enable_dirty_logging(vm: &VmFd, memory: &GuestRam) -> Result<()> {
    set_memslots(vm, memory, KVM_MEM_LOG_DIRTY_PAGES)?;
    for region in memory.iter() {
        dirty_bitmap(region).reset();
    }
    Ok(())
}

/// Reads and clears the dirty pages of every RAM region: one bitmap per region, bit `i` set
/// when page `i` of the region was written since the previous call (or since logging began),
/// by a vCPU (KVM's dirty log of the region's memslot) or by the VMM itself through vm-memory
/// (the region's [`AtomicBitmap`], taken and reset here).
pub fn take_dirty_logs(vm: &VmFd, memory: &GuestRam) -> Result<Vec<Vec<u64>>> {
    memory
        .iter()
        .enumerate()
        .map(|(slot, region)| {
            let mut log = vm
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(|e| Error::Kvm("KVM_GET_DIRTY_LOG", e))?;
            merge_words(&mut log, &dirty_bitmap(region).get_and_reset());
            Ok(log)
        })
        .collect()
}

/// The VMM's own dirty bitmap of `region` (the `AtomicBitmap` itself, not the slice that
/// `GuestMemoryRegion::bitmap` hands out).
pub(crate) fn dirty_bitmap(region: &GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let mapping: &MmapRegion<AtomicBitmap> = region;
    mapping.bitmap()
}

/// ORs the page bitmap `words` into `log` (same layout: bit `i % 64` of word `i / 64`; both
/// have `ceil(pages / 64)` words for a region, a longer `words` would only add bits past the
/// region's end).
fn merge_words(log: &mut Vec<u64>, words: &[u64]) {
    if log.len() < words.len() {
        log.resize(words.len(), 0);
    }
    for (word, bits) in log.iter_mut().zip(words) {
        *word |= bits;
    }
}

fn set_memslots(vm: &VmFd, memory: &GuestRam, flags: u32) -> Result<()> {
    for (slot, region) in memory.iter().enumerate() {
        let host = memory
            .get_host_address(region.start_addr())
            .map_err(|e| Error::Memory(e.to_string()))?;
        let slot_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range is a live mapping owned by `memory`, which the caller keeps
        // alive as long as the VM (see above); slots do not overlap (regions are disjoint).
        unsafe { vm.set_user_memory_region(slot_region) }
            .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn ranges_leave_the_mmio_gap() {
        assert_eq!(ram_ranges(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let big = ram_ranges(4 << 30);
        assert_eq!(big[0], (GuestAddress(0), MMIO_GAP_START));
        assert_eq!(
            big[1],
            (GuestAddress(MMIO_GAP_END), (4 << 30) - MMIO_GAP_START)
        );
    }

    #[test]
    fn shared_memory_is_a_memfd() {
        let mem = create_guest_memory(64 << 20, true).unwrap();
        mem.write_obj(0xabcd_u32, GuestAddress(0x1000)).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        assert!(region.file_offset().is_some());
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x1000)).unwrap(), 0xabcd);
    }

    #[test]
    fn vmm_writes_mark_the_dirty_bitmap_in_the_kvm_log_layout() {
        for shared in [false, true] {
            let mem = create_guest_memory(64 << 20, shared).unwrap();
            let bitmap = dirty_bitmap(mem.find_region(GuestAddress(0)).unwrap());
            bitmap.reset();
            mem.write_obj(1u64, GuestAddress(65 * 4096 + 8)).unwrap();
            // Two bytes across the boundary of pages 129 and 130.
            mem.write_slice(&[1; 2], GuestAddress(130 * 4096 - 1))
                .unwrap();
            let _ = mem.read_obj::<u64>(GuestAddress(200 * 4096)).unwrap();
            let words = bitmap.get_and_reset();
            // One u64 per 64 pages, as KVM_GET_DIRTY_LOG returns for the region's memslot.
            assert_eq!(words.len(), (64 << 20) / 4096 / 64);
            assert_eq!(words[1], 1 << 1, "page 65");
            assert_eq!(words[2], (1 << 1) | (1 << 2), "pages 129 and 130");
            assert_eq!(words.iter().map(|w| w.count_ones()).sum::<u32>(), 3);
            assert!(bitmap.get_and_reset().iter().all(|&w| w == 0), "taken");
        }
    }

    #[test]
    fn merged_words_are_a_union() {
        let mut log = vec![0b0101, 0];
        merge_words(&mut log, &[0b0011, 1 << 63]);
        assert_eq!(log, vec![0b0111, 1 << 63]);
    }
}
