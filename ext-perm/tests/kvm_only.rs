//! KVM-specific behaviour the software model has no counterpart for: the capability probe,
//! other vCPUs held out of guest mode during a single-step grant, and fault injection into
//! a real guest's IDT.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::{Arc, Mutex};

use common::guest::STACK_TOP;
use common::{Harness, KvmHarness, Stop};
use ext_perm::api::SetPermissionsRequest;
use ext_perm::kvm::{run_vcpu, VcpuStop};
use ext_perm::{
    Decision, DenyAction, ExitHandler, GrantMethod, GrantPreference, ManagerConfig,
    PermissionEvent, PermissionExit, RunGate, VcpuControl, PAGE_SIZE,
};

const CODE: u64 = 0x10000;
const SPIN: u64 = 0x11000;
const DATA: u64 = 0x20000;
const PAGE_B: u64 = 0x31000;

fn protect(h: &dyn Harness, gpa: u64, permissions: &str) {
    h.control()
        .set_permissions(&SetPermissionsRequest {
            view: 0,
            gpa,
            size: PAGE_SIZE,
            permissions: permissions.parse().unwrap(),
        })
        .unwrap();
}

#[test]
fn capability_probe_reports_this_host() {
    let Some(h) = KvmHarness::new("capability_probe_reports_this_host", 1, Default::default())
    else {
        return;
    };
    let caps = h.manager.with_backend(|b| b.capabilities().clone());
    println!("{}", serde_json::to_string(&caps).unwrap());
    assert!(caps.readonly_mem);
    assert!(caps.nr_memslots > 0);
    // Where the quirk can be disabled, the backend must have disabled it.
    assert_eq!(
        caps.slot_zap_all_disabled,
        caps.disable_quirks2 & ext_perm::kvm::KVM_X86_QUIRK_SLOT_ZAP_ALL != 0
    );
    // One memslot for the whole 2 MiB guest before any protection.
    assert_eq!(h.manager.with_backend(|b| b.memslot_count()), 1);
    protect(&h, DATA, "r-x");
    protect(&h, DATA + PAGE_SIZE, "rw-");
    // RAM below, the read-only page, (the unbacked page has no slot), RAM above.
    assert_eq!(h.manager.with_backend(|b| b.memslot_count()), 3);
    // Unprotecting merges the slots again instead of fragmenting RAM.
    protect(&h, DATA, "rwx");
    protect(&h, DATA + PAGE_SIZE, "rwx");
    assert_eq!(h.manager.with_backend(|b| b.memslot_count()), 1);
}

/// Records, each time a grant is installed, which vCPUs were in guest mode.
struct Recorder<H> {
    inner: Arc<H>,
    gate: Arc<RunGate>,
    at_grant: Mutex<Vec<(Option<u32>, Vec<u32>)>>,
}

impl<H: ExitHandler> ExitHandler for Recorder<H> {
    fn handle_exit(
        &self,
        vcpu: &dyn VcpuControl,
        exit: PermissionExit<'_>,
    ) -> ext_perm::Result<Decision> {
        let decision = self.inner.handle_exit(vcpu, exit)?;
        if decision == Decision::GrantInstalled {
            self.at_grant
                .lock()
                .unwrap()
                .push((self.gate.holder(), self.gate.vcpus_in_guest()));
        }
        Ok(decision)
    }

    fn vcpu_stopped(&self, vcpu: &dyn VcpuControl) -> ext_perm::Result<()> {
        self.inner.vcpu_stopped(vcpu)
    }
}

#[test]
fn other_vcpus_are_held_during_a_single_step_grant() {
    let config = ManagerConfig {
        grant: GrantPreference::SingleStep,
        ..Default::default()
    };
    let Some(mut h) = KvmHarness::new("other_vcpus_are_held_during_a_single_step_grant", 2, config)
    else {
        return;
    };
    // vCPU 1 spins in an executable page (`jmp $`) on its own thread.
    h.write(SPIN, &[0xeb, 0xfe]);
    let mut spinner = h.guest.vcpus.pop().expect("two vCPUs");
    {
        use ext_perm::kvm::KvmVcpu;
        let regs = ext_perm::Registers {
            rip: SPIN,
            rflags: 2,
            gprs: [
                0,
                0,
                0,
                0,
                STACK_TOP - 0x1000,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ],
        };
        KvmVcpu::new(&spinner, 1).set_registers(&regs).unwrap();
    }
    let recorder = Arc::new(Recorder {
        inner: h.manager.clone(),
        gate: h.gate.clone(),
        at_grant: Mutex::new(Vec::new()),
    });
    let (gate, handler) = (h.gate.clone(), recorder.clone());
    let thread = std::thread::spawn(move || run_vcpu(&mut spinner, 1, &gate, &*handler));
    while !h.gate.vcpus_in_guest().contains(&1) {
        std::thread::yield_now();
    }

    // vCPU 0 runs the straddling `mov rax, imm64` (3 bytes in A, 7 in non-executable B).
    let imm = 0x0102_0304_0506_0708u64;
    let mut code = vec![0x48, 0xb8];
    code.extend_from_slice(&imm.to_le_bytes());
    code.push(0xf4);
    h.write(PAGE_B - 3, &code);
    protect(&h, PAGE_B, "rw-");
    let fd = &mut h.guest.vcpus[0];
    {
        use ext_perm::kvm::KvmVcpu;
        let regs = ext_perm::Registers {
            rip: PAGE_B - 3,
            rflags: 2,
            gprs: [0, 0, 0, 0, STACK_TOP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        };
        KvmVcpu::new(fd, 0).set_registers(&regs).unwrap();
    }
    let stop = run_vcpu(fd, 0, &h.gate, &*recorder).unwrap();
    assert_eq!(stop, VcpuStop::Denied, "the hlt in page B must be refused");
    {
        use ext_perm::kvm::KvmVcpu;
        let regs = KvmVcpu::new(fd, 0).registers().unwrap();
        assert_eq!(regs.gprs[0], imm);
    }

    // Stop the spinner: turn `jmp $` into `hlt` with a single-byte (atomic) store, so it
    // never fetches half-old, half-new bytes.
    h.write(SPIN, &[0xf4]);
    let spinner_stop = thread.join().unwrap().unwrap();
    assert_eq!(spinner_stop, VcpuStop::Halted);

    let seen = recorder.at_grant.lock().unwrap().clone();
    assert_eq!(seen.len(), 1, "exactly one grant: {seen:?}");
    assert_eq!(seen[0].0, Some(0), "vCPU 0 holds the VM during its grant");
    assert!(
        !seen[0].1.contains(&1),
        "vCPU 1 was in guest mode while page B was mapped: {seen:?}"
    );
    assert_eq!(h.gate.holder(), None, "the hold ended with the grant");
    assert_eq!(h.manager.stats().single_step_grants, 1);
}

#[test]
fn denied_write_injects_gp_into_the_guest() {
    let config = ManagerConfig {
        deny_action: DenyAction::InjectException {
            vector: 13,
            error_code: Some(0),
        },
        ..Default::default()
    };
    let Some(mut h) = KvmHarness::new("denied_write_injects_gp_into_the_guest", 1, config) else {
        return;
    };
    let handler = CODE + 0x400;
    h.guest.set_exception_handler(13, handler).unwrap();
    h.write(handler, &[0x48, 0xc7, 0xc2, 0x6b, 0, 0, 0, 0xf4]); // mov rdx, 0x6b; hlt
    h.write(CODE, &[0x48, 0x89, 0x03, 0xf4]); // mov [rbx], rax; hlt
    h.write(DATA, &0x1111u64.to_le_bytes());
    protect(&h, DATA, "r-x");
    let (stop, regs) = h.run(0, CODE, 0x2222, DATA, 0);
    assert_eq!(stop, Stop::Halted);
    assert_eq!(regs.gprs[2], 0x6b, "the #GP handler did not run");
    assert_eq!(regs.rip, handler + 8);
    assert_eq!(h.read_u64(DATA), 0x1111, "the denied write was applied");
    // Interrupt frame: error code, RIP, CS, RFLAGS, RSP, SS.
    let rsp = regs.gprs[4];
    assert_eq!(rsp, STACK_TOP - 48);
    assert_eq!(h.read_u64(rsp), 0, "error code");
    let pushed_rip = h.read_u64(rsp + 8);
    // KVM completed the write instruction before the exit, so the fault arrives after it.
    assert_eq!(pushed_rip, CODE + 3);
    assert_eq!(h.read_u64(rsp + 16), 0x8, "CS");
}

#[test]
fn straddle_at_cpl3_runs_under_a_grant() {
    let Some(mut h) = KvmHarness::new("straddle_at_cpl3_runs_under_a_grant", 1, Default::default())
    else {
        return;
    };
    let caps = h.manager.with_backend(|b| b.capabilities().clone());
    h.guest.enter_user_mode(0).unwrap();
    // `mov rax, imm64` straddling into non-executable page B; the next instruction, in B,
    // must then be refused.
    let imm = 0x0a0b_0c0d_0e0f_1011u64;
    let mut code = vec![0x48, 0xb8];
    code.extend_from_slice(&imm.to_le_bytes());
    h.write(PAGE_B - 3, &code);
    protect(&h, PAGE_B, "rw-");
    let fd = &mut h.guest.vcpus[0];
    let vcpu = ext_perm::kvm::KvmVcpu::new(fd, 0);
    vcpu.set_registers(&ext_perm::Registers {
        rip: PAGE_B - 3,
        rflags: 2,
        gprs: [0, 0, 0, 0, STACK_TOP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    })
    .unwrap();
    assert_eq!(vcpu.mode().unwrap().cpl, 3);
    let stop = run_vcpu(fd, 0, &h.gate, &*h.manager).unwrap();
    let regs = ext_perm::kvm::KvmVcpu::new(fd, 0).registers().unwrap();
    assert_eq!(stop, VcpuStop::Denied);
    assert_eq!(regs.gprs[0], imm, "the straddling mov did not run");
    assert_eq!(regs.rip, PAGE_B + 7);
    let grants: Vec<_> = h
        .control()
        .events(0)
        .events
        .into_iter()
        .filter_map(|e| match e {
            PermissionEvent::Grant(g) => Some(g),
            _ => None,
        })
        .collect();
    assert_eq!(grants.len(), 1);
    // PVM runs CPL3 code natively and cannot single-step it: the grant is emulated there.
    let expected = if caps.single_step_user_mode {
        GrantMethod::SingleStep
    } else {
        GrantMethod::Emulation
    };
    assert_eq!(grants[0].method, expected);
    assert!(grants[0].straddle && grants[0].retired);
}

#[test]
fn software_page_walk_agrees_with_kvm_translate() {
    let Some(h) = KvmHarness::new(
        "software_page_walk_agrees_with_kvm_translate",
        1,
        Default::default(),
    ) else {
        return;
    };
    let vcpu = ext_perm::kvm::KvmVcpu::new(&h.guest.vcpus[0], 0);
    let mode = vcpu.mode().unwrap();
    let cr3 = mode
        .long_mode_cr3
        .expect("the fixture runs in 4-level long mode");
    for gva in [0, 0x10000, 0x31000 - 3, 0x1f_ffff, 0x20_0000, 1 << 39] {
        let by_kvm = vcpu.translate(gva).unwrap();
        let by_walk = ext_perm::decode::walk_long_mode(&*h.guest.memory, cr3, gva);
        assert_eq!(by_walk, by_kvm, "gva {gva:#x}");
    }
}

#[test]
fn concurrent_single_step_grants_on_two_vcpus() {
    const ROUNDS: usize = 200;
    let config = ManagerConfig {
        grant: GrantPreference::SingleStep,
        ..Default::default()
    };
    let Some(mut h) = KvmHarness::new("concurrent_single_step_grants_on_two_vcpus", 2, config)
    else {
        return;
    };
    // Each vCPU runs a 5-byte `jmp rel32` that starts 2 bytes before non-executable page B
    // (its own B) and jumps back to an `out` in executable code; `out` carries the vCPU id.
    let pages = [0x40000u64, 0x50000];
    for (id, &page_b) in pages.iter().enumerate() {
        let target = CODE + 0x100 * id as u64;
        h.write(target, &[0xb0, id as u8, 0xe6, 0x80]); // mov al, id; out 0x80, al
        let rel = (target as i64 - (page_b + 3) as i64) as i32;
        let mut jmp = vec![0xe9];
        jmp.extend_from_slice(&rel.to_le_bytes());
        h.write(page_b - 2, &jmp);
        protect(&h, page_b, "rw-");
    }
    let mut threads = Vec::new();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    for id in (0..2u32).rev() {
        let mut fd = h.guest.vcpus.pop().expect("two vCPUs");
        let (gate, manager, done) = (h.gate.clone(), h.manager.clone(), done_tx.clone());
        let start = pages[id as usize] - 2;
        threads.push(std::thread::spawn(move || {
            let mut outs = 0;
            for _ in 0..ROUNDS {
                let regs = ext_perm::Registers {
                    rip: start,
                    rflags: 2,
                    gprs: [
                        0,
                        0,
                        0,
                        0,
                        STACK_TOP - 0x800 * u64::from(id),
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                        0,
                    ],
                };
                ext_perm::kvm::KvmVcpu::new(&fd, id)
                    .set_registers(&regs)
                    .unwrap();
                let stop = run_vcpu(&mut fd, id, &gate, &*manager).unwrap();
                if stop
                    == (VcpuStop::PortOut {
                        port: 0x80,
                        value: u64::from(id),
                    })
                {
                    outs += 1;
                }
            }
            done.send(()).unwrap();
            outs
        }));
    }
    // A deadlock detector, not a speed assertion: 400 grants take well under a second here.
    for _ in 0..2 {
        done_rx
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("a vCPU thread is stuck: hold/grant deadlock");
    }
    let outs: Vec<usize> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(outs, vec![ROUNDS, ROUNDS]);
    let stats = h.manager.stats();
    assert_eq!(stats.single_step_grants, 2 * ROUNDS as u64);
    assert_eq!(stats.straddle_grants, 2 * ROUNDS as u64);
    assert_eq!(h.gate.holder(), None);
    // Both B pages are unbacked again: one RAM slot below, between and above them.
    assert_eq!(h.manager.with_backend(|b| b.memslot_count()), 3);
}

#[test]
fn adopted_vmm_memslots_are_enforced() {
    use crate::common::guest::{kvm_available, TestGuest, GUEST_RAM_SIZE};
    use ext_perm::kvm::KvmMemslotBackend;
    use ext_perm::PermissionManager;
    if !kvm_available() {
        // .ci/run sets EXT_REQUIRE_ALL=1: there a missing environment is a failure.
        assert!(
            std::env::var("EXT_REQUIRE_ALL").as_deref() != Ok("1"),
            "EXT_REQUIRE_ALL=1, but this test would be skipped: {}",
            format_args!("SKIPPED: adopted_vmm_memslots_are_enforced: /dev/kvm not available")
        );
        println!("SKIPPED: adopted_vmm_memslots_are_enforced: /dev/kvm not available");
        return;
    }
    let mut guest = TestGuest::new(1).unwrap();
    // The VMM registers RAM itself, as ext-vmm's `register_memory` does (slot 0).
    use vm_memory::{GuestAddress, GuestMemory};
    let host = guest.memory.get_host_address(GuestAddress(0)).unwrap() as u64;
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: GUEST_RAM_SIZE,
        userspace_addr: host,
    };
    // SAFETY: `host` is the guest memory mapping, which `guest` keeps alive longer than the VM.
    unsafe { guest.vm.set_user_memory_region(region) }.unwrap();
    let backend = KvmMemslotBackend::adopt(guest.vm.clone(), guest.memory.clone(), 0).unwrap();
    let gate = Arc::new(RunGate::new(None));
    let manager = PermissionManager::new(
        backend,
        guest.memory.clone(),
        gate.clone(),
        ManagerConfig::default(),
    )
    .unwrap();
    manager
        .set_permissions(
            0,
            DATA / PAGE_SIZE..DATA / PAGE_SIZE + 1,
            "r-x".parse().unwrap(),
        )
        .unwrap();
    guest.write(DATA, &0x1111u64.to_le_bytes()).unwrap();
    guest.write(CODE, &[0x48, 0x89, 0x03, 0xf4]).unwrap(); // mov [rbx], rax; hlt
    let fd = &mut guest.vcpus[0];
    let mut regs = ext_perm::kvm::KvmVcpu::new(fd, 0).registers().unwrap();
    regs.rip = CODE;
    regs.gprs[0] = 0x2222;
    regs.gprs[3] = DATA;
    ext_perm::kvm::KvmVcpu::new(fd, 0)
        .set_registers(&regs)
        .unwrap();
    assert_eq!(run_vcpu(fd, 0, &gate, &manager).unwrap(), VcpuStop::Denied);
    assert_eq!(guest.read_u64(DATA).unwrap(), 0x1111);
    assert_eq!(manager.with_backend(|b| b.memslot_count()), 3);
}
