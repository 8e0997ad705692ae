//! The permission manager: the authoritative table, the backend, subscribers, and the
//! control API. The exit path (what happens to each vCPU exit) is in `exits.rs` and
//! `grants.rs`; the policy knobs are in `policy.rs`.

use std::collections::{BTreeMap, VecDeque};
use std::ops::Range;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vm_memory::GuestMemory;

use crate::backend::EnforcementBackend;
use crate::error::Result;
use crate::hold::RunGate;
use crate::permissions::{gfn_of, AccessKind, Permissions};
use crate::report::{PermissionEvent, PermissionStats, ViolationKind};
use crate::table::{PermissionRun, PermissionTable, ViewId};

mod exits;
mod grants;
mod policy;

pub use exits::{Decision, ExitHandler, PermissionExit};
pub use policy::{DenyAction, GrantPreference, ManagerConfig, StraddlePolicy};

/// The [`RunGate`] holder id of the control (API) thread; vCPU ids are below it.
pub const CONTROL_THREAD: u32 = u32::MAX;

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
}
