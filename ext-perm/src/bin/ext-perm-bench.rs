//! `ext-perm-bench`: per-event costs of permission enforcement, measured in one run on this
//! host's `/dev/kvm` with a hand-built guest and the KVM memslot backend.
//!
//! The baseline is the plain port-I/O exit: the guest loops on `out`, and each sample is one
//! `KVM_RUN` round trip through the exit loop. Every event is measured as one host loop
//! iteration: set RIP, run the vCPU until the guest's final `out` (or the denial), handling
//! every exit in between through `ext-perm`. Programs are a single `out` plus one event, so
//! "event cost" = sample − sample of the lone `out` (the execute trap replaces the `out`, so
//! its cost is the sample minus the set-registers overhead). Medians of `--iterations`
//! samples; the 99th percentile is printed too, because memslot updates have a long tail.

// The hand-built guest of the KVM tests: a test fixture, compiled in rather than exported by
// the library. The benchmark uses only part of it.
#[allow(dead_code)]
#[path = "../../tests/common/guest.rs"]
mod guest;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use ext_perm::kvm::{run_vcpu, KvmMemslotBackend, KvmVcpu, VcpuStop};
use ext_perm::{
    Decision, ExitHandler, GrantPreference, ManagerConfig, PermissionExit, PermissionManager,
    Permissions, Registers, RunGate, VcpuControl, PAGE_SIZE,
};
use kvm_bindings::kvm_userspace_memory_region;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap};

use guest::{kvm_available, TestGuest, STACK_TOP};

const OUT_PAGE: u64 = 0x10000;
const OUT_LOOP: u64 = 0x10080;
const WRITE_PROGRAM: u64 = 0x10100;
const READ_PROGRAM: u64 = 0x10200;
const DATA_READ_ONLY: u64 = 0x20000;
const DATA_UNMAPPED: u64 = 0x21000;
const NX_PAGE: u64 = 0x22000;
const STRADDLE_A: u64 = 0x30000;
const STRADDLE_B: u64 = 0x31000;

type Manager = PermissionManager<KvmMemslotBackend, GuestMemoryMmap>;

struct Bench {
    guest: TestGuest,
    gate: Arc<RunGate>,
    iterations: usize,
}

impl Bench {
    fn manager(&self, grant: GrantPreference) -> Result<Manager, ext_perm::Error> {
        let backend = KvmMemslotBackend::new(self.guest.vm.clone(), self.guest.memory.clone(), 0)?;
        let config = ManagerConfig {
            grant,
            ..Default::default()
        };
        let m = PermissionManager::new(
            backend,
            self.guest.memory.clone(),
            self.gate.clone(),
            config,
        )?;
        let page = |gpa: u64| gpa / PAGE_SIZE..gpa / PAGE_SIZE + 1;
        m.set_permissions(0, page(DATA_READ_ONLY), Permissions::READ_EXECUTE)?;
        m.set_permissions(0, page(DATA_UNMAPPED), Permissions::READ_WRITE)?;
        m.set_permissions(0, page(NX_PAGE), Permissions::READ_WRITE)?;
        m.set_permissions(0, page(STRADDLE_B), Permissions::READ_WRITE)?;
        // vCPU 0 runs in view 1, where the read-only data page is writable: its writes are
        // write-protect faults that the manager completes (the loop can go on).
        m.create_view(1, Permissions::ALL)?;
        m.set_permissions(1, page(DATA_UNMAPPED), Permissions::READ_WRITE)?;
        m.set_permissions(1, page(NX_PAGE), Permissions::READ_WRITE)?;
        m.set_permissions(1, page(STRADDLE_B), Permissions::READ_WRITE)?;
        m.assign_vcpu(0, 1)?;
        Ok(m)
    }

    /// Median and 99th percentile microseconds of one exit of a guest that loops on `out`.
    fn measure_exit_loop(&mut self, manager: &Manager) -> Result<(f64, f64), String> {
        let fd = &mut self.guest.vcpus[0];
        let mut regs = Registers {
            rip: OUT_LOOP,
            rflags: 2,
            ..Default::default()
        };
        regs.gprs[4] = STACK_TOP;
        KvmVcpu::new(fd, 0)
            .set_registers(&regs)
            .map_err(|e| e.to_string())?;
        let mut samples = Vec::with_capacity(self.iterations);
        for i in 0..self.iterations + self.iterations / 10 {
            let start = Instant::now();
            let stop = run_vcpu(fd, 0, &self.gate, manager).map_err(|e| e.to_string())?;
            let elapsed = start.elapsed();
            if !matches!(stop, VcpuStop::PortOut { port: 0x80, .. }) {
                return Err(format!("out loop ended with {stop:?}"));
            }
            if i >= self.iterations / 10 {
                samples.push(elapsed.as_secs_f64() * 1e6);
            }
        }
        Ok(median_p99(samples))
    }

    /// Median and 99th percentile microseconds of running from `rip` until `expected`.
    fn measure(
        &mut self,
        manager: &Manager,
        rip: u64,
        rbx: u64,
        expected: &VcpuStop,
    ) -> Result<(f64, f64, f64), String> {
        let timed = Timed {
            inner: manager,
            nanos: AtomicU64::new(0),
        };
        let mut samples = Vec::with_capacity(self.iterations);
        let mut handler_samples = Vec::with_capacity(self.iterations);
        for i in 0..self.iterations + self.iterations / 10 {
            timed.nanos.store(0, Ordering::Relaxed);
            let fd = &mut self.guest.vcpus[0];
            let mut regs = Registers {
                rip,
                rflags: 2,
                ..Default::default()
            };
            regs.gprs[Registers::RBX] = rbx;
            regs.gprs[4] = STACK_TOP;
            let start = Instant::now();
            KvmVcpu::new(fd, 0)
                .set_registers(&regs)
                .map_err(|e| e.to_string())?;
            let stop = run_vcpu(fd, 0, &self.gate, &timed).map_err(|e| e.to_string())?;
            let elapsed = start.elapsed();
            if &stop != expected {
                return Err(format!(
                    "program at {rip:#x} ended with {stop:?}, expected {expected:?}"
                ));
            }
            // The first tenth warms up caches and shadow page tables.
            if i >= self.iterations / 10 {
                samples.push(elapsed.as_secs_f64() * 1e6);
                handler_samples.push(timed.nanos.load(Ordering::Relaxed) as f64 / 1e3);
            }
        }
        let (median, p99) = median_p99(samples);
        Ok((median, p99, median_p99(handler_samples).0))
    }
}

/// Adds up the time spent inside `ext-perm`'s exit handler, to split an event's cost
/// between KVM (exit, emulator, memslot ioctls inside the handler count as ours) and
/// the handler.
struct Timed<'a> {
    inner: &'a Manager,
    nanos: AtomicU64,
}

impl ExitHandler for Timed<'_> {
    fn handle_exit(
        &self,
        vcpu: &dyn VcpuControl,
        exit: PermissionExit<'_>,
    ) -> ext_perm::Result<Decision> {
        let start = Instant::now();
        let result = self.inner.handle_exit(vcpu, exit);
        self.nanos
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result
    }

    fn vcpu_stopped(&self, vcpu: &dyn VcpuControl) -> ext_perm::Result<()> {
        self.inner.vcpu_stopped(vcpu)
    }
}

/// Median microseconds of `f`, for the individual ioctls the handler makes.
fn time_ioctl(iterations: usize, mut f: impl FnMut() -> bool) -> Result<f64, String> {
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        if !f() {
            return Err("ioctl failed".to_string());
        }
        samples.push(start.elapsed().as_secs_f64() * 1e6);
    }
    Ok(median_p99(samples).0)
}

fn ioctl_costs(guest: &TestGuest, iterations: usize) -> Result<(), String> {
    let vcpu = KvmVcpu::new(&guest.vcpus[0], 0);
    let regs = time_ioctl(iterations, || vcpu.registers().is_ok())?;
    let sregs = time_ioctl(iterations, || vcpu.mode().is_ok())?;
    let translate = time_ioctl(iterations, || vcpu.translate(0x10000).is_ok())?;
    let debug = time_ioctl(iterations, || vcpu.set_single_step(false).is_ok())?;
    let (create, delete) = memslot_costs(guest, iterations)?;
    println!(
        "ioctls (median µs): KVM_GET_REGS {regs:.2}, KVM_GET_SREGS {sregs:.2}, \
         KVM_TRANSLATE {translate:.2}, KVM_SET_GUEST_DEBUG {debug:.2}, \
         memslot create {create:.2}, memslot delete {delete:.2}"
    );
    Ok(())
}

/// Median cost of creating and of deleting a one-page memslot at an unused GPA.
fn memslot_costs(guest: &TestGuest, iterations: usize) -> Result<(f64, f64), String> {
    let host = guest
        .memory
        .get_host_address(GuestAddress(0x3f000))
        .map_err(|e| e.to_string())? as u64;
    let slot = |memory_size: u64| kvm_userspace_memory_region {
        slot: 30_000,
        flags: 0,
        guest_phys_addr: 1 << 32,
        memory_size,
        userspace_addr: host,
    };
    let (mut create, mut delete) = (Vec::new(), Vec::new());
    for _ in 0..iterations {
        for (size, samples) in [(PAGE_SIZE, &mut create), (0, &mut delete)] {
            let start = Instant::now();
            // SAFETY: `host` is a page of guest memory, which `guest` keeps mapped for longer
            // than this slot exists (it is deleted in the same iteration); the slot sits at a
            // GPA no vCPU is running against.
            unsafe { guest.vm.set_user_memory_region(slot(size)) }.map_err(|e| e.to_string())?;
            samples.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    Ok((median_p99(create).0, median_p99(delete).0))
}

fn median_p99(mut samples: Vec<f64>) -> (f64, f64) {
    samples.sort_by(f64::total_cmp);
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

fn write_programs(guest: &TestGuest) -> Result<(), ext_perm::Error> {
    let out = [0xe6, 0x80]; // out 0x80, al
    guest.write(OUT_PAGE, &out)?;
    guest.write(OUT_LOOP, &[0xe6, 0x80, 0xeb, 0xfc])?; // out 0x80, al; jmp back to the out
    guest.write(WRITE_PROGRAM, &[0x48, 0x89, 0x03, 0xe6, 0x80])?; // mov [rbx], rax; out
    guest.write(READ_PROGRAM, &[0x48, 0x8b, 0x03, 0xe6, 0x80])?; // mov rax, [rbx]; out
    guest.write(NX_PAGE, &out)?;
    // A 5-byte `jmp rel32` starting 2 bytes before page B and jumping back to an `out` in
    // page A: the straddling instruction itself, then the baseline exit.
    let target = STRADDLE_A + 0x100;
    guest.write(target, &out)?;
    let next = STRADDLE_B + 3;
    let rel = (target as i64 - next as i64) as i32;
    let mut jmp = vec![0xe9];
    jmp.extend_from_slice(&rel.to_le_bytes());
    guest.write(STRADDLE_B - 2, &jmp)?;
    Ok(())
}

fn run() -> Result<(), String> {
    let iterations = std::env::args()
        .skip_while(|a| a != "--iterations")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000usize);
    if !kvm_available() {
        println!("SKIPPED: ext-perm-bench: /dev/kvm not available");
        return Ok(());
    }
    let guest = TestGuest::new(1).map_err(|e| e.to_string())?;
    write_programs(&guest).map_err(|e| e.to_string())?;
    let mut bench = Bench {
        guest,
        gate: Arc::new(RunGate::new(None)),
        iterations,
    };
    let out = VcpuStop::PortOut {
        port: 0x80,
        value: 0,
    };
    let single_step = bench
        .manager(GrantPreference::SingleStep)
        .map_err(|e| e.to_string())?;
    let caps = single_step.with_backend(|b| b.capabilities().clone());
    println!("capabilities: {}", serde_json_line(&caps));

    let (base, base_p99) = bench.measure_exit_loop(&single_step)?;
    let (lone_out, lone_out_p99, _) = bench.measure(&single_step, OUT_PAGE, 0, &out)?;
    let overhead = lone_out - base;
    let (write, write_p99, write_h) =
        bench.measure(&single_step, WRITE_PROGRAM, DATA_READ_ONLY, &out)?;
    let (read, read_p99, read_h) =
        bench.measure(&single_step, READ_PROGRAM, DATA_UNMAPPED, &out)?;
    let (trap, trap_p99, trap_h) = bench.measure(&single_step, NX_PAGE, 0, &VcpuStop::Denied)?;
    let ops_before = single_step.with_backend(|b| b.memslot_operations());
    let (step, step_p99, step_h) = bench.measure(&single_step, STRADDLE_B - 2, 0, &out)?;
    let ops = single_step.with_backend(|b| b.memslot_operations()) - ops_before;
    let stats = single_step.stats();
    drop(single_step);
    let emulation = bench
        .manager(GrantPreference::Emulation)
        .map_err(|e| e.to_string())?;
    let (emul, emul_p99, emul_h) = bench.measure(&emulation, STRADDLE_B - 2, 0, &out)?;
    let emul_stats = emulation.stats();
    ioctl_costs(&bench.guest, iterations)?;

    println!("{iterations} samples per row; µs; sample = median [p99] of one host iteration;");
    println!(
        "handler = median time inside ext-perm's handle_exit per sample (its ioctls included)"
    );
    println!(
        "{:<40} {:>8} {:>10} {:>8} {:>7} {:>8}",
        "event", "sample", "[p99]", "event", "ratio", "handler"
    );
    let rows = [
        ("plain port-I/O exit (baseline)", base, base_p99, base, 0.0),
        (
            "lone `out` after set-regs (reference)",
            lone_out,
            lone_out_p99,
            lone_out,
            0.0,
        ),
        (
            "write-protect fault, write emulated",
            write,
            write_p99,
            write - lone_out,
            write_h,
        ),
        (
            "emulated read (unbacked page)",
            read,
            read_p99,
            read - lone_out,
            read_h,
        ),
        (
            "execute trap (denied, vCPU stopped)",
            trap,
            trap_p99,
            trap - overhead,
            trap_h,
        ),
        (
            "straddle grant via single-step",
            step,
            step_p99,
            step - lone_out,
            step_h,
        ),
        (
            "straddle grant via emulation",
            emul,
            emul_p99,
            emul - lone_out,
            emul_h,
        ),
    ];
    for (name, median, p99, cost, handler) in rows {
        println!(
            "{name:<40} {median:>8.2} {:>10} {cost:>8.2} {:>6.2}x {handler:>8.2}",
            format!("[{p99:.1}]"),
            cost / base
        );
    }
    println!(
        "single-step grants: {} ({} memslot ioctls, {:.1} per grant); emulated grants: {}",
        stats.single_step_grants,
        ops,
        ops as f64 / stats.single_step_grants.max(1) as f64,
        emul_stats.emulated_grants
    );
    for (name, cost) in [
        ("single-step", step - lone_out),
        ("emulation", emul - lone_out),
    ] {
        let verdict = if cost <= 3.0 * base {
            "within"
        } else {
            "NOT within"
        };
        println!(
            "straddle grant via {name}: {cost:.2} µs = {:.2}x the baseline exit, {verdict} 3x",
            cost / base
        );
    }
    Ok(())
}

fn serde_json_line(caps: &ext_perm::kvm::CapabilityReport) -> String {
    format!(
        "flavour={} nr_memslots={} readonly_mem={} disable_quirks2={:#x} slot_zap_all_disabled={} \
         memory_attributes={:#x} guest_debug={} guest_debug_flags={:#x} single_step_user_mode={} \
         dirty_log_ring={} exit_on_emulation_failure={} sync_regs={:#x}",
        caps.flavour,
        caps.nr_memslots,
        caps.readonly_mem,
        caps.disable_quirks2,
        caps.slot_zap_all_disabled,
        caps.memory_attributes,
        caps.guest_debug,
        caps.guest_debug_flags,
        caps.single_step_user_mode,
        caps.dirty_log_ring,
        caps.exit_on_emulation_failure,
        caps.sync_regs
    )
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ext-perm-bench: {e}");
        std::process::exit(1);
    }
}
