//! The enforcement boundary: what a backend installs so that the hardware (or the model)
//! stops a vCPU exactly where the permission table says it must be asked.
//!
//! The [`crate::PermissionManager`] owns the authoritative [`PermissionTable`]; after every
//! change it asks the backend to [`sync`](EnforcementBackend::sync) the affected range. A
//! backend may install *less* than a view allows (KVM memslots are VM-wide, so they carry
//! the intersection of all active views and cannot express "executable but not readable");
//! every access it stops that the view does allow comes back as an exit and the manager
//! completes it (emulation or a one-instruction grant). A backend must never install *more*
//! than the faulting vCPU's view allows, except during a grant.

use std::ops::Range;

use crate::error::Result;
use crate::permissions::Permissions;
use crate::table::PermissionTable;

/// Something that enforces the permission table on running vCPUs.
pub trait EnforcementBackend: Send {
    /// Short name for reports ("kvm-memslot", "software-model").
    fn name(&self) -> &'static str;

    /// Whether two vCPUs can run with different permissions on the same page without exits
    /// (true per-vCPU views).
    fn per_vcpu_views(&self) -> bool;

    /// Whether a single-step trap can be taken on code running at privilege level `cpl`
    /// (PVM cannot single-step CPL3 code; the manager then emulates the instruction).
    fn single_step_supported(&self, cpl: u8) -> bool;

    /// Guest RAM as gfn ranges: exits outside these are not permission exits.
    fn guest_ram(&self) -> Vec<Range<u64>>;

    /// Re-installs what `table` says for `gfns`.
    fn sync(&mut self, table: &PermissionTable, gfns: Range<u64>) -> Result<()>;

    /// What `vcpu` can do on `gfn` right now without the backend stopping it.
    fn installed(&self, vcpu: u32, gfn: u64) -> Permissions;

    /// Lets `vcpu` (and, for VM-wide backends, whichever vCPUs the caller has not held)
    /// access each of `gfns` with `permissions` until [`revoke`](EnforcementBackend::revoke).
    /// A vCPU has at most one grant; a new one replaces the old.
    fn grant(&mut self, vcpu: u32, gfns: &[u64], permissions: Permissions) -> Result<()>;

    /// Removes the grant of `vcpu`, restoring what was installed before it.
    fn revoke(&mut self, vcpu: u32) -> Result<()>;
}
