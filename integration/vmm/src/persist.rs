//! What a snapshot records of the vCPUs and of the VM itself (in-kernel irqchip, PIT, KVM
//! clock), and how it is put back into a fresh KVM VM.
//!
//! The KVM structures are stored as their raw bytes (kvm-bindings' `serde` feature), so a
//! snapshot restores only on a host whose KVM has the same ABI; the CPUID the vCPU ran with is
//! stored too and set before anything else, as KVM requires.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// Most MSRs one `KVM_GET_MSRS`/`KVM_SET_MSRS` call carries (KVM's own limit is larger).
const MSR_BATCH: usize = 64;

/// Nested-virtualization state of a vCPU, or why there is none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NestedState {
    /// `KVM_GET_NESTED_STATE`'s buffer (header and data), restored with
    /// `KVM_SET_NESTED_STATE`.
    Present {
        /// The raw `struct kvm_nested_state` and its data, `size` bytes.
        bytes: Vec<u8>,
    },
    /// The host has no nested state for this vCPU: without `KVM_CAP_NESTED_STATE` it does not
    /// exist, and on PVM `KVM_GET_NESTED_STATE` fails with EINVAL. Restored as nothing.
    Absent {
        /// What the host said.
        reason: String,
    },
}

/// Everything KVM keeps for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (also its APIC ID).
    pub id: u8,
    /// The CPUID table the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Every MSR of `KVM_GET_MSR_INDEX_LIST` this vCPU could read back.
    pub msrs: Vec<kvm_msr_entry>,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// XSAVE area: x87 FPU, SSE and AVX state (a superset of `KVM_GET_FPU`).
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// In-kernel local APIC: registers, timer, pending interrupts.
    pub lapic: kvm_lapic_state,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
    /// Nested virtualization state.
    pub nested: NestedState,
}

/// The VM-wide state KVM keeps: the in-kernel interrupt controllers, the PIT and the clock.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// 8259 master, 8259 slave, IOAPIC (in that order).
    pub irqchips: Vec<kvm_irqchip>,
    /// The i8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock: guest time continues from this value after restore.
    pub clock: kvm_clock_data,
}

const IRQCHIPS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

impl MachineState {
    /// Reads the VM's state (its vCPUs must be stopped).
    pub fn save(vm: &VmFd) -> Result<Self> {
        let mut irqchips = Vec::with_capacity(IRQCHIPS.len());
        for chip_id in IRQCHIPS {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip)
                .map_err(|e| Error::Kvm("KVM_GET_IRQCHIP", e))?;
            irqchips.push(chip);
        }
        Ok(MachineState {
            irqchips,
            pit: vm.get_pit2().map_err(|e| Error::Kvm("KVM_GET_PIT2", e))?,
            clock: vm.get_clock().map_err(|e| Error::Kvm("KVM_GET_CLOCK", e))?,
        })
    }

    /// Writes the state into a VM that already has its irqchip and PIT, before its vCPUs run.
    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        if self.irqchips.len() != IRQCHIPS.len()
            || self
                .irqchips
                .iter()
                .zip(IRQCHIPS)
                .any(|(chip, id)| chip.chip_id != id)
        {
            return Err(Error::Snapshot("irqchip state is incomplete".into()));
        }
        for chip in &self.irqchips {
            vm.set_irqchip(chip)
                .map_err(|e| Error::Kvm("KVM_SET_IRQCHIP", e))?;
        }
        vm.set_pit2(&self.pit)
            .map_err(|e| Error::Kvm("KVM_SET_PIT2", e))?;
        // KVM_GET_CLOCK reports flags (TSC_STABLE, HOST_TSC) that KVM_SET_CLOCK refuses.
        let clock = kvm_clock_data {
            clock: self.clock.clock,
            ..Default::default()
        };
        vm.set_clock(&clock)
            .map_err(|e| Error::Kvm("KVM_SET_CLOCK", e))
    }
}

/// The MSRs of `KVM_GET_MSR_INDEX_LIST` that `vcpu` can read. KVM stops a `KVM_GET_MSRS` at
/// the first MSR it cannot read, so such an MSR is dropped and the rest retried.
pub fn readable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<kvm_msr_entry>> {
    let list = kvm
        .get_msr_index_list()
        .map_err(|e| Error::Kvm("KVM_GET_MSR_INDEX_LIST", e))?;
    let mut pending: Vec<u32> = list.as_slice().to_vec();
    let mut readable = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let batch_len = pending.len().min(MSR_BATCH);
        let entries: Vec<kvm_msr_entry> = pending[..batch_len]
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries)
            .map_err(|e| Error::Snapshot(format!("MSR list: {e:?}")))?;
        let read = vcpu
            .get_msrs(&mut msrs)
            .map_err(|e| Error::Kvm("KVM_GET_MSRS", e))?;
        readable.extend_from_slice(&msrs.as_slice()[..read]);
        // `read < batch_len`: entry `read` is unreadable on this host; skip it.
        let consumed = if read < batch_len { read + 1 } else { read };
        pending.drain(..consumed);
    }
    Ok(readable)
}

/// The nested-state ioctls, which kvm-ioctls 0.22 does not wrap.
mod ioctls {
    vmm_sys_util::ioctl_iowr_nr!(
        KVM_GET_NESTED_STATE,
        kvm_bindings::KVMIO,
        0xbe,
        kvm_bindings::kvm_nested_state
    );
    vmm_sys_util::ioctl_iow_nr!(
        KVM_SET_NESTED_STATE,
        kvm_bindings::KVMIO,
        0xbf,
        kvm_bindings::kvm_nested_state
    );
}
use ioctls::{KVM_GET_NESTED_STATE, KVM_SET_NESTED_STATE};

/// Offset of `size` in `struct kvm_nested_state` (after `flags` and `format`, two u16).
const NESTED_SIZE_OFFSET: usize = 4;

fn save_nested_state(kvm: &Kvm, vcpu: &VcpuFd) -> NestedState {
    let max = kvm.check_extension_raw(kvm_bindings::KVM_CAP_NESTED_STATE.into());
    let header = std::mem::size_of::<kvm_bindings::kvm_nested_state>();
    let Ok(max) = usize::try_from(max) else {
        return NestedState::Absent {
            reason: "KVM_CAP_NESTED_STATE is not offered by this host".into(),
        };
    };
    if max < header {
        return NestedState::Absent {
            reason: "KVM_CAP_NESTED_STATE is not offered by this host".into(),
        };
    }
    // u64 words keep the buffer aligned for the kernel's struct.
    let mut words = vec![0u64; max.div_ceil(8)];
    let size = u32::try_from(max).unwrap_or(u32::MAX).to_ne_bytes();
    let bytes: &mut [u8] = bytemuck_words(&mut words);
    bytes[NESTED_SIZE_OFFSET..NESTED_SIZE_OFFSET + 4].copy_from_slice(&size);
    // SAFETY: the buffer holds `max` bytes, at least a `kvm_nested_state` header, and its
    // `size` field says so; KVM writes at most `size` bytes into it.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_mut_ptr(vcpu, KVM_GET_NESTED_STATE(), bytes.as_mut_ptr())
    };
    if ret < 0 {
        let error = std::io::Error::last_os_error();
        return NestedState::Absent {
            reason: format!("KVM_GET_NESTED_STATE: {error}"),
        };
    }
    let mut size = [0u8; 4];
    size.copy_from_slice(&bytes[NESTED_SIZE_OFFSET..NESTED_SIZE_OFFSET + 4]);
    let used = (u32::from_ne_bytes(size) as usize).clamp(header, max);
    NestedState::Present {
        bytes: bytes[..used].to_vec(),
    }
}

fn restore_nested_state(vcpu: &VcpuFd, saved: &[u8]) -> Result<()> {
    let header = std::mem::size_of::<kvm_bindings::kvm_nested_state>();
    let mut size = [0u8; 4];
    size.copy_from_slice(
        saved
            .get(NESTED_SIZE_OFFSET..NESTED_SIZE_OFFSET + 4)
            .ok_or_else(|| Error::Snapshot("nested state shorter than its header".into()))?,
    );
    if saved.len() < header || u32::from_ne_bytes(size) as usize != saved.len() {
        return Err(Error::Snapshot(
            "nested state size does not match its header".into(),
        ));
    }
    let mut words = vec![0u64; saved.len().div_ceil(8)];
    let bytes = bytemuck_words(&mut words);
    bytes[..saved.len()].copy_from_slice(saved);
    // SAFETY: the buffer holds a whole header plus `size` bytes as its header states; KVM
    // only reads from it.
    let ret = unsafe {
        vmm_sys_util::ioctl::ioctl_with_ptr(vcpu, KVM_SET_NESTED_STATE(), bytes.as_ptr())
    };
    if ret < 0 {
        return Err(Error::Sys(
            "KVM_SET_NESTED_STATE",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// The bytes of a word buffer.
fn bytemuck_words(words: &mut [u64]) -> &mut [u8] {
    let len = std::mem::size_of_val(words);
    // SAFETY: u8 has no alignment or validity requirements, the length covers exactly the
    // words' memory, and the returned slice borrows `words` mutably for its lifetime.
    unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) }
}

impl VcpuState {
    /// Reads every piece of `vcpu`'s state (the vCPU must not be running).
    pub fn save(kvm: &Kvm, vcpu: &VcpuFd, id: u8) -> Result<Self> {
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("KVM_GET_CPUID2", e))?;
        // The exit reason of the last KVM_RUN is not part of the state; pending events are.
        Ok(VcpuState {
            id,
            cpuid: cpuid.as_slice().to_vec(),
            msrs: readable_msrs(kvm, vcpu)?,
            regs: vcpu.get_regs().map_err(|e| Error::Kvm("KVM_GET_REGS", e))?,
            sregs: vcpu
                .get_sregs()
                .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?,
            xsave: vcpu
                .get_xsave()
                .map_err(|e| Error::Kvm("KVM_GET_XSAVE", e))?,
            xcrs: vcpu.get_xcrs().map_err(|e| Error::Kvm("KVM_GET_XCRS", e))?,
            debug_regs: vcpu
                .get_debug_regs()
                .map_err(|e| Error::Kvm("KVM_GET_DEBUGREGS", e))?,
            lapic: vcpu
                .get_lapic()
                .map_err(|e| Error::Kvm("KVM_GET_LAPIC", e))?,
            mp_state: vcpu
                .get_mp_state()
                .map_err(|e| Error::Kvm("KVM_GET_MP_STATE", e))?,
            events: vcpu
                .get_vcpu_events()
                .map_err(|e| Error::Kvm("KVM_GET_VCPU_EVENTS", e))?,
            nested: save_nested_state(kvm, vcpu),
        })
    }

    /// Loads the state into a freshly created vCPU, in the order KVM needs: CPUID first (it
    /// decides which MSRs and XSAVE features exist), the LAPIC before the MSRs (the TSC
    /// deadline MSR needs it), the events last (they refer to the registers).
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<()> {
        let cpuid = CpuId::from_entries(&self.cpuid)
            .map_err(|e| Error::Snapshot(format!("CPUID of vCPU {}: {e:?}", self.id)))?;
        vcpu.set_cpuid2(&cpuid)
            .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
        vcpu.set_mp_state(self.mp_state)
            .map_err(|e| Error::Kvm("KVM_SET_MP_STATE", e))?;
        vcpu.set_regs(&self.regs)
            .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
        vcpu.set_sregs(&self.sregs)
            .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
        // SAFETY: `self.xsave` is a full `kvm_xsave` (4 KiB legacy KVM_SET_XSAVE layout) and
        // the vCPU was given the CPUID it was saved with, so no dynamically sized XSAVE
        // feature (AMX) is enabled that would need the larger KVM_SET_XSAVE2 buffer.
        unsafe { vcpu.set_xsave(&self.xsave) }.map_err(|e| Error::Kvm("KVM_SET_XSAVE", e))?;
        vcpu.set_xcrs(&self.xcrs)
            .map_err(|e| Error::Kvm("KVM_SET_XCRS", e))?;
        vcpu.set_debug_regs(&self.debug_regs)
            .map_err(|e| Error::Kvm("KVM_SET_DEBUGREGS", e))?;
        vcpu.set_lapic(&self.lapic)
            .map_err(|e| Error::Kvm("KVM_SET_LAPIC", e))?;
        for chunk in self.msrs.chunks(MSR_BATCH) {
            let msrs = Msrs::from_entries(chunk)
                .map_err(|e| Error::Snapshot(format!("MSR list: {e:?}")))?;
            let written = vcpu
                .set_msrs(&msrs)
                .map_err(|e| Error::Kvm("KVM_SET_MSRS", e))?;
            if written != chunk.len() {
                return Err(Error::Snapshot(format!(
                    "vCPU {}: KVM refused MSR {:#x}",
                    self.id, chunk[written].index
                )));
            }
        }
        vcpu.set_vcpu_events(&self.events)
            .map_err(|e| Error::Kvm("KVM_SET_VCPU_EVENTS", e))?;
        match &self.nested {
            NestedState::Present { bytes } => restore_nested_state(vcpu, bytes),
            NestedState::Absent { .. } => Ok(()),
        }
    }
}
