//! The permission manager: the table, the backend, and the decision for every exit.
//!
//! The VMM's vCPU loop builds a [`PermissionExit`] from each `KVM_EXIT_MMIO`,
//! `KVM_EXIT_INTERNAL_ERROR` and `KVM_EXIT_DEBUG` and calls [`ExitHandler::handle_exit`]
//! with the vCPU; the returned [`Decision`] says whether to re-enter the vCPU, stop it, or
//! handle the exit as if `ext-perm` were not there.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::backend::EnforcementBackend;
use crate::decode::{fetch_instruction, translate, FetchedInstruction};
use crate::emulate::{self, DataAccess};
use crate::error::{Error, Result};
use crate::hold::RunGate;
use crate::hypervisor::{CpuMode, Registers, VcpuControl};
use crate::permissions::{gfn_of, AccessKind, Permissions, PAGE_SIZE};
use crate::report::{
    DenyOutcome, GrantMethod, GrantReport, PermissionEvent, PermissionStats, ViolationKind,
    ViolationReport,
};
use crate::table::{PermissionRun, PermissionTable, ViewId};

/// `KVM_INTERNAL_ERROR_EMULATION`: the suberror of a fetch from an unbacked GPA.
const INTERNAL_ERROR_EMULATION: u32 = 1;

/// The [`RunGate`] holder id of the control (API) thread; vCPU ids are below it.
pub const CONTROL_THREAD: u32 = u32::MAX;

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

/// What a denied access does to the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyAction {
    /// Queue an exception (for example #GP(0): vector 13, error code 0) and resume.
    ///
    /// On mainline KVM the data-access exits are delivered after KVM decoded the instruction;
    /// a refused write is dropped and a refused read returns all-ones, and the exception is
    /// delivered at the next instruction boundary, not as a restartable fault.
    InjectException {
        /// Exception vector.
        vector: u8,
        /// Error code pushed with it, if the vector has one.
        error_code: Option<u32>,
    },
    /// Tell the VMM to stop the vCPU (RIP stays at the fetch for execute violations).
    Stop,
}

/// Whether straddling instructions run under a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StraddlePolicy {
    /// Run them once under a temporary grant (the patent's behaviour).
    Grant,
    /// Refuse them as violations.
    Deny,
}

/// How a grant runs its one instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantPreference {
    /// Single-step where the backend supports it for the vCPU's CPL, else emulate.
    Auto,
    /// Always single-step (refuse when not supported).
    SingleStep,
    /// Emulate, falling back to single-step for instructions the emulator lacks.
    Emulation,
}

/// Manager policy.
#[derive(Clone, Copy, Debug)]
pub struct ManagerConfig {
    /// What a denied access does.
    pub deny_action: DenyAction,
    /// Whether straddles are granted.
    pub straddle: StraddlePolicy,
    /// How grants run.
    pub grant: GrantPreference,
    /// How many recent events [`PermissionManager::events_since`] keeps.
    pub event_capacity: usize,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            deny_action: DenyAction::Stop,
            straddle: StraddlePolicy::Grant,
            grant: GrantPreference::Auto,
            event_capacity: 4096,
        }
    }
}

/// The entry point of the VMM's vCPU exit loop.
pub trait ExitHandler: Send + Sync {
    /// Decides what happens with `exit` of `vcpu`. Called on the vCPU's thread, after
    /// `RunGate::leave` and before the next `RunGate::enter`.
    fn handle_exit(&self, vcpu: &dyn VcpuControl, exit: PermissionExit<'_>) -> Result<Decision>;
}

struct PendingGrant {
    rip: u64,
    view: ViewId,
    instruction: String,
    length: usize,
    gfns: Vec<u64>,
    straddle: bool,
}

struct Inner<B> {
    table: PermissionTable,
    backend: B,
    ram: Vec<Range<u64>>,
    pending: BTreeMap<u32, PendingGrant>,
    events: VecDeque<PermissionEvent>,
    subscribers: Vec<Sender<PermissionEvent>>,
    stats: PermissionStats,
    sequence: u64,
    event_capacity: usize,
}

impl<B> Inner<B> {
    fn in_ram(&self, gfn: u64) -> bool {
        self.ram.iter().any(|r| r.contains(&gfn))
    }

    fn publish(&mut self, make: impl FnOnce(u64) -> PermissionEvent) {
        let event = make(self.sequence);
        self.sequence += 1;
        if self.events.len() == self.event_capacity {
            self.events.pop_front();
        }
        self.events.push_back(event.clone());
        self.subscribers.retain(|s| s.send(event.clone()).is_ok());
    }
}

/// The authoritative permission table with its enforcement backend. Shared by all vCPU
/// threads and the API thread (`&self` everywhere).
pub struct PermissionManager<B, M> {
    inner: Mutex<Inner<B>>,
    memory: Arc<M>,
    gate: Arc<RunGate>,
    config: ManagerConfig,
}

/// A refused access being turned into a report.
struct Refusal {
    access: AccessKind,
    kind: ViolationKind,
    gpa: u64,
    rip: u64,
    instruction: Option<String>,
}

impl<B: EnforcementBackend, M: GuestMemory + Send + Sync> PermissionManager<B, M> {
    /// Takes over `backend` (installing the empty table: everything allowed), with guest
    /// `memory` for emulation and `gate` shared with the VMM's vCPU threads.
    pub fn new(
        mut backend: B,
        memory: Arc<M>,
        gate: Arc<RunGate>,
        config: ManagerConfig,
    ) -> Result<Self> {
        let table = PermissionTable::new();
        let ram = backend.guest_ram();
        for r in &ram {
            backend.sync(&table, r.clone())?;
        }
        Ok(Self {
            inner: Mutex::new(Inner {
                table,
                backend,
                ram,
                pending: BTreeMap::new(),
                events: VecDeque::new(),
                subscribers: Vec::new(),
                stats: PermissionStats::default(),
                sequence: 0,
                event_capacity: config.event_capacity.max(1),
            }),
            memory,
            gate,
            config,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner<B>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Creates view `id` whose unlisted gfns have `default`.
    pub fn create_view(&self, id: ViewId, default: Permissions) -> Result<()> {
        self.lock().table.create_view(id, default)
    }

    /// Sets `permissions` on `gfns` in `view` and re-installs the range.
    pub fn set_permissions(
        &self,
        view: ViewId,
        gfns: Range<u64>,
        permissions: Permissions,
    ) -> Result<()> {
        self.with_vcpus_held(|inner| {
            inner.table.set_range(view, gfns.clone(), permissions)?;
            let Inner { table, backend, .. } = inner;
            backend.sync(table, gfns)
        })
    }

    /// Runs `f` with every vCPU out of guest mode: reshaping memslots deletes a slot before
    /// re-creating its pieces, and a vCPU running in between would find its own code or page
    /// tables without a memslot (seen as a triple fault on PVM).
    fn with_vcpus_held<R>(&self, f: impl FnOnce(&mut Inner<B>) -> Result<R>) -> Result<R> {
        self.gate.hold_others(CONTROL_THREAD);
        let result = f(&mut self.lock());
        self.gate.release(CONTROL_THREAD);
        result
    }

    /// Puts `vcpu` in `view`; re-installs all of RAM, since the set of active views (whose
    /// intersection VM-wide backends install) may have changed.
    pub fn assign_vcpu(&self, vcpu: u32, view: ViewId) -> Result<()> {
        self.with_vcpus_held(|inner| {
            inner.table.assign_vcpu(vcpu, view)?;
            let Inner {
                table,
                backend,
                ram,
                ..
            } = inner;
            for r in ram.iter() {
                backend.sync(table, r.clone())?;
            }
            Ok(())
        })
    }

    /// The view of `vcpu`.
    pub fn view_of(&self, vcpu: u32) -> ViewId {
        self.lock().table.view_of(vcpu)
    }

    /// Permissions of `gfn` for `vcpu`.
    pub fn permissions(&self, vcpu: u32, gfn: u64) -> Permissions {
        self.lock().table.permissions_for(vcpu, gfn)
    }

    /// The runs of `view` over `gfns`.
    pub fn view_runs(&self, view: ViewId, gfns: Range<u64>) -> Result<Vec<PermissionRun>> {
        Ok(self.lock().table.view(view)?.runs(gfns))
    }

    /// Whether `vcpu`'s view allows `access` on every byte of `gpa..gpa+len`: device
    /// emulation that touches guest memory on a vCPU's behalf asks this first.
    pub fn check_access(&self, vcpu: u32, gpa: u64, len: u64, access: AccessKind) -> bool {
        let inner = self.lock();
        let last = gpa.saturating_add(len.max(1) - 1);
        (gfn_of(gpa)..=gfn_of(last)).all(|g| inner.table.permissions_for(vcpu, g).allows(access))
    }

    /// A channel that receives every later violation and grant.
    pub fn subscribe(&self) -> Receiver<PermissionEvent> {
        let (tx, rx) = channel();
        self.lock().subscribers.push(tx);
        rx
    }

    /// Retained events with `sequence >= since`, oldest first.
    pub fn events_since(&self, since: u64) -> Vec<PermissionEvent> {
        let inner = self.lock();
        inner
            .events
            .iter()
            .filter(|e| e.sequence() >= since)
            .cloned()
            .collect()
    }

    /// Counters.
    pub fn stats(&self) -> PermissionStats {
        self.lock().stats
    }

    /// Runs `f` on the backend (capability reports, memslot counters).
    pub fn with_backend<R>(&self, f: impl FnOnce(&B) -> R) -> R {
        f(&self.lock().backend)
    }

    /// Whether `vcpu` runs under a single-step grant right now.
    pub fn grant_pending(&self, vcpu: u32) -> bool {
        self.lock().pending.contains_key(&vcpu)
    }

    fn refuse(
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
        if !view_perms[0].execute() {
            let gpa = page_gpa(fetched.gfns[0]) + regs.rip % PAGE_SIZE;
            let (access, kind, rip) = (AccessKind::Execute, ViolationKind::Execute, regs.rip);
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
        let straddle = view_perms.iter().position(|p| !p.execute());
        if let Some(i) = straddle {
            if self.config.straddle == StraddlePolicy::Deny {
                let gpa = page_gpa(fetched.gfns[i]);
                let (access, kind, rip) = (AccessKind::Execute, ViolationKind::Straddle, regs.rip);
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

    /// Runs the instruction in the emulator with its data accesses checked against the
    /// vCPU's view. `Ok(Err(guard))` hands the lock back when the emulator lacks the
    /// instruction.
    #[allow(clippy::type_complexity)]
    fn emulate_granted<'g>(
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

    fn install_single_step(
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
            if let Err(e) = vcpu.set_single_step(true) {
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

    fn finish_single_step(&self, vcpu: &dyn VcpuControl) -> Result<Decision> {
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
fn granted_gfns<B: EnforcementBackend>(
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
            let at = gva + done as u64;
            let chunk = ((PAGE_SIZE - at % PAGE_SIZE) as usize).min(len - done);
            let gpa = translate(self.vcpu, self.mode, at)?;
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
