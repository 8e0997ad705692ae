//! A minimal hand-built x86-64 guest: identity-mapped 4 KiB page tables, a flat GDT,
//! 64-bit code at CPL0, no firmware and no devices.
//!
//! Used by the KVM tests and `ext-perm-bench` (which compiles this file in with `#[path]`) so
//! that both exercise real KVM exits on real guest memory. A test fixture, not library API: it
//! uses only `ext_perm`'s public items. Layout (GPA): page tables from 0x1000, GDT at 0x800, stack top at
//! [`STACK_TOP`], IDT at 0x5000, free for code and data from [`FIRST_FREE_GPA`].

use std::sync::Arc;

use kvm_bindings::{kvm_segment, kvm_sregs};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use ext_perm::{Error, Result, PAGE_SIZE};

const GDT_GPA: u64 = 0x800;
const PML4_GPA: u64 = 0x1000;
/// One page of 256 long-mode interrupt gates, all not-present until
/// [`TestGuest::set_exception_handler`].
const IDT_GPA: u64 = 0x5000;
/// Top of the 8 KiB stack the vCPUs start with.
pub const STACK_TOP: u64 = 0x8000;
/// First GPA the fixture leaves to the test (code, data).
pub const FIRST_FREE_GPA: u64 = 0x10000;
/// Guest RAM size of the fixture (page tables cover all of it).
pub const GUEST_RAM_SIZE: u64 = 2 << 20;

/// Whether `/dev/kvm` can be opened here.
pub fn kvm_available() -> bool {
    Kvm::new().is_ok()
}

/// A VM with [`GUEST_RAM_SIZE`] of RAM at GPA 0 (not yet registered with KVM) and long-mode
/// vCPUs.
pub struct TestGuest {
    /// The VM (shared with the memslot backend).
    pub vm: Arc<VmFd>,
    /// Guest RAM.
    pub memory: Arc<GuestMemoryMmap>,
    /// vCPUs in index order.
    pub vcpus: Vec<VcpuFd>,
    _kvm: Kvm,
}

fn kvm_error(operation: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
    move |source| Error::Kvm { operation, source }
}

fn memory_error(gpa: u64) -> impl FnOnce(vm_memory::GuestMemoryError) -> Error {
    move |e| Error::GuestMemory {
        gpa,
        reason: e.to_string(),
    }
}

impl TestGuest {
    /// Creates the VM, its memory with page tables and GDT, and `vcpu_count` vCPUs in
    /// 64-bit mode at CPL0 with RIP at [`FIRST_FREE_GPA`].
    pub fn new(vcpu_count: u32) -> Result<Self> {
        let kvm = Kvm::new().map_err(kvm_error("open /dev/kvm"))?;
        let vm = Arc::new(kvm.create_vm().map_err(kvm_error("KVM_CREATE_VM"))?);
        let memory = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_RAM_SIZE as usize)])
                .map_err(|e| Error::GuestMemory {
                    gpa: 0,
                    reason: e.to_string(),
                })?,
        );
        write_page_tables(&memory)?;
        // Null, kernel code (0x08), kernel data (0x10), user code (0x1b), user data (0x23).
        let gdt: [u64; 5] = [
            0,
            0x00af_9b00_0000_ffff,
            0x00cf_9300_0000_ffff,
            0x00af_fb00_0000_ffff,
            0x00cf_f300_0000_ffff,
        ];
        for (i, entry) in gdt.iter().enumerate() {
            let gpa = GDT_GPA + 8 * i as u64;
            memory
                .write_obj(*entry, GuestAddress(gpa))
                .map_err(memory_error(gpa))?;
        }
        let mut vcpus = Vec::new();
        for id in 0..vcpu_count {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(kvm_error("KVM_CREATE_VCPU"))?;
            let mut sregs = vcpu.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?;
            long_mode_sregs(&mut sregs);
            vcpu.set_sregs(&sregs).map_err(kvm_error("KVM_SET_SREGS"))?;
            let regs = kvm_bindings::kvm_regs {
                rip: FIRST_FREE_GPA,
                rsp: STACK_TOP,
                rflags: 2,
                ..Default::default()
            };
            vcpu.set_regs(&regs).map_err(kvm_error("KVM_SET_REGS"))?;
            vcpus.push(vcpu);
        }
        Ok(Self {
            vm,
            memory,
            vcpus,
            _kvm: kvm,
        })
    }

    /// Copies `bytes` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, bytes: &[u8]) -> Result<()> {
        self.memory
            .write_slice(bytes, GuestAddress(gpa))
            .map_err(memory_error(gpa))
    }

    /// Puts vCPU `index` at CPL3 (user code and stack segments). Its RFLAGS should carry
    /// IOPL 3 if the code talks to the test with `out`.
    pub fn enter_user_mode(&self, index: usize) -> Result<()> {
        let vcpu = self
            .vcpus
            .get(index)
            .ok_or(Error::Untranslated(index as u64))?;
        let mut sregs = vcpu.get_sregs().map_err(kvm_error("KVM_GET_SREGS"))?;
        sregs.cs.selector = 0x1b;
        sregs.cs.dpl = 3;
        for segment in [
            &mut sregs.ss,
            &mut sregs.ds,
            &mut sregs.es,
            &mut sregs.fs,
            &mut sregs.gs,
        ] {
            segment.selector = 0x23;
            segment.dpl = 3;
        }
        vcpu.set_sregs(&sregs).map_err(kvm_error("KVM_SET_SREGS"))
    }

    /// Points exception `vector` at 64-bit code at `handler` (CPL0, no IST).
    pub fn set_exception_handler(&self, vector: u8, handler: u64) -> Result<()> {
        let low = (handler & 0xffff)
            | (0x8 << 16) // code selector
            | (0x8e << 40) // present, DPL0, 64-bit interrupt gate
            | (((handler >> 16) & 0xffff) << 48);
        let high = handler >> 32;
        let gpa = IDT_GPA + 16 * u64::from(vector);
        self.memory
            .write_obj(low, GuestAddress(gpa))
            .map_err(memory_error(gpa))?;
        self.memory
            .write_obj(high, GuestAddress(gpa + 8))
            .map_err(memory_error(gpa + 8))
    }

    /// Reads a little-endian u64 from guest memory at `gpa` (the host's view).
    pub fn read_u64(&self, gpa: u64) -> Result<u64> {
        self.memory
            .read_obj(GuestAddress(gpa))
            .map_err(memory_error(gpa))
    }
}

/// Identity map of all of guest RAM with 4 KiB pages (4 KiB so that permissions and guest
/// pages have the same granularity).
fn write_page_tables(memory: &GuestMemoryMmap) -> Result<()> {
    // Present, writable, user: the same tables serve CPL0 and CPL3 code (CR4 has no
    // SMEP/SMAP).
    let present_rw = 0x7u64;
    let pdpt = PML4_GPA + PAGE_SIZE;
    let pd = pdpt + PAGE_SIZE;
    let first_pt = pd + PAGE_SIZE;
    let tables = GUEST_RAM_SIZE.div_ceil(512 * PAGE_SIZE);
    let mut writes = vec![(PML4_GPA, pdpt | present_rw), (pdpt, pd | present_rw)];
    for t in 0..tables {
        let pt = first_pt + t * PAGE_SIZE;
        writes.push((pd + 8 * t, pt | present_rw));
        for i in 0..512 {
            let page = (t * 512 + i) * PAGE_SIZE;
            if page < GUEST_RAM_SIZE {
                writes.push((pt + 8 * i, page | present_rw));
            }
        }
    }
    for (gpa, value) in writes {
        memory
            .write_obj(value, GuestAddress(gpa))
            .map_err(memory_error(gpa))?;
    }
    Ok(())
}

fn long_mode_sregs(sregs: &mut kvm_sregs) {
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.gdt.base = GDT_GPA;
    sregs.gdt.limit = 39;
    sregs.idt.base = IDT_GPA;
    sregs.idt.limit = 16 * 256 - 1;
    sregs.cr3 = PML4_GPA;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 0x8000_0033; // PG | NE | ET | MP | PE
    sregs.efer = 0x500; // LME | LMA
}
