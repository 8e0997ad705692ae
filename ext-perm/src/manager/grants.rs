//! Temporary grants: one instruction run by the emulator, or single-stepped with its
//! pages mapped for the faulting vCPU while the other vCPUs are held.

use std::sync::MutexGuard;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::exits::Decision;
use super::{Inner, PendingGrant, PermissionManager, Refusal};
use crate::backend::EnforcementBackend;
use crate::decode::{translate, FetchedInstruction};
use crate::emulate::{self, DataAccess};
use crate::error::{Error, Result};
use crate::hypervisor::{CpuMode, Registers, VcpuControl};
use crate::permissions::{gfn_of, AccessKind, Permissions, PAGE_SIZE};
use crate::report::{GrantMethod, GrantReport, PermissionEvent, ViolationKind};
use crate::table::PermissionTable;

impl<B: EnforcementBackend, M: GuestMemory + Send + Sync> PermissionManager<B, M> {
    /// Runs the instruction in the emulator with its data accesses checked against the
    /// vCPU's view. `Ok(Err(guard))` hands the lock back when the emulator lacks the
    /// instruction.
    #[allow(clippy::type_complexity)]
    pub(super) fn emulate_granted<'g>(
        &'g self,
        mut inner: MutexGuard<'g, Inner<B>>,
        vcpu: &dyn VcpuControl,
        regs: Registers,
        mode: CpuMode,
        fetched: &FetchedInstruction,
        straddle: bool,
    ) -> Result<std::result::Result<Decision, MutexGuard<'g, Inner<B>>>> {
        let mut next = regs;
        let mut access = ViewChecked {
            vcpu,
            mode,
            memory: &*self.memory,
            table: &inner.table,
            denied: None,
        };
        let result = emulate::execute(&fetched.instruction, &mut next, &mut access);
        let denied = access.denied;
        match result {
            Ok(()) => {}
            Err(Error::UnsupportedInstruction(_)) => return Ok(Err(inner)),
            Err(e) => {
                if let Some((gpa, kind)) = denied {
                    let refusal = Refusal {
                        access: kind,
                        kind: ViolationKind::Data,
                        gpa,
                        rip: regs.rip,
                        instruction: Some(fetched.instruction.to_string()),
                    };
                    return self.refuse(inner, vcpu, refusal).map(Ok);
                }
                return Err(e);
            }
        }
        vcpu.set_registers(&next)?;
        let id = vcpu.id();
        let view = inner.table.view_of(id);
        inner.stats.emulated_grants += 1;
        inner.stats.straddle_grants += u64::from(straddle);
        let gfns = granted_gfns(&inner, id, fetched);
        inner.publish(|sequence| {
            PermissionEvent::Grant(GrantReport {
                sequence,
                vcpu: id,
                view,
                rip: regs.rip,
                instruction: fetched.instruction.to_string(),
                length: fetched.bytes.len(),
                gfns,
                straddle,
                method: GrantMethod::Emulation,
                retired: true,
            })
        });
        Ok(Ok(Decision::GrantEmulated))
    }

    pub(super) fn install_single_step(
        &self,
        vcpu: &dyn VcpuControl,
        regs: Registers,
        fetched: FetchedInstruction,
        text: String,
        straddle: bool,
    ) -> Result<Decision> {
        let id = vcpu.id();
        // Memslots are VM-wide: nobody else may be in guest mode while the page is mapped.
        self.gate.hold_others(id);
        let result = (|| {
            let mut inner = self.lock();
            let gfns = granted_gfns(&inner, id, &fetched);
            let permissions = gfns.iter().fold(Permissions::READ_EXECUTE, |acc, &g| {
                acc.union(inner.table.permissions_for(id, g))
            });
            inner.backend.grant(id, &gfns, permissions)?;
            // Without KVM_CAP_EXIT_ON_EMULATION_FAILURE, KVM queues #UD together with the
            // emulation-failure exit of CPL0 code; writing the registers back (free with
            // sync regs) drops it, so the step runs the instruction instead of the #UD.
            let armed = vcpu
                .set_registers(&regs)
                .and_then(|()| vcpu.set_single_step(true));
            if let Err(e) = armed {
                inner.backend.revoke(id)?;
                return Err(e);
            }
            let view = inner.table.view_of(id);
            inner.pending.insert(
                id,
                PendingGrant {
                    rip: regs.rip,
                    view,
                    instruction: text,
                    length: fetched.bytes.len(),
                    gfns,
                    straddle,
                },
            );
            Ok(Decision::GrantInstalled)
        })();
        if result.is_err() {
            self.gate.release(id);
        }
        result
    }

    /// Drops the single-step grant of a vCPU the VMM stopped before its debug exit: unmaps
    /// the frames, disarms single-step and lets the other vCPUs run.
    pub(super) fn abandon_single_step(&self, vcpu: &dyn VcpuControl) -> Result<()> {
        let id = vcpu.id();
        let mut inner = self.lock();
        let Some(grant) = inner.pending.remove(&id) else {
            return Ok(());
        };
        let revoked = (|| {
            let Inner { table, backend, .. } = &mut *inner;
            backend.revoke(id)?;
            for &g in &grant.gfns {
                backend.sync(table, g..g + 1)?;
            }
            vcpu.set_single_step(false)
        })();
        self.gate.release(id);
        revoked
    }

    pub(super) fn finish_single_step(&self, vcpu: &dyn VcpuControl) -> Result<Decision> {
        let id = vcpu.id();
        let mut inner = self.lock();
        let Some(grant) = inner.pending.remove(&id) else {
            return Ok(Decision::NotHandled);
        };
        let revoked = (|| {
            let Inner { table, backend, .. } = &mut *inner;
            backend.revoke(id)?;
            // The table may have changed while the grant was installed.
            for &g in &grant.gfns {
                backend.sync(table, g..g + 1)?;
            }
            vcpu.set_single_step(false)
        })();
        self.gate.release(id);
        revoked?;
        let retired = vcpu.registers()?.rip != grant.rip;
        inner.stats.single_step_grants += 1;
        inner.stats.straddle_grants += u64::from(grant.straddle);
        inner.publish(|sequence| {
            PermissionEvent::Grant(GrantReport {
                sequence,
                vcpu: id,
                view: grant.view,
                rip: grant.rip,
                instruction: grant.instruction,
                length: grant.length,
                gfns: grant.gfns,
                straddle: grant.straddle,
                method: GrantMethod::SingleStep,
                retired,
            })
        });
        Ok(Decision::GrantCompleted)
    }
}

/// The frames of `fetched` that the backend does not let `vcpu` execute.
pub(super) fn granted_gfns<B: EnforcementBackend>(
    inner: &Inner<B>,
    vcpu: u32,
    fetched: &FetchedInstruction,
) -> Vec<u64> {
    fetched
        .gfns
        .iter()
        .copied()
        .filter(|&g| !inner.backend.installed(vcpu, g).execute())
        .collect()
}

/// Data accesses of an emulated instruction, checked against the vCPU's view.
struct ViewChecked<'a, M> {
    vcpu: &'a dyn VcpuControl,
    mode: CpuMode,
    memory: &'a M,
    table: &'a PermissionTable,
    denied: Option<(u64, AccessKind)>,
}

impl<M: GuestMemory> ViewChecked<'_, M> {
    /// Splits `gva..gva+len` at page boundaries into (gpa, offset, length) pieces, each
    /// checked against the view.
    fn pieces(
        &mut self,
        gva: u64,
        len: usize,
        access: AccessKind,
    ) -> Result<Vec<(u64, usize, usize)>> {
        let mut out = Vec::new();
        let mut done = 0;
        while done < len {
            let at = gva.wrapping_add(done as u64);
            let chunk = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(len - done);
            let gpa = translate(self.vcpu, self.memory, self.mode, at)?;
            if !self
                .table
                .permissions_for(self.vcpu.id(), gfn_of(gpa))
                .allows(access)
            {
                self.denied = Some((gpa, access));
                return Err(Error::GuestMemory {
                    gpa,
                    reason: format!("{access:?} denied by the view"),
                });
            }
            out.push((gpa, done, chunk));
            done += chunk;
        }
        Ok(out)
    }
}

impl<M: GuestMemory> DataAccess for ViewChecked<'_, M> {
    fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<()> {
        for (gpa, offset, len) in self.pieces(gva, buf.len(), AccessKind::Read)? {
            self.memory
                .read_slice(&mut buf[offset..offset + len], GuestAddress(gpa))
                .map_err(|e| Error::GuestMemory {
                    gpa,
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }

    fn write(&mut self, gva: u64, data: &[u8]) -> Result<()> {
        // Check every piece before writing any, so a refused write leaves memory untouched.
        let pieces = self.pieces(gva, data.len(), AccessKind::Write)?;
        for (gpa, offset, len) in pieces {
            self.memory
                .write_slice(&data[offset..offset + len], GuestAddress(gpa))
                .map_err(|e| Error::GuestMemory {
                    gpa,
                    reason: e.to_string(),
                })?;
        }
        Ok(())
    }
}
