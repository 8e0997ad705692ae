//! Guest-physical page permissions with per-vCPU views and temporary grants (patent EP2801025).
//!
//! `ext-perm` keeps the authoritative table of read/write/execute permissions per guest frame
//! in each *view*, assigns every vCPU a view, and decides what to do with each permission fault
//! a VMM's vCPU exit loop hands it: allow, deny, emulate a data access, or run an instruction
//! that straddles into a non-executable page once under a grant for that vCPU alone.
//! Enforcement is delegated to a backend (KVM memslots, or a software model used as the oracle).
//!
//! Who calls what:
//! - the VMM's API thread: [`PermissionControl`] (serde bodies in [`api`]) or the
//!   [`PermissionManager`] methods directly;
//! - each vCPU thread: [`RunGate::enter`]/[`RunGate::leave`] around `KVM_RUN`, and
//!   [`ExitHandler::handle_exit`] for MMIO, internal-error and debug exits, with the vCPU
//!   behind [`VcpuControl`] ([`kvm::KvmVcpu`] for `kvm_ioctls::VcpuFd`);
//! - device emulation: [`PermissionManager::check_access`] before touching guest memory for
//!   a vCPU.
//!
//! See `DESIGN.md` for the design and what KVM can and cannot enforce.

pub mod api;
pub mod backend;
pub mod decode;
pub mod emulate;
mod error;
pub mod hold;
pub mod hypervisor;
pub mod kvm;
pub mod manager;
pub mod model;
pub mod permissions;
pub mod report;
pub mod table;

pub use api::PermissionControl;
pub use backend::EnforcementBackend;
pub use error::{Error, Result};
pub use hold::RunGate;
pub use hypervisor::{CpuMode, Registers, VcpuControl};
pub use manager::{
    Decision, DenyAction, ExitHandler, GrantPreference, ManagerConfig, PermissionExit,
    PermissionManager, StraddlePolicy,
};
pub use permissions::{AccessKind, Permissions, PAGE_SIZE};
pub use report::{GrantMethod, GrantReport, PermissionEvent, PermissionStats, ViolationReport};
pub use table::{PermissionTable, ViewId, DEFAULT_VIEW};
