//! KVM implementations: the memslot backend, the capability probe, the vCPU adapter, a
//! reference exit loop, and a minimal hand-built long-mode guest used by the tests and the
//! benchmark.

mod caps;
mod exit_loop;
pub mod guest;
mod memslots;
mod vcpu;

pub use caps::{probe_and_configure, CapabilityReport, KVM_X86_QUIRK_SLOT_ZAP_ALL};
pub use exit_loop::{run_vcpu, VcpuStop};
pub use memslots::KvmMemslotBackend;
pub use vcpu::{
    complete_mmio_read, discard_pending_sync_regs, enable_sync_regs, internal_error_suberror,
    KvmSyncVcpu, KvmVcpu,
};
