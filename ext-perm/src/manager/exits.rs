//! The exit path: what the manager decides for each MMIO, internal-error and debug exit.
//!
//! The VMM's vCPU loop builds a [`PermissionExit`] from each `KVM_EXIT_MMIO`,
//! `KVM_EXIT_INTERNAL_ERROR` and `KVM_EXIT_DEBUG` and calls [`ExitHandler::handle_exit`]
//! with the vCPU; the returned [`Decision`] says whether to re-enter the vCPU, stop it, or
//! handle the exit as if `ext-perm` were not there.

use std::sync::MutexGuard;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{DenyAction, GrantPreference, Inner, PermissionManager, Refusal, StraddlePolicy};
use crate::backend::EnforcementBackend;
use crate::decode::fetch_instruction;
use crate::error::{Error, Result};
use crate::hypervisor::VcpuControl;
use crate::permissions::{gfn_of, AccessKind, Permissions, PAGE_SIZE};
use crate::report::{DenyOutcome, PermissionEvent, ViolationKind, ViolationReport};

/// `KVM_INTERNAL_ERROR_EMULATION`: the suberror of a fetch from an unbacked GPA.
const INTERNAL_ERROR_EMULATION: u32 = 1;
/// A vCPU exit that may be a permission fault, as the VMM's exit loop sees it.
#[derive(Debug)]
pub enum PermissionExit<'a> {
    /// `VcpuExit::MmioRead(gpa, data)`: `data` is filled when the read is emulated.
    MmioRead {
        /// Guest-physical address read.
        gpa: u64,
        /// KVM's completion buffer for the read.
        data: &'a mut [u8],
    },
    /// `VcpuExit::MmioWrite(gpa, data)`.
    MmioWrite {
        /// Guest-physical address written.
        gpa: u64,
        /// The bytes the guest wrote.
        data: &'a [u8],
    },
    /// `VcpuExit::InternalError` with the suberror from `kvm_run`
    /// ([`crate::kvm::internal_error_suberror`]).
    InternalError {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
    },
    /// `VcpuExit::Debug`: a single step finished.
    Debug,
}

/// What the VMM does after [`ExitHandler::handle_exit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not a permission exit (device MMIO, a real emulation failure, the VMM's own
    /// debugging): handle it as without `ext-perm`.
    NotHandled,
    /// The view allows the access; it was completed from backing memory (for a read, the
    /// exit's data buffer is filled). Re-enter the vCPU.
    Emulated,
    /// The access was refused and reported. With `stop`, stop the vCPU; otherwise an
    /// exception was queued and the vCPU is re-entered.
    Denied {
        /// Whether the VMM must stop this vCPU.
        stop: bool,
    },
    /// A one-instruction grant is installed and single-step armed: re-enter the vCPU and hand
    /// the resulting `KVM_EXIT_DEBUG` back. Other vCPUs are held until then.
    GrantInstalled,
    /// The instruction was run under a grant by the software emulator. Re-enter the vCPU.
    GrantEmulated,
    /// The single-stepped instruction retired; the grant is revoked and other vCPUs run
    /// again. Re-enter the vCPU.
    GrantCompleted,
}

impl Decision {
    /// Whether the VMM should run the vCPU again (false for `NotHandled`: the VMM decides).
    pub fn resume(self) -> bool {
        !matches!(self, Decision::NotHandled | Decision::Denied { stop: true })
    }
}

/// The entry point of the VMM's vCPU exit loop.
pub trait ExitHandler: Send + Sync {
    /// Decides what happens with `exit` of `vcpu`. Called on the vCPU's thread, after
    /// `RunGate::leave` and before the next `RunGate::enter`.
    fn handle_exit(&self, vcpu: &dyn VcpuControl, exit: PermissionExit<'_>) -> Result<Decision>;

    /// The VMM stops running `vcpu` (pause, shutdown, an exit it does not resume from):
    /// a grant still waiting for its debug exit is revoked and the other vCPUs are released.
    /// Call it whenever the loop leaves without re-entering after a resuming decision.
    fn vcpu_stopped(&self, vcpu: &dyn VcpuControl) -> Result<()>;
}

impl<B: EnforcementBackend, M: GuestMemory + Send + Sync> PermissionManager<B, M> {
    pub(super) fn refuse(
        &self,
        inner: MutexGuard<'_, Inner<B>>,
        vcpu: &dyn VcpuControl,
        refusal: Refusal,
    ) -> Result<Decision> {
        let mut inner = inner;
        let id = vcpu.id();
        let view = inner.table.view_of(id);
        let permissions = inner.table.permissions_for(id, gfn_of(refusal.gpa));
        let outcome = match self.config.deny_action {
            DenyAction::Stop => DenyOutcome::Stopped,
            DenyAction::InjectException { .. } => DenyOutcome::FaultInjected,
        };
        inner.stats.violations += 1;
        inner.publish(|sequence| {
            PermissionEvent::Violation(ViolationReport {
                sequence,
                vcpu: id,
                view,
                access: refusal.access,
                kind: refusal.kind,
                gpa: refusal.gpa,
                permissions,
                rip: refusal.rip,
                instruction: refusal.instruction,
                outcome,
            })
        });
        drop(inner);
        match self.config.deny_action {
            DenyAction::Stop => Ok(Decision::Denied { stop: true }),
            DenyAction::InjectException { vector, error_code } => {
                vcpu.inject_exception(vector, error_code)?;
                Ok(Decision::Denied { stop: false })
            }
        }
    }

    fn data_exit(
        &self,
        vcpu: &dyn VcpuControl,
        gpa: u64,
        access: AccessKind,
        read: Option<&mut [u8]>,
        written: Option<&[u8]>,
    ) -> Result<Decision> {
        let len = read
            .as_ref()
            .map_or(0, |d| d.len())
            .max(written.map_or(0, |d| d.len()));
        let last = gpa.saturating_add(len.max(1) as u64 - 1);
        let id = vcpu.id();
        let mut inner = self.lock();
        if !inner.in_ram(gfn_of(gpa)) || !inner.in_ram(gfn_of(last)) {
            return Ok(Decision::NotHandled);
        }
        inner.stats.exits += 1;
        let denied = (gfn_of(gpa)..=gfn_of(last))
            .find(|&g| !inner.table.permissions_for(id, g).allows(access));
        if let Some(gfn) = denied {
            if let Some(data) = read {
                data.fill(0xff);
            }
            let rip = vcpu.registers()?.rip;
            let gpa = gpa.max(gfn * PAGE_SIZE);
            let kind = ViolationKind::Data;
            return self.refuse(
                inner,
                vcpu,
                Refusal {
                    access,
                    kind,
                    gpa,
                    rip,
                    instruction: None,
                },
            );
        }
        let memory_error = |e: vm_memory::GuestMemoryError| Error::GuestMemory {
            gpa,
            reason: e.to_string(),
        };
        if let Some(data) = read {
            self.memory
                .read_slice(data, GuestAddress(gpa))
                .map_err(memory_error)?;
            inner.stats.emulated_reads += 1;
        }
        if let Some(data) = written {
            self.memory
                .write_slice(data, GuestAddress(gpa))
                .map_err(memory_error)?;
            inner.stats.emulated_writes += 1;
        }
        Ok(Decision::Emulated)
    }

    fn fetch_exit(&self, vcpu: &dyn VcpuControl) -> Result<Decision> {
        let id = vcpu.id();
        // A single-stepped instruction that faults again must not keep its grant.
        if self.lock().pending.contains_key(&id) {
            self.finish_single_step(vcpu)?;
        }
        let regs = vcpu.registers()?;
        let mode = vcpu.mode()?;
        let Ok(fetched) = fetch_instruction(vcpu, &*self.memory, mode, regs.rip) else {
            return Ok(Decision::NotHandled);
        };
        let inner = self.lock();
        let ours = fetched.gfns.iter().all(|&g| inner.in_ram(g))
            && fetched
                .gfns
                .iter()
                .any(|&g| !inner.backend.installed(id, g).execute());
        if !ours {
            return Ok(Decision::NotHandled);
        }
        let mut inner = inner;
        inner.stats.exits += 1;
        let text = fetched.instruction.to_string();
        let view_perms: Vec<Permissions> = fetched
            .gfns
            .iter()
            .map(|&g| inner.table.permissions_for(id, g))
            .collect();
        let page_gpa = |g: u64| g * PAGE_SIZE;
        let execute_refusal = |kind, gpa, text| Refusal {
            access: AccessKind::Execute,
            kind,
            gpa,
            rip: regs.rip,
            instruction: Some(text),
        };
        if !view_perms[0].execute() {
            let gpa = page_gpa(fetched.gfns[0]) + regs.rip % PAGE_SIZE;
            let refusal = execute_refusal(ViolationKind::Execute, gpa, text);
            return self.refuse(inner, vcpu, refusal);
        }
        let straddle = view_perms.iter().position(|p| !p.execute());
        if let Some(i) = straddle {
            if self.config.straddle == StraddlePolicy::Deny {
                let gpa = page_gpa(fetched.gfns[i]);
                let refusal = execute_refusal(ViolationKind::Straddle, gpa, text);
                return self.refuse(inner, vcpu, refusal);
            }
        }
        let single_step = inner.backend.single_step_supported(mode.cpl);
        let emulate_first = match self.config.grant {
            GrantPreference::Auto => !single_step,
            GrantPreference::SingleStep => false,
            GrantPreference::Emulation => true,
        };
        let straddle = straddle.is_some();
        if emulate_first {
            match self.emulate_granted(inner, vcpu, regs, mode, &fetched, straddle)? {
                Ok(decision) => return Ok(decision),
                Err(inner_back) => inner = inner_back,
            }
        }
        if !single_step {
            let gpa = page_gpa(fetched.gfns[fetched.gfns.len() - 1]);
            let (access, kind, rip) = (AccessKind::Execute, ViolationKind::Unsupported, regs.rip);
            return self.refuse(
                inner,
                vcpu,
                Refusal {
                    access,
                    kind,
                    gpa,
                    rip,
                    instruction: Some(text),
                },
            );
        }
        drop(inner);
        self.install_single_step(vcpu, regs, fetched, text, straddle)
    }
}

impl<B: EnforcementBackend, M: GuestMemory + Send + Sync> ExitHandler for PermissionManager<B, M> {
    fn handle_exit(&self, vcpu: &dyn VcpuControl, exit: PermissionExit<'_>) -> Result<Decision> {
        match exit {
            PermissionExit::MmioRead { gpa, data } => {
                self.data_exit(vcpu, gpa, AccessKind::Read, Some(data), None)
            }
            PermissionExit::MmioWrite { gpa, data } => {
                self.data_exit(vcpu, gpa, AccessKind::Write, None, Some(data))
            }
            PermissionExit::InternalError { suberror } if suberror == INTERNAL_ERROR_EMULATION => {
                self.fetch_exit(vcpu)
            }
            PermissionExit::InternalError { .. } => Ok(Decision::NotHandled),
            PermissionExit::Debug => self.finish_single_step(vcpu),
        }
    }

    fn vcpu_stopped(&self, vcpu: &dyn VcpuControl) -> Result<()> {
        self.abandon_single_step(vcpu)
    }
}
