//! The software model: a backend that enforces the full semantics (true per-vCPU views,
//! execute-only pages, one-vCPU grants), and a software vCPU that runs guest code against it
//! through the same exit protocol KVM uses. Together they are the oracle the KVM backend is
//! tested against, and a backend for VMMs whose hypervisor cannot enforce anything.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::ops::Range;

use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::backend::EnforcementBackend;
use crate::decode::MAX_INSTRUCTION_LENGTH;
use crate::emulate::{self, DataAccess};
use crate::error::{Error, Result};
use crate::hypervisor::{CpuMode, Registers, VcpuControl};
use crate::manager::{Decision, ExitHandler, PermissionExit};
use crate::permissions::{gfn_of, AccessKind, Permissions, PAGE_SIZE};
use crate::table::PermissionTable;

/// Enforces the table exactly, per vCPU.
pub struct SoftwareModel {
    ram: Vec<Range<u64>>,
    installed: PermissionTable,
    grants: BTreeMap<u32, (Vec<u64>, Permissions)>,
}

impl SoftwareModel {
    /// A model of a guest whose RAM covers `ram` (gfn ranges).
    pub fn new(ram: Vec<Range<u64>>) -> Self {
        Self {
            ram,
            installed: PermissionTable::new(),
            grants: BTreeMap::new(),
        }
    }
}

impl EnforcementBackend for SoftwareModel {
    fn name(&self) -> &'static str {
        "software-model"
    }

    fn per_vcpu_views(&self) -> bool {
        true
    }

    fn single_step_supported(&self, _cpl: u8) -> bool {
        true
    }

    fn guest_ram(&self) -> Vec<Range<u64>> {
        self.ram.clone()
    }

    fn sync(&mut self, table: &PermissionTable, _gfns: Range<u64>) -> Result<()> {
        self.installed = table.clone();
        Ok(())
    }

    fn installed(&self, vcpu: u32, gfn: u64) -> Permissions {
        let base = self.installed.permissions_for(vcpu, gfn);
        match self.grants.get(&vcpu) {
            Some((gfns, extra)) if gfns.contains(&gfn) => base.union(*extra),
            _ => base,
        }
    }

    fn grant(&mut self, vcpu: u32, gfns: &[u64], permissions: Permissions) -> Result<()> {
        self.grants.insert(vcpu, (gfns.to_vec(), permissions));
        Ok(())
    }

    fn revoke(&mut self, vcpu: u32) -> Result<()> {
        self.grants.remove(&vcpu);
        Ok(())
    }
}

/// Why [`ModelVcpu::run`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelStop {
    /// The guest executed `hlt`.
    Halted,
    /// The exit handler told the VMM to stop the vCPU.
    Stopped,
    /// An access was denied and an exception queued (see [`ModelVcpu::take_injected`]); the
    /// model does not deliver exceptions, so it returns instead.
    FaultInjected,
    /// An exit the handler did not take, or an instruction the model cannot run.
    Unhandled,
    /// `max_instructions` retired.
    Budget,
}

/// A software vCPU in 64-bit mode with paging off (GVA = GPA), executing the emulator's
/// instruction subset plus `hlt`.
pub struct ModelVcpu {
    id: u32,
    regs: Cell<Registers>,
    cpl: u8,
    single_step: Cell<bool>,
    injected: Cell<Option<(u8, Option<u32>)>>,
}

impl ModelVcpu {
    /// vCPU `id` at privilege level `cpl` with `regs`.
    pub fn new(id: u32, cpl: u8, regs: Registers) -> Self {
        Self {
            id,
            regs: Cell::new(regs),
            cpl,
            single_step: Cell::new(false),
            injected: Cell::new(None),
        }
    }

    /// The last exception queued with `inject_exception`, taken.
    pub fn take_injected(&self) -> Option<(u8, Option<u32>)> {
        self.injected.take()
    }

    /// Runs until `hlt`, a stop, or `max_instructions`. `installed` is what the backend lets
    /// this vCPU do (the model's "hardware"); every access it refuses becomes the exit KVM
    /// would produce, handed to `handler`.
    pub fn run<M: GuestMemory>(
        &self,
        memory: &M,
        handler: &dyn ExitHandler,
        installed: &dyn Fn(u32, u64) -> Permissions,
        max_instructions: usize,
    ) -> Result<ModelStop> {
        for _ in 0..max_instructions {
            let regs = self.regs.get();
            let mut bytes = [0u8; MAX_INSTRUCTION_LENGTH];
            memory
                .read_slice(&mut bytes, GuestAddress(regs.rip))
                .map_err(|e| Error::GuestMemory {
                    gpa: regs.rip,
                    reason: e.to_string(),
                })?;
            let instruction = Decoder::with_ip(64, &bytes, regs.rip, DecoderOptions::NONE).decode();
            let last = regs.rip.saturating_add(instruction.len().max(1) as u64 - 1);
            let fetchable =
                (gfn_of(regs.rip)..=gfn_of(last)).all(|g| installed(self.id, g).execute());
            if !fetchable {
                let exit = PermissionExit::InternalError { suberror: 1 };
                match handler.handle_exit(self, exit)? {
                    Decision::NotHandled => return Ok(ModelStop::Unhandled),
                    Decision::Denied { stop: true } => return Ok(ModelStop::Stopped),
                    Decision::Denied { stop: false } => return Ok(ModelStop::FaultInjected),
                    _ => continue,
                }
            }
            if instruction.mnemonic() == Mnemonic::Hlt {
                let mut r = regs;
                r.rip = instruction.next_ip();
                self.regs.set(r);
                return Ok(ModelStop::Halted);
            }
            let mut next = regs;
            let mut access = ModelDataAccess {
                vcpu: self,
                memory,
                handler,
                installed,
                stop: None,
            };
            match emulate::execute(&instruction, &mut next, &mut access) {
                Ok(()) => {
                    self.regs.set(next);
                    // A refused data access retires its instruction (read as all-ones, write
                    // dropped) before the stop, as a refused MMIO access does on KVM.
                    if let Some(stop) = access.stop {
                        return Ok(stop);
                    }
                }
                Err(_) if access.stop.is_some() => {
                    return Ok(access.stop.unwrap_or(ModelStop::Unhandled))
                }
                Err(Error::UnsupportedInstruction(_)) => return Ok(ModelStop::Unhandled),
                Err(e) => return Err(e),
            }
            if self.single_step.get() {
                match handler.handle_exit(self, PermissionExit::Debug)? {
                    Decision::NotHandled => return Ok(ModelStop::Unhandled),
                    Decision::Denied { stop: true } => return Ok(ModelStop::Stopped),
                    _ => {}
                }
            }
        }
        Ok(ModelStop::Budget)
    }
}

impl VcpuControl for ModelVcpu {
    fn id(&self) -> u32 {
        self.id
    }

    fn registers(&self) -> Result<Registers> {
        Ok(self.regs.get())
    }

    fn set_registers(&self, registers: &Registers) -> Result<()> {
        self.regs.set(*registers);
        Ok(())
    }

    fn mode(&self) -> Result<CpuMode> {
        Ok(CpuMode {
            cpl: self.cpl,
            bitness: 64,
            paging: false,
            long_mode_cr3: None,
        })
    }

    fn translate(&self, gva: u64) -> Result<Option<u64>> {
        Ok(Some(gva))
    }

    fn set_single_step(&self, enabled: bool) -> Result<()> {
        self.single_step.set(enabled);
        Ok(())
    }

    fn inject_exception(&self, vector: u8, error_code: Option<u32>) -> Result<()> {
        self.injected.set(Some((vector, error_code)));
        Ok(())
    }
}

/// Data accesses of the model vCPU: what the backend refuses becomes an MMIO exit, exactly
/// as KVM delivers it for an unbacked or read-only GPA.
struct ModelDataAccess<'a, M> {
    vcpu: &'a ModelVcpu,
    memory: &'a M,
    handler: &'a dyn ExitHandler,
    installed: &'a dyn Fn(u32, u64) -> Permissions,
    stop: Option<ModelStop>,
}

impl<M: GuestMemory> ModelDataAccess<'_, M> {
    fn allowed(&self, gpa: u64, len: usize, access: AccessKind) -> bool {
        let last = gpa.saturating_add(len.max(1) as u64 - 1);
        (gfn_of(gpa)..=gfn_of(last)).all(|g| (self.installed)(self.vcpu.id, g).allows(access))
    }

    fn exit(&mut self, exit: PermissionExit<'_>, gpa: u64) -> Result<()> {
        match self.handler.handle_exit(self.vcpu, exit)? {
            Decision::Emulated => Ok(()),
            Decision::Denied { stop } => {
                // The manager filled a refused read with all-ones; a refused write is dropped.
                self.stop = Some(if stop {
                    ModelStop::Stopped
                } else {
                    ModelStop::FaultInjected
                });
                Ok(())
            }
            decision => {
                self.stop = Some(ModelStop::Unhandled);
                Err(Error::GuestMemory {
                    gpa,
                    reason: format!("{decision:?}"),
                })
            }
        }
    }
}

impl<M: GuestMemory> DataAccess for ModelDataAccess<'_, M> {
    fn read(&mut self, gva: u64, buf: &mut [u8]) -> Result<()> {
        if self.allowed(gva, buf.len(), AccessKind::Read) {
            return self.memory.read_slice(buf, GuestAddress(gva)).map_err(|e| {
                Error::GuestMemory {
                    gpa: gva,
                    reason: e.to_string(),
                }
            });
        }
        self.exit(
            PermissionExit::MmioRead {
                gpa: gva,
                data: buf,
            },
            gva,
        )
    }

    fn write(&mut self, gva: u64, data: &[u8]) -> Result<()> {
        if self.allowed(gva, data.len(), AccessKind::Write) {
            return self
                .memory
                .write_slice(data, GuestAddress(gva))
                .map_err(|e| Error::GuestMemory {
                    gpa: gva,
                    reason: e.to_string(),
                });
        }
        self.exit(PermissionExit::MmioWrite { gpa: gva, data }, gva)
    }
}

/// Gfn range covered by `size` bytes of RAM at `gpa`.
pub fn ram_gfns(gpa: u64, size: u64) -> Range<u64> {
    gfn_of(gpa)..gfn_of(gpa + size + PAGE_SIZE - 1)
}
