//! [`VcpuControl`] for `kvm_ioctls::VcpuFd`, and the translation of KVM exits into
//! [`crate::PermissionExit`]s.

use std::cell::RefCell;

use kvm_bindings::{
    kvm_guest_debug, kvm_regs, KVM_EXIT_INTERNAL_ERROR, KVM_GUESTDBG_BLOCKIRQ, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP,
};
use kvm_ioctls::{SyncReg, VcpuFd};

use crate::error::{Error, Result};
use crate::hypervisor::{CpuMode, Registers, VcpuControl};

/// A KVM vCPU seen through [`VcpuControl`].
pub struct KvmVcpu<'a> {
    fd: &'a VcpuFd,
    id: u32,
}

impl<'a> KvmVcpu<'a> {
    /// Wraps `fd`, the vCPU with index `id`.
    pub fn new(fd: &'a VcpuFd, id: u32) -> Self {
        Self { fd, id }
    }
}

fn kvm_error(operation: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
    move |source| Error::Kvm { operation, source }
}

fn to_registers(r: &kvm_regs) -> Registers {
    Registers {
        gprs: [
            r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15,
        ],
        rip: r.rip,
        rflags: r.rflags,
    }
}

fn to_kvm_regs(r: &Registers) -> kvm_regs {
    let g = &r.gprs;
    kvm_regs {
        rax: g[0],
        rcx: g[1],
        rdx: g[2],
        rbx: g[3],
        rsp: g[4],
        rbp: g[5],
        rsi: g[6],
        rdi: g[7],
        r8: g[8],
        r9: g[9],
        r10: g[10],
        r11: g[11],
        r12: g[12],
        r13: g[13],
        r14: g[14],
        r15: g[15],
        rip: r.rip,
        rflags: r.rflags,
    }
}

impl VcpuControl for KvmVcpu<'_> {
    fn id(&self) -> u32 {
        self.id
    }

    fn registers(&self) -> Result<Registers> {
        let regs = self.fd.get_regs().map_err(kvm_error("KVM_GET_REGS"))?;
        Ok(to_registers(&regs))
    }

    fn set_registers(&self, registers: &Registers) -> Result<()> {
        self.fd
            .set_regs(&to_kvm_regs(registers))
            .map_err(kvm_error("KVM_SET_REGS"))
    }

    fn mode(&self) -> Result<CpuMode> {
        let sregs = self.fd.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?;
        Ok(mode_of(&sregs))
    }

    fn translate(&self, gva: u64) -> Result<Option<u64>> {
        let t = self
            .fd
            .translate_gva(gva)
            .map_err(kvm_error("KVM_TRANSLATE"))?;
        Ok((t.valid != 0).then_some(t.physical_address))
    }

    fn set_single_step(&self, enabled: bool) -> Result<()> {
        let with = |control: u32| kvm_guest_debug {
            control,
            ..Default::default()
        };
        if !enabled {
            return self
                .fd
                .set_guest_debug(&with(0))
                .map_err(kvm_error("KVM_SET_GUEST_DEBUG"));
        }
        // BLOCKIRQ keeps a pending interrupt from being delivered inside the step, so the
        // step ends after the granted instruction rather than in an interrupt handler.
        // Kernels before 5.16 reject it; single-step still works there.
        let step = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
        self.fd
            .set_guest_debug(&with(step | KVM_GUESTDBG_BLOCKIRQ))
            .or_else(|_| self.fd.set_guest_debug(&with(step)))
            .map_err(kvm_error("KVM_SET_GUEST_DEBUG"))
    }

    fn inject_exception(&self, vector: u8, error_code: Option<u32>) -> Result<()> {
        let mut events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm_error("KVM_GET_VCPU_EVENTS"))?;
        events.exception.injected = 1;
        events.exception.nr = vector;
        events.exception.has_error_code = u8::from(error_code.is_some());
        events.exception.error_code = error_code.unwrap_or(0);
        events.exception.pending = 0;
        self.fd
            .set_vcpu_events(&events)
            .map_err(kvm_error("KVM_SET_VCPU_EVENTS"))
    }
}

/// A KVM vCPU seen through [`VcpuControl`] using `KVM_CAP_SYNC_REGS`: registers and system
/// registers are read from `kvm_run` (KVM stores them there at every exit) and written back
/// through it at the next `KVM_RUN`, saving the three ioctls (`KVM_GET_REGS`,
/// `KVM_GET_SREGS`, `KVM_SET_REGS`) an exit decision otherwise costs (about 6 µs each on
/// PVM). The caller must have called [`enable_sync_regs`] before the run whose exit this
/// handles.
pub struct KvmSyncVcpu<'a> {
    fd: RefCell<&'a mut VcpuFd>,
    id: u32,
}

impl<'a> KvmSyncVcpu<'a> {
    /// Wraps `fd`, the vCPU with index `id`.
    pub fn new(fd: &'a mut VcpuFd, id: u32) -> Self {
        Self {
            fd: RefCell::new(fd),
            id,
        }
    }
}

/// Asks KVM to store registers and system registers in `kvm_run` at every exit of `fd`.
pub fn enable_sync_regs(fd: &mut VcpuFd) {
    fd.set_sync_valid_reg(SyncReg::Register);
    fd.set_sync_valid_reg(SyncReg::SystemRegister);
}

/// Drops register writes queued in `kvm_run` that were not consumed by a `KVM_RUN`, so a
/// later `KVM_SET_REGS` by the VMM is not overwritten at the next entry.
pub fn discard_pending_sync_regs(fd: &mut VcpuFd) {
    fd.clear_sync_dirty_reg(SyncReg::Register);
}

fn mode_of(sregs: &kvm_bindings::kvm_sregs) -> CpuMode {
    let bitness = if sregs.efer & (1 << 10) != 0 && sregs.cs.l != 0 {
        64
    } else if sregs.cs.db != 0 {
        32
    } else {
        16
    };
    let paging = sregs.cr0 & (1 << 31) != 0;
    let long_mode = sregs.efer & (1 << 10) != 0;
    let five_level = sregs.cr4 & (1 << 12) != 0;
    CpuMode {
        cpl: sregs.cs.dpl,
        bitness,
        paging,
        long_mode_cr3: (paging && long_mode && !five_level).then_some(sregs.cr3),
    }
}

impl VcpuControl for KvmSyncVcpu<'_> {
    fn id(&self) -> u32 {
        self.id
    }

    fn registers(&self) -> Result<Registers> {
        Ok(to_registers(&self.fd.borrow().sync_regs().regs))
    }

    fn set_registers(&self, registers: &Registers) -> Result<()> {
        let mut fd = self.fd.borrow_mut();
        fd.sync_regs_mut().regs = to_kvm_regs(registers);
        fd.set_sync_dirty_reg(SyncReg::Register);
        Ok(())
    }

    fn mode(&self) -> Result<CpuMode> {
        Ok(mode_of(&self.fd.borrow().sync_regs().sregs))
    }

    fn translate(&self, gva: u64) -> Result<Option<u64>> {
        KvmVcpu::new(&self.fd.borrow(), self.id).translate(gva)
    }

    fn set_single_step(&self, enabled: bool) -> Result<()> {
        KvmVcpu::new(&self.fd.borrow(), self.id).set_single_step(enabled)
    }

    fn inject_exception(&self, vector: u8, error_code: Option<u32>) -> Result<()> {
        KvmVcpu::new(&self.fd.borrow(), self.id).inject_exception(vector, error_code)
    }
}

/// The `suberror` of the last `KVM_EXIT_INTERNAL_ERROR` of `fd`, for
/// [`crate::PermissionExit::InternalError`] (`VcpuExit::InternalError` does not carry it).
pub fn internal_error_suberror(fd: &mut VcpuFd) -> Option<u32> {
    let run = fd.get_kvm_run();
    if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
        return None;
    }
    // SAFETY: `exit_reason` is KVM_EXIT_INTERNAL_ERROR, so KVM filled the `internal` member
    // of the exit union; reading a plain-integer field of it is sound.
    Some(unsafe { run.__bindgen_anon_1.internal.suberror })
}

/// Copies `data` into the completion buffer of the pending `KVM_EXIT_MMIO` read of `fd`, for
/// VMMs that copied the buffer out to call the handler without holding `fd` borrowed.
/// Returns false when the last exit was not an MMIO read of at least `data.len()` bytes.
pub fn complete_mmio_read(fd: &mut VcpuFd, data: &[u8]) -> bool {
    let run = fd.get_kvm_run();
    if run.exit_reason != kvm_bindings::KVM_EXIT_MMIO {
        return false;
    }
    // SAFETY: `exit_reason` is KVM_EXIT_MMIO, so the `mmio` member of the exit union is the
    // one KVM filled; it is plain data and we only write within its 8-byte buffer.
    let mmio = unsafe { &mut run.__bindgen_anon_1.mmio };
    if mmio.is_write != 0 || (mmio.len as usize) < data.len() || data.len() > mmio.data.len() {
        return false;
    }
    mmio.data[..data.len()].copy_from_slice(data);
    true
}
