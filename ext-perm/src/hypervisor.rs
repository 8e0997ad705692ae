//! The vCPU operations `ext-perm` needs from a hypervisor, as one small trait.
//!
//! The VMM implements [`VcpuControl`] for its vCPU type (this crate implements it for
//! `kvm_ioctls::VcpuFd` in [`crate::kvm::KvmVcpu`]; Cloud Hypervisor's `hypervisor::Vcpu` can
//! implement it the same way). Guest memory is not part of the trait: `ext-perm` reads and
//! writes it through `vm-memory`, which every rust-vmm VMM already has.

use crate::error::Result;

/// General-purpose registers, RIP and RFLAGS.
///
/// `gprs` follows the x86 encoding order: RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8..R15.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Registers {
    /// RAX..R15 in encoding order.
    pub gprs: [u64; 16],
    /// Instruction pointer.
    pub rip: u64,
    /// Flags register.
    pub rflags: u64,
}

impl Registers {
    /// Index of RAX in [`Registers::gprs`].
    pub const RAX: usize = 0;
    /// Index of RBX in [`Registers::gprs`].
    pub const RBX: usize = 3;
}

/// The execution mode of a vCPU, as far as decoding and policy care.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuMode {
    /// Current privilege level (0 = kernel, 3 = user).
    pub cpl: u8,
    /// Code size: 16, 32 or 64.
    pub bitness: u32,
    /// Whether paging is on (otherwise GVA = GPA, modulo segmentation).
    pub paging: bool,
    /// CR3 when the vCPU uses 4-level long-mode paging: `ext-perm` then walks the guest page
    /// tables itself instead of asking the hypervisor (`KVM_TRANSLATE` costs an ioctl per
    /// page). `None` for every other paging mode.
    pub long_mode_cr3: Option<u64>,
}

/// vCPU operations the exit handler uses.
///
/// All methods are called on the vCPU's own thread, between two runs of that vCPU.
pub trait VcpuControl {
    /// The vCPU's index, the key of the vCPU → view assignment.
    fn id(&self) -> u32;
    /// Reads the general-purpose registers.
    fn registers(&self) -> Result<Registers>;
    /// Writes the general-purpose registers.
    fn set_registers(&self, registers: &Registers) -> Result<()>;
    /// Privilege level and code size.
    fn mode(&self) -> Result<CpuMode>;
    /// Translates a guest-virtual address through the guest's page tables
    /// (`KVM_TRANSLATE`). `Ok(None)` means the address is not mapped.
    fn translate(&self, gva: u64) -> Result<Option<u64>>;
    /// Arms or disarms single-stepping (`KVM_SET_GUEST_DEBUG` with
    /// `KVM_GUESTDBG_SINGLESTEP`): with it armed, the next run exits after one instruction.
    fn set_single_step(&self, enabled: bool) -> Result<()>;
    /// Queues an exception for delivery at the next run (`KVM_SET_VCPU_EVENTS`).
    fn inject_exception(&self, vector: u8, error_code: Option<u32>) -> Result<()>;
}
