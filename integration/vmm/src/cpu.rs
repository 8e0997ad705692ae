//! Architectural vCPU setup: CPUID with per-vCPU topology, boot MSRs, LAPIC wiring, FPU, and
//! the register state of the PVH entry (32-bit protected mode, paging off, flat segments).

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::error::{Error, Result};
use super::layout::BOOT_GDT_START;
use super::memory::GuestRam;

/// CPUID leaf 1 ECX bit: running under a hypervisor.
const CPUID_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 1 EDX bit: more than one logical processor per package.
const CPUID_HTT: u32 = 1 << 28;
/// CPUID leaf 1 ECX bit: LAPIC TSC-deadline timer. KVM emulates it with the in-kernel LAPIC but
/// reports it through `KVM_CAP_TSC_DEADLINE_TIMER`, not in the supported CPUID. A
/// hardware-reduced guest has no PIT to calibrate the LAPIC timer against, so it needs this.
const CPUID_TSC_DEADLINE: u32 = 1 << 24;

/// CPUID for vCPU `id` of `count`: the host's supported leaves with APIC IDs and a
/// one-thread-per-core, `count`-cores-per-package topology.
pub fn vcpu_cpuid(kvm: &Kvm, id: u8, count: u8) -> Result<CpuId> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let core_bits = u32::BITS - (u32::from(count).saturating_sub(1)).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(count) << 16);
                entry.ecx |= CPUID_HYPERVISOR;
                if tsc_deadline {
                    entry.ecx |= CPUID_TSC_DEADLINE;
                }
                if count > 1 {
                    entry.edx |= CPUID_HTT;
                }
            }
            // Extended topology: level 0 = SMT (one thread), level 1 = core (`count` cores).
            0xb | 0x1f => {
                entry.edx = u32::from(id);
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = core_bits;
                        entry.ebx = u32::from(count);
                        entry.ecx = (2 << 8) | 1;
                    }
                    index => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = index;
                    }
                }
            }
            // AMD: number of cores and APIC-ID width.
            0x8000_0008 => {
                entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | u32::from(count - 1);
            }
            // AMD extended APIC ID, core id, node id.
            0x8000_001e => {
                entry.eax = u32::from(id);
                entry.ebx &= !0xff;
                entry.ebx |= u32::from(id);
                entry.ecx = 0;
            }
            _ => {}
        }
    }
    Ok(cpuid)
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// MISC_ENABLE: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRdefType: MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITE_BACK: u64 = (1 << 11) | 6;

/// Resets the MSRs a firmware would leave in a known state.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WRITE_BACK),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries)
        .map_err(|e| Error::Boot(format!("building the MSR list: {e:?}")))?;
    let set = vcpu
        .set_msrs(&msrs)
        .map_err(|e| Error::Kvm("KVM_SET_MSRS", e))?;
    if set != entries.len() {
        return Err(Error::Boot(format!(
            "KVM_SET_MSRS set {set} of {} MSRs",
            entries.len()
        )));
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(regs: &[std::os::raw::c_char], offset: usize) -> u32 {
    let bytes: [u8; 4] = std::array::from_fn(|i| regs[offset + i] as u8);
    u32::from_le_bytes(bytes)
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char], offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        regs[offset + i] = *byte as std::os::raw::c_char;
    }
}

/// Wires LINT0 as ExtINT (the PIC) and LINT1 as NMI, as a PC firmware does.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<()> {
    let mut lapic = vcpu
        .get_lapic()
        .map_err(|e| Error::Kvm("KVM_GET_LAPIC", e))?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let value = lapic_reg(&lapic.regs, reg);
        set_lapic_reg(&mut lapic.regs, reg, (value & !0x700) | (mode << 8));
    }
    vcpu.set_lapic(&lapic)
        .map_err(|e| Error::Kvm("KVM_SET_LAPIC", e))
}

/// x87 control word and MXCSR at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(|e| Error::Kvm("KVM_SET_FPU", e))
}

/// Encodes a GDT descriptor from its access/flags word, base and limit.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0x000f_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// The KVM segment register equivalent of GDT descriptor `entry` loaded as `selector`.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let granular = (entry >> 55) & 1 == 1;
    kvm_segment {
        base,
        limit: if granular {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: 0,
        padding: 0,
    }
}

/// The boot GDT: null, flat 32-bit code (0x08), flat data (0x10), TSS (0x18).
pub const BOOT_GDT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x0000_8b00_0000_0067,
];

/// Puts the boot vCPU at the PVH entry: protected mode without paging, flat segments from
/// [`BOOT_GDT`] (also written to guest memory), `rbx` = `start_info`.
pub fn setup_pvh_registers(
    vcpu: &VcpuFd,
    memory: &GuestRam,
    entry: GuestAddress,
    start_info: GuestAddress,
) -> Result<()> {
    for (i, descriptor) in BOOT_GDT.iter().enumerate() {
        memory
            .write_obj(*descriptor, GuestAddress(BOOT_GDT_START + 8 * i as u64))
            .map_err(|e| Error::Memory(e.to_string()))?;
    }
    let mut sregs = vcpu
        .get_sregs()
        .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
    let code = segment_from_gdt(BOOT_GDT[1], 0x08);
    let data = segment_from_gdt(BOOT_GDT[2], 0x10);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(BOOT_GDT[3], 0x18);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 1; // PE: protected mode, paging off.
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rbx: start_info.0,
        ..Default::default()
    };
    vcpu.set_regs(&regs)
        .map_err(|e| Error::Kvm("KVM_SET_REGS", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_round_trip() {
        assert_eq!(gdt_entry(0xc09b, 0, 0xfffff), BOOT_GDT[1]);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), BOOT_GDT[2]);
        assert_eq!(gdt_entry(0x008b, 0, 0x67), BOOT_GDT[3]);
        let cs = segment_from_gdt(BOOT_GDT[1], 0x08);
        assert_eq!(
            (cs.base, cs.limit, cs.type_, cs.db, cs.g, cs.l),
            (0, 0xffff_ffff, 0xb, 1, 1, 0)
        );
        let tss = segment_from_gdt(BOOT_GDT[3], 0x18);
        assert_eq!((tss.limit, tss.type_, tss.present), (0x67, 0xb, 1));
    }
}
