//! `ext-perm-bench`: per-event costs of permission enforcement, measured in one run on this
//! host's `/dev/kvm` with a hand-built guest and the KVM memslot backend.
//!
//! Every sample is one host loop iteration: set RIP, run the vCPU until the guest's final
//! `out` (or the denial), handling every exit in between through `ext-perm`. The baseline
//! program is a single `out`; every other program is the baseline plus one event, so
//! "event cost" = sample − baseline (the execute trap replaces the `out` instead, so its
//! cost is the whole sample). Medians of `--iterations` samples; the 99th percentile is
//! printed too, because memslot updates have a long tail.

use std::sync::Arc;
use std::time::Instant;

use ext_perm::kvm::guest::{kvm_available, TestGuest, STACK_TOP};
use ext_perm::kvm::{run_vcpu, KvmMemslotBackend, KvmVcpu, VcpuStop};
use ext_perm::{
    GrantPreference, ManagerConfig, PermissionManager, Permissions, Registers, RunGate,
    VcpuControl, PAGE_SIZE,
};
use vm_memory::GuestMemoryMmap;

const OUT_PAGE: u64 = 0x10000;
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

    /// Median and 99th percentile microseconds of running from `rip` until `expected`.
    fn measure(
        &mut self,
        manager: &Manager,
        rip: u64,
        rbx: u64,
        expected: &VcpuStop,
    ) -> Result<(f64, f64), String> {
        let mut samples = Vec::with_capacity(self.iterations);
        for i in 0..self.iterations + self.iterations / 10 {
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
            let stop = run_vcpu(fd, 0, &self.gate, manager).map_err(|e| e.to_string())?;
            let elapsed = start.elapsed();
            if &stop != expected {
                return Err(format!(
                    "program at {rip:#x} ended with {stop:?}, expected {expected:?}"
                ));
            }
            // The first tenth warms up caches and shadow page tables.
            if i >= self.iterations / 10 {
                samples.push(elapsed.as_secs_f64() * 1e6);
            }
        }
        samples.sort_by(f64::total_cmp);
        let p99 = samples[samples.len() * 99 / 100];
        Ok((samples[samples.len() / 2], p99))
    }
}

fn write_programs(guest: &TestGuest) -> Result<(), ext_perm::Error> {
    let out = [0xe6, 0x80]; // out 0x80, al
    guest.write(OUT_PAGE, &out)?;
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

    let (base, base_mean) = bench.measure(&single_step, OUT_PAGE, 0, &out)?;
    let (write, write_mean) = bench.measure(&single_step, WRITE_PROGRAM, DATA_READ_ONLY, &out)?;
    let (read, read_mean) = bench.measure(&single_step, READ_PROGRAM, DATA_UNMAPPED, &out)?;
    let (trap, trap_mean) = bench.measure(&single_step, NX_PAGE, 0, &VcpuStop::Denied)?;
    let ops_before = single_step.with_backend(|b| b.memslot_operations());
    let (step, step_mean) = bench.measure(&single_step, STRADDLE_B - 2, 0, &out)?;
    let ops = single_step.with_backend(|b| b.memslot_operations()) - ops_before;
    let stats = single_step.stats();
    drop(single_step);
    let emulation = bench
        .manager(GrantPreference::Emulation)
        .map_err(|e| e.to_string())?;
    let (emul, emul_mean) = bench.measure(&emulation, STRADDLE_B - 2, 0, &out)?;
    let emul_stats = emulation.stats();

    println!(
        "iterations per event: {iterations} (median of samples; p99 of samples in brackets), µs"
    );
    println!(
        "{:<44} {:>9} {:>9} {:>8}",
        "event", "sample", "event", "ratio"
    );
    let row = |name: &str, median: f64, mean: f64, cost: f64| {
        println!(
            "{name:<44} {median:>9.2} {cost:>9.2} {:>7.2}x   [{mean:.2}]",
            cost / base
        );
    };
    row("plain port-I/O exit (baseline)", base, base_mean, base);
    row(
        "write-protect fault, write emulated",
        write,
        write_mean,
        write - base,
    );
    row(
        "emulated read (unbacked page)",
        read,
        read_mean,
        read - base,
    );
    row("execute trap (denied, vCPU stopped)", trap, trap_mean, trap);
    row(
        "straddle grant via single-step",
        step,
        step_mean,
        step - base,
    );
    row("straddle grant via emulation", emul, emul_mean, emul - base);
    println!(
        "single-step grants: {} ({} memslot ioctls, {:.1} per grant); emulated grants: {}",
        stats.single_step_grants,
        ops,
        ops as f64 / stats.single_step_grants.max(1) as f64,
        emul_stats.emulated_grants
    );
    for (name, cost) in [("single-step", step - base), ("emulation", emul - base)] {
        let verdict = if cost <= 3.0 * base {
            "within"
        } else {
            "NOT within"
        };
        println!(
            "straddle grant via {name}: {cost:.2} µs = {:.2}x baseline, {verdict} 3x",
            cost / base
        );
    }
    Ok(())
}

fn serde_json_line(caps: &ext_perm::kvm::CapabilityReport) -> String {
    format!(
        "flavour={} nr_memslots={} readonly_mem={} disable_quirks2={:#x} slot_zap_all_disabled={} \
         memory_attributes={:#x} guest_debug={} guest_debug_flags={:#x} single_step_user_mode={} \
         dirty_log_ring={}",
        caps.flavour,
        caps.nr_memslots,
        caps.readonly_mem,
        caps.disable_quirks2,
        caps.slot_zap_all_disabled,
        caps.memory_attributes,
        caps.guest_debug,
        caps.guest_debug_flags,
        caps.single_step_user_mode,
        caps.dirty_log_ring
    )
}

fn main() {
    if let Err(e) = run() {
        eprintln!("ext-perm-bench: {e}");
        std::process::exit(1);
    }
}
