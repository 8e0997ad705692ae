//! KVM implementations: the memslot backend, the capability probe, the vCPU adapter and a
//! reference exit loop. (The hand-built test guest is the tests' own: `tests/common/guest.rs`.)

mod caps;
mod exit_loop;
mod memslots;
mod vcpu;

pub use caps::{probe_and_configure, CapabilityReport, KVM_X86_QUIRK_SLOT_ZAP_ALL};
pub use exit_loop::{run_vcpu, VcpuStop};
pub use memslots::KvmMemslotBackend;
pub use vcpu::{
    complete_mmio_read, discard_pending_sync_regs, enable_sync_regs, internal_error_suberror,
    KvmSyncVcpu, KvmVcpu,
};
