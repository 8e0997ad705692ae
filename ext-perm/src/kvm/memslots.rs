//! KVM memslot backend: permissions expressed with what mainline KVM has.
//!
//! Guest RAM is split into memslots at permission boundaries. Per run of gfns, the backend
//! installs the permissions every active view grants (memslots are VM-wide):
//!
//! | common permissions      | installed as          | hardware lets through |
//! |-------------------------|-----------------------|-----------------------|
//! | `rwx`                   | read-write memslot    | everything            |
//! | `r-x`                   | read-only memslot     | reads and fetches     |
//! | no `x`, or no `r`       | no memslot (unbacked) | nothing               |
//!
//! Writes to a read-only memslot exit as `KVM_EXIT_MMIO` (is_write); data accesses to an
//! unbacked gfn exit as `KVM_EXIT_MMIO`; fetches from one exit as `KVM_EXIT_INTERNAL_ERROR`
//! (emulation). Everything stopped that the faulting vCPU's view allows is completed by the
//! manager, so views such as `rw-` (readable and writable, not executable) and `--x`
//! (execute-only) keep their meaning at the price of exits.

use std::any::Any;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use super::caps::{probe_and_configure, CapabilityReport};
use crate::backend::EnforcementBackend;
use crate::error::{Error, Result};
use crate::permissions::{Permissions, PAGE_SHIFT, PAGE_SIZE};
use crate::table::{PermissionTable, View};

/// How a run of gfns is installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotKind {
    ReadWrite,
    ReadOnly,
    Unbacked,
}

impl SlotKind {
    fn for_permissions(p: Permissions) -> Self {
        if !(p.execute() && p.read()) {
            SlotKind::Unbacked
        } else if p.write() {
            SlotKind::ReadWrite
        } else {
            SlotKind::ReadOnly
        }
    }

    // The `View` of installed kinds stores each kind as the permissions it lets through.
    fn as_permissions(self) -> Permissions {
        match self {
            SlotKind::ReadWrite => Permissions::ALL,
            SlotKind::ReadOnly => Permissions::READ_EXECUTE,
            SlotKind::Unbacked => Permissions::NONE,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct RamRegion {
    start_gfn: u64,
    end_gfn: u64,
    host_addr: u64,
}

#[derive(Clone, Copy, Debug)]
struct Slot {
    id: u32,
    end_gfn: u64,
    kind: SlotKind,
}

struct ActiveGrant {
    vcpu: u32,
    saved: Vec<(Range<u64>, SlotKind)>,
}

/// Enforces permissions with KVM memslots (read-only and deleted slots).
///
/// The backend owns the memslots of guest RAM: the VMM must not register RAM memslots
/// itself, and must leave slot ids from `first_slot` upwards to this backend.
pub struct KvmMemslotBackend {
    vm: Arc<VmFd>,
    // Keeps the host mappings alive for as long as memslots point into them (any bitmap
    // type: the backend reads only region addresses and sizes).
    _memory: Arc<dyn Any + Send + Sync>,
    regions: Vec<RamRegion>,
    slots: BTreeMap<u64, Slot>,
    installed: View,
    free_ids: Vec<u32>,
    next_id: u32,
    capabilities: CapabilityReport,
    grant: Option<ActiveGrant>,
    memslot_operations: u64,
}

impl KvmMemslotBackend {
    /// Probes `vm`, disables the slot-zap-all quirk where possible, and maps all of `memory`
    /// read-write-execute (the state of a fresh permission table).
    pub fn new<B: Bitmap + Send + Sync + 'static>(
        vm: Arc<VmFd>,
        memory: Arc<GuestMemoryMmap<B>>,
        first_slot: u32,
    ) -> Result<Self> {
        let mut backend = Self::unregistered(vm, memory, first_slot)?;
        backend.sync(&PermissionTable::new(), 0..u64::MAX >> PAGE_SHIFT)?;
        Ok(backend)
    }

    /// Takes over RAM memslots the VMM registered itself: region `i` of `memory` (in
    /// address order) as slot `first_slot + i`, read-write, each covering its whole region.
    /// This is how a VMM that registers memory before `ext-perm` exists (ext-vmm's
    /// `register_memory`) hands RAM over; slot ids from `first_slot + regions` up become
    /// the backend's too.
    pub fn adopt<B: Bitmap + Send + Sync + 'static>(
        vm: Arc<VmFd>,
        memory: Arc<GuestMemoryMmap<B>>,
        first_slot: u32,
    ) -> Result<Self> {
        let mut backend = Self::unregistered(vm, memory, first_slot)?;
        let regions = backend.regions.clone();
        for (i, region) in regions.iter().enumerate() {
            backend.slots.insert(
                region.start_gfn,
                Slot {
                    id: first_slot + i as u32,
                    end_gfn: region.end_gfn,
                    kind: SlotKind::ReadWrite,
                },
            );
            backend
                .installed
                .set(region.start_gfn..region.end_gfn, Permissions::ALL)?;
        }
        backend.next_id = first_slot + regions.len() as u32;
        Ok(backend)
    }

    fn unregistered<B: Bitmap + Send + Sync + 'static>(
        vm: Arc<VmFd>,
        memory: Arc<GuestMemoryMmap<B>>,
        first_slot: u32,
    ) -> Result<Self> {
        let capabilities = probe_and_configure(&vm)?;
        if !capabilities.readonly_mem {
            return Err(Error::MissingCapability("KVM_CAP_READONLY_MEM"));
        }
        let mut regions = Vec::new();
        for region in memory.iter() {
            let gpa = region.start_addr().0;
            let size = region.len();
            let host_addr = region.as_ptr() as u64;
            if gpa % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 || host_addr % PAGE_SIZE != 0 {
                return Err(Error::BadRegion(gpa));
            }
            regions.push(RamRegion {
                start_gfn: gpa >> PAGE_SHIFT,
                end_gfn: (gpa + size) >> PAGE_SHIFT,
                host_addr,
            });
        }
        Ok(Self {
            vm,
            _memory: memory,
            regions,
            slots: BTreeMap::new(),
            installed: View::new(Permissions::NONE),
            free_ids: Vec::new(),
            next_id: first_slot,
            capabilities,
            grant: None,
            memslot_operations: 0,
        })
    }

    /// What the probe found on this host.
    pub fn capabilities(&self) -> &CapabilityReport {
        &self.capabilities
    }

    /// Memslots currently registered for guest RAM.
    pub fn memslot_count(&self) -> usize {
        self.slots.len()
    }

    /// KVM_SET_USER_MEMORY_REGION calls made so far.
    pub fn memslot_operations(&self) -> u64 {
        self.memslot_operations
    }

    fn set_region(&mut self, region: kvm_userspace_memory_region) -> Result<()> {
        self.memslot_operations += 1;
        // SAFETY: `userspace_addr` points into a region of `_memory`, which this backend keeps
        // alive (Arc) until it is dropped, and `memory_size` stays inside that region
        // (callers clip every slot to one `RamRegion`). Deleting (size 0) touches no memory.
        unsafe { self.vm.set_user_memory_region(region) }.map_err(|source| Error::Kvm {
            operation: "KVM_SET_USER_MEMORY_REGION",
            source,
        })
    }

    fn delete_slot(&mut self, start_gfn: u64) -> Result<()> {
        if let Some(slot) = self.slots.remove(&start_gfn) {
            self.set_region(kvm_userspace_memory_region {
                slot: slot.id,
                guest_phys_addr: start_gfn << PAGE_SHIFT,
                ..Default::default()
            })?;
            self.free_ids.push(slot.id);
        }
        Ok(())
    }

    /// Registers slots of `kind` for `gfns`, one per RAM region it touches.
    fn create_slots(&mut self, gfns: Range<u64>, kind: SlotKind) -> Result<()> {
        if kind == SlotKind::Unbacked {
            return Ok(());
        }
        let pieces: Vec<(u64, u64, u64)> = self
            .regions
            .iter()
            .filter_map(|r| {
                let start = gfns.start.max(r.start_gfn);
                let end = gfns.end.min(r.end_gfn);
                (start < end).then(|| {
                    let host = r.host_addr + ((start - r.start_gfn) << PAGE_SHIFT);
                    (start, end, host)
                })
            })
            .collect();
        for (start, end, host) in pieces {
            let id = match self.free_ids.pop() {
                Some(id) => id,
                None => {
                    if self.next_id >= self.capabilities.nr_memslots {
                        return Err(Error::OutOfMemslots(self.capabilities.nr_memslots));
                    }
                    self.next_id += 1;
                    self.next_id - 1
                }
            };
            self.set_region(kvm_userspace_memory_region {
                slot: id,
                flags: if kind == SlotKind::ReadOnly {
                    KVM_MEM_READONLY
                } else {
                    0
                },
                guest_phys_addr: start << PAGE_SHIFT,
                memory_size: (end - start) << PAGE_SHIFT,
                userspace_addr: host,
            })?;
            self.slots.insert(
                start,
                Slot {
                    id,
                    end_gfn: end,
                    kind,
                },
            );
        }
        Ok(())
    }

    /// Installs `kind` on `gfns`: deletes overlapping slots, re-creates their parts outside
    /// `gfns`, then creates the new slots.
    fn install(&mut self, gfns: Range<u64>, kind: SlotKind) -> Result<()> {
        let overlapping: Vec<(u64, Slot)> = self
            .slots
            .range(..gfns.end)
            .rev()
            .take_while(|(_, s)| s.end_gfn > gfns.start)
            .map(|(&start, &slot)| (start, slot))
            .collect();
        for (start, slot) in overlapping {
            self.delete_slot(start)?;
            if start < gfns.start {
                self.create_slots(start..gfns.start, slot.kind)?;
            }
            if slot.end_gfn > gfns.end {
                self.create_slots(gfns.end..slot.end_gfn, slot.kind)?;
            }
        }
        self.create_slots(gfns.clone(), kind)?;
        self.installed.set(gfns, kind.as_permissions())
    }

    /// Merges the slot ending at `gfn` with the one starting there when both have the same
    /// kind and lie in the same RAM region, so that protecting and unprotecting pages does
    /// not fragment RAM into ever more memslots. Only the control path calls it: grants and
    /// revokes stay at one ioctl each.
    fn coalesce_at(&mut self, gfn: u64) -> Result<()> {
        let Some(&right) = self.slots.get(&gfn) else {
            return Ok(());
        };
        let Some((&left_start, &left)) = self.slots.range(..gfn).next_back() else {
            return Ok(());
        };
        let same_region = self
            .regions
            .iter()
            .any(|r| r.start_gfn <= left_start && right.end_gfn <= r.end_gfn);
        if left.end_gfn != gfn || left.kind != right.kind || !same_region {
            return Ok(());
        }
        self.delete_slot(gfn)?;
        self.delete_slot(left_start)?;
        self.create_slots(left_start..right.end_gfn, left.kind)
    }

    fn kind_runs(&self, gfns: Range<u64>) -> Vec<(Range<u64>, SlotKind)> {
        self.installed
            .runs(gfns)
            .into_iter()
            .map(|r| {
                (
                    r.start_gfn..r.end_gfn,
                    SlotKind::for_permissions(r.permissions),
                )
            })
            .collect()
    }
}

impl EnforcementBackend for KvmMemslotBackend {
    fn name(&self) -> &'static str {
        "kvm-memslot"
    }

    fn per_vcpu_views(&self) -> bool {
        false
    }

    fn single_step_supported(&self, cpl: u8) -> bool {
        self.capabilities.guest_debug && (cpl == 0 || self.capabilities.single_step_user_mode)
    }

    fn guest_ram(&self) -> Vec<Range<u64>> {
        self.regions
            .iter()
            .map(|r| r.start_gfn..r.end_gfn)
            .collect()
    }

    fn sync(&mut self, table: &PermissionTable, gfns: Range<u64>) -> Result<()> {
        let ram: Vec<Range<u64>> = self.guest_ram();
        for region in ram {
            let start = gfns.start.max(region.start);
            let end = gfns.end.min(region.end);
            if start >= end {
                continue;
            }
            for run in table.common_runs(start..end) {
                let wanted = SlotKind::for_permissions(run.permissions);
                let current = self.kind_runs(run.start_gfn..run.end_gfn);
                if current.iter().any(|(_, kind)| *kind != wanted) {
                    self.install(run.start_gfn..run.end_gfn, wanted)?;
                    self.coalesce_at(run.start_gfn)?;
                    self.coalesce_at(run.end_gfn)?;
                }
            }
        }
        Ok(())
    }

    fn installed(&self, _vcpu: u32, gfn: u64) -> Permissions {
        self.installed.get(gfn)
    }

    fn grant(&mut self, vcpu: u32, gfns: &[u64], permissions: Permissions) -> Result<()> {
        self.revoke(vcpu)?;
        let mut saved = Vec::new();
        for &gfn in gfns {
            saved.extend(self.kind_runs(gfn..gfn + 1));
            self.install(gfn..gfn + 1, SlotKind::for_permissions(permissions))?;
        }
        self.grant = Some(ActiveGrant { vcpu, saved });
        Ok(())
    }

    fn revoke(&mut self, vcpu: u32) -> Result<()> {
        match self.grant.take() {
            Some(grant) if grant.vcpu == vcpu => {
                for (gfns, kind) in grant.saved {
                    self.install(gfns, kind)?;
                }
                Ok(())
            }
            other => {
                self.grant = other;
                Ok(())
            }
        }
    }
}

impl Drop for KvmMemslotBackend {
    /// The backend owns the RAM memslots: they go with it, so another backend (or the VMM)
    /// can take the VM's RAM over.
    fn drop(&mut self) {
        let starts: Vec<u64> = self.slots.keys().copied().collect();
        for start in starts {
            // Nothing to report to from a destructor; a failed delete leaves a stale slot
            // that the next registration of that range reports as EINVAL.
            let _ = self.delete_slot(start);
        }
    }
}
