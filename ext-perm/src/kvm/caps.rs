//! Capability probe: what this KVM can enforce, reported once at start.

use kvm_bindings::{
    kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DISABLE_QUIRKS2,
    KVM_CAP_EXIT_ON_EMULATION_FAILURE, KVM_CAP_MEMORY_ATTRIBUTES, KVM_CAP_NR_MEMSLOTS,
    KVM_CAP_READONLY_MEM, KVM_CAP_SET_GUEST_DEBUG2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// `KVM_CAP_SET_GUEST_DEBUG` (not exported by kvm-bindings 0.12).
const KVM_CAP_SET_GUEST_DEBUG: u32 = 23;
/// `KVM_CAP_SYNC_REGS`.
const KVM_CAP_SYNC_REGS: u32 = 74;
/// `KVM_X86_QUIRK_SLOT_ZAP_ALL`: with it on, deleting any memslot zaps every shadow page.
pub const KVM_X86_QUIRK_SLOT_ZAP_ALL: u64 = 1 << 7;

/// What the host's KVM offers the memslot backend. Serialized for the REST layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapabilityReport {
    /// Which KVM flavour `/dev/kvm` is: "kvm_pvm", "kvm_intel", "kvm_amd" or "unknown".
    pub flavour: String,
    /// `KVM_CAP_NR_MEMSLOTS`.
    pub nr_memslots: u32,
    /// `KVM_CAP_READONLY_MEM`: write protection through read-only memslots.
    pub readonly_mem: bool,
    /// `KVM_CAP_DISABLE_QUIRKS2`: bitmask of quirks that can be disabled.
    pub disable_quirks2: u64,
    /// Whether `KVM_X86_QUIRK_SLOT_ZAP_ALL` was disabled on this VM.
    pub slot_zap_all_disabled: bool,
    /// `KVM_CAP_MEMORY_ATTRIBUTES`: supported attribute mask (0 = none; RWX attributes are
    /// not in mainline).
    pub memory_attributes: u64,
    /// `KVM_CAP_SET_GUEST_DEBUG`.
    pub guest_debug: bool,
    /// `KVM_CAP_SET_GUEST_DEBUG2`: supported `KVM_GUESTDBG_*` flags (0 if the cap is absent).
    pub guest_debug_flags: u64,
    /// Whether single-step traps CPL3 code (PVM runs CPL3 natively and cannot).
    pub single_step_user_mode: bool,
    /// `KVM_CAP_DIRTY_LOG_RING`: maximum ring size in bytes (0 = no ring).
    pub dirty_log_ring: u64,
    /// Whether `KVM_CAP_EXIT_ON_EMULATION_FAILURE` was enabled: every emulation failure
    /// (a fetch from an unbacked GPA) exits to userspace at any CPL, without KVM queueing
    /// #UD. Without it, KVM injects #UD into CPL3 code instead of exiting.
    pub exit_on_emulation_failure: bool,
    /// `KVM_CAP_SYNC_REGS`: register sets KVM can mirror in `kvm_run` (the reference exit
    /// loop uses regs and sregs, 0x3).
    pub sync_regs: u64,
}

fn flavour() -> String {
    ["kvm_pvm", "kvm_intel", "kvm_amd"]
        .iter()
        .find(|m| std::path::Path::new(&format!("/sys/module/{m}")).exists())
        .map_or_else(|| "unknown".to_string(), |m| m.to_string())
}

/// Probes `vm` and, where supported, disables the slot-zap-all quirk so that deleting one
/// memslot only drops the mappings of that slot (otherwise every protection change costs a
/// full guest re-fault), and enables exit-on-emulation-failure so that fetches from unbacked
/// GPAs reach the manager at every CPL.
pub fn probe_and_configure(vm: &VmFd) -> Result<CapabilityReport> {
    let raw = |cap: u32| i64::from(vm.check_extension_raw(libc::c_ulong::from(cap)));
    let disable_quirks2 = raw(KVM_CAP_DISABLE_QUIRKS2).max(0) as u64;
    let mut slot_zap_all_disabled = false;
    if disable_quirks2 & KVM_X86_QUIRK_SLOT_ZAP_ALL != 0 {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_DISABLE_QUIRKS2,
            ..Default::default()
        };
        cap.args[0] = KVM_X86_QUIRK_SLOT_ZAP_ALL;
        vm.enable_cap(&cap).map_err(|source| Error::Kvm {
            operation: "KVM_ENABLE_CAP(DISABLE_QUIRKS2)",
            source,
        })?;
        slot_zap_all_disabled = true;
    }
    let mut exit_on_emulation_failure = false;
    if raw(KVM_CAP_EXIT_ON_EMULATION_FAILURE) > 0 {
        let mut cap = kvm_enable_cap {
            cap: KVM_CAP_EXIT_ON_EMULATION_FAILURE,
            ..Default::default()
        };
        cap.args[0] = 1;
        vm.enable_cap(&cap).map_err(|source| Error::Kvm {
            operation: "KVM_ENABLE_CAP(EXIT_ON_EMULATION_FAILURE)",
            source,
        })?;
        exit_on_emulation_failure = true;
    }
    let flavour = flavour();
    Ok(CapabilityReport {
        single_step_user_mode: flavour != "kvm_pvm",
        flavour,
        nr_memslots: raw(KVM_CAP_NR_MEMSLOTS).max(0) as u32,
        readonly_mem: raw(KVM_CAP_READONLY_MEM) > 0,
        disable_quirks2,
        slot_zap_all_disabled,
        memory_attributes: raw(KVM_CAP_MEMORY_ATTRIBUTES).max(0) as u64,
        guest_debug: raw(KVM_CAP_SET_GUEST_DEBUG) > 0,
        guest_debug_flags: raw(KVM_CAP_SET_GUEST_DEBUG2).max(0) as u64,
        dirty_log_ring: raw(KVM_CAP_DIRTY_LOG_RING).max(0) as u64,
        exit_on_emulation_failure,
        sync_regs: raw(KVM_CAP_SYNC_REGS).max(0) as u64,
    })
}
