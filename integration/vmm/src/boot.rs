//! PVH boot: load the ELF vmlinux, the initramfs (as PVH module 0) and the command line, and
//! describe memory to the kernel in `hvm_start_info`.

use std::fs::File;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use vm_memory::{Bytes, GuestAddress};

use super::config::VmConfig;
use super::error::{Error, Result};
use super::layout::*;
use super::memory::{ram_ranges, GuestRam};

/// `hvm_start_info.magic`.
const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// Where the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    /// The kernel's PVH entry point (32-bit code).
    pub entry: GuestAddress,
    /// Address of `hvm_start_info`, passed in `rbx`.
    pub start_info: GuestAddress,
}

fn open(path: &std::path::Path) -> Result<File> {
    File::open(path).map_err(|source| Error::File {
        path: path.display().to_string(),
        source,
    })
}

/// The memory map the guest sees: RAM below the EBDA, the legacy hole reserved (it holds the
/// ACPI tables), RAM up to the MMIO gap and above 4 GiB.
pub fn memory_map(memory_size: u64) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr: u64, size: u64, type_: u32| hvm_memmap_table_entry {
        addr,
        size,
        type_,
        reserved: 0,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(ACPI_START, HIGH_RAM_START - ACPI_START, E820_RESERVED),
    ];
    for (start, len) in ram_ranges(memory_size) {
        if start.0 == 0 {
            map.push(entry(HIGH_RAM_START, len - HIGH_RAM_START, E820_RAM));
        } else {
            map.push(entry(start.0, len, E820_RAM));
        }
    }
    map
}

/// Loads kernel, initramfs and command line for `config` and writes the PVH start info
/// (pointing at the ACPI RSDP at `rsdp`).
pub fn load_pvh(memory: &GuestRam, config: &VmConfig, rsdp: GuestAddress) -> Result<BootEntry> {
    let mut kernel = open(&config.kernel)?;
    let loaded = Elf::load(
        memory,
        None,
        &mut kernel,
        Some(GuestAddress(HIGH_RAM_START)),
    )
    .map_err(|e| Error::Boot(format!("loading {}: {e}", config.kernel.display())))?;
    let entry = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(entry) => entry,
        _ => {
            return Err(Error::Unsupported(format!(
                "{} has no PVH entry note",
                config.kernel.display()
            )))
        }
    };
    // `kernel_end` is the absolute end of the highest loaded segment.
    let kernel_end = loaded.kernel_end;

    let mut start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START,
        rsdp_paddr: rsdp.0,
        memmap_paddr: PVH_MEMMAP_START,
        ..Default::default()
    };
    let map = memory_map(config.memory_size);
    start_info.memmap_entries = map.len() as u32;

    let mut module = None;
    if let Some(path) = &config.initramfs {
        let mut file = open(path)?;
        let size = file
            .metadata()
            .map_err(|e| Error::Sys("stat initramfs", e))?
            .len();
        let low_end = config.memory_size.min(MMIO_GAP_START);
        // Top of low memory, page aligned, clear of the kernel image.
        let addr = low_end
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a > kernel_end)
            .ok_or_else(|| Error::Boot(format!("initramfs of {size} bytes does not fit")))?;
        memory
            .read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
            .map_err(|e| Error::Boot(format!("loading initramfs: {e}")))?;
        module = Some(hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        });
        start_info.nr_modules = 1;
        start_info.modlist_paddr = PVH_MODLIST_START;
    }

    let cmdline = Cmdline::try_from(&config.cmdline, CMDLINE_MAX_SIZE)
        .map_err(|e| Error::Boot(format!("command line: {e}")))?;
    load_cmdline(memory, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| Error::Boot(format!("writing command line: {e}")))?;

    let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
    params.set_sections(&map, GuestAddress(PVH_MEMMAP_START));
    if let Some(module) = module {
        params.set_modules(&[module], GuestAddress(PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, memory)
        .map_err(|e| Error::Boot(format!("writing PVH start info: {e}")))?;
    Ok(BootEntry {
        entry,
        start_info: GuestAddress(PVH_INFO_START),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_skips_the_gap() {
        let map = memory_map(4 << 30);
        assert_eq!(map.len(), 4);
        assert_eq!(
            (map[2].addr, map[2].addr + map[2].size),
            (HIGH_RAM_START, MMIO_GAP_START)
        );
        assert_eq!(map[3].addr, MMIO_GAP_END);
        let total: u64 = map
            .iter()
            .filter(|e| e.type_ == E820_RAM)
            .map(|e| e.size)
            .sum();
        assert_eq!(total, (4 << 30) - (HIGH_RAM_START - EBDA_START));
    }
}
