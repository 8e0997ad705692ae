//! What one guest exit and one pause/resume cost in `ext-vmm`, measured on the host's
//! `/dev/kvm` with tiny hand-built guests; used by the `ext-vmm-bench` command.
//!
//! Timings are never asserted anywhere (the lab is emulated and this host is PVM, shared by
//! other jobs): they are printed, and the smoke test only checks that every row is there.
//!
//! Exit costs: one VM with a no-op device on port 0x80, COM1 (the VMM's own 16550) and a
//! virtio-mmio transport (the VMM's own, wrapping a virtio-console) on its buses, and one vCPU
//! driven by the VMM's own exit loop ([`Vcpu::run`]). For each [`ExitKind`] the guest runs a
//! tight loop of that one exit and brackets every exit with `rdtsc`, storing the delta in its
//! RAM, so each exit yields one sample (median and p99 come from those) without any
//! instrumentation in the VMM. The host also times each whole loop, an independent check.
//!
//! Pause/resume: a whole [`Vmm`] booted from a synthetic PVH ELF whose code writes an unclaimed
//! port forever, paused and resumed through its lifecycle API as `vm.pause`/`vm.resume` do.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use ext_vmm::bus::{Bus, BusDevice};
use ext_vmm::config::{SerialOutput, VmConfig};
use ext_vmm::cpu;
use ext_vmm::devices::serial::SerialDevice;
use ext_vmm::devices::IrqTrigger;
use ext_vmm::exit::ExitEvent;
use ext_vmm::layout::{COM1_PORT, PVH_INFO_START, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use ext_vmm::memory::{create_guest_memory, register_memory, GuestRam};
use ext_vmm::vcpu::{Vcpu, VcpuControl, VcpuCounters, VcpuStop};
use ext_vmm::virtio::console::Console;
use ext_vmm::virtio::mmio::MmioTransport;
use ext_vmm::virtio::VirtioInterrupt;
use ext_vmm::Vmm;

/// Errors of the benchmarks.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Building or running the VM through ext-vmm's building blocks failed.
    #[error(transparent)]
    Vmm(#[from] ext_vmm::error::Error),
    /// A KVM ioctl the benchmark issues itself failed.
    #[error("KVM {0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// Guest memory could not be written or read.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The benchmark guest did not behave as its code says it must.
    #[error("benchmark guest: {0}")]
    Guest(String),
    /// A host file or thread operation failed.
    #[error("{0}: {1}")]
    Io(&'static str, #[source] std::io::Error),
    /// A parameter is out of range.
    #[error("invalid benchmark parameter: {0}")]
    Parameter(String),
}

/// Result alias of this module.
pub type Result<T> = std::result::Result<T, BenchError>;

/// True when this host has a KVM device node the benchmarks can use.
pub fn kvm_available() -> bool {
    std::path::Path::new("/dev/kvm").exists()
}

/// The no-op device's port: the PC's POST-code port, which real firmware writes as a delay.
pub const NOOP_PORT: u16 = 0x80;
/// An MMIO address in the 32-bit gap that no device claims (and no memslot backs).
pub const UNCLAIMED_MMIO: u64 = VIRTIO_MMIO_START + 0x10_0000;
const CODE_START: u64 = 0x1000;
/// The guest's per-exit samples (one `u32` TSC delta each) start at 1 MiB.
const SAMPLES_START: u64 = 0x10_0000;
/// Keeps the sample buffer well below the MMIO gap.
pub const MAX_ITERATIONS: u32 = 4_000_000;
const WARMUP_ITERATIONS: u32 = 1000;

/// One kind of guest exit measured in a tight loop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// `out` to a device on the port-I/O bus that does nothing: the baseline.
    PortIoNoop,
    /// `out` to COM1's transmit register: the 16550 emulation (output dropped).
    PortIoSerial,
    /// 32-bit read of the virtio-mmio transport's magic register.
    MmioVirtioMagic,
    /// 32-bit read of an address nothing claims (the bus lookup fails; the guest reads 0).
    MmioUnclaimed,
    /// No exit at all: what the `rdtsc` bracket itself costs, the floor of every other row.
    NoExit,
}

impl ExitKind {
    /// Every kind, baseline first.
    pub const ALL: [ExitKind; 5] = [
        ExitKind::PortIoNoop,
        ExitKind::PortIoSerial,
        ExitKind::MmioVirtioMagic,
        ExitKind::MmioUnclaimed,
        ExitKind::NoExit,
    ];

    /// Row name in the table.
    pub fn name(self) -> &'static str {
        match self {
            ExitKind::PortIoNoop => "pio-noop",
            ExitKind::PortIoSerial => "pio-serial",
            ExitKind::MmioVirtioMagic => "mmio-virtio-magic",
            ExitKind::MmioUnclaimed => "mmio-unclaimed",
            ExitKind::NoExit => "no-exit-floor",
        }
    }

    /// What the guest does, for the table's legend.
    pub fn description(self) -> &'static str {
        match self {
            ExitKind::PortIoNoop => "out 0x80 to a no-op device on the port bus (baseline)",
            ExitKind::PortIoSerial => "out 0x3f8: COM1 16550 transmit, output dropped",
            ExitKind::MmioVirtioMagic => "32-bit MMIO read of virtio-mmio MagicValue",
            ExitKind::MmioUnclaimed => "32-bit MMIO read of an unclaimed address",
            ExitKind::NoExit => "the same loop without the exit: cost of the rdtsc bracket",
        }
    }

    fn target(self) -> u32 {
        match self {
            ExitKind::PortIoNoop | ExitKind::NoExit => u32::from(NOOP_PORT),
            ExitKind::PortIoSerial => u32::from(COM1_PORT),
            ExitKind::MmioVirtioMagic => VIRTIO_MMIO_START as u32,
            ExitKind::MmioUnclaimed => UNCLAIMED_MMIO as u32,
        }
    }

    fn exit_instruction(self) -> &'static [u8] {
        match self {
            ExitKind::PortIoNoop | ExitKind::PortIoSerial => &[0xee], // out dx, al
            ExitKind::MmioVirtioMagic | ExitKind::MmioUnclaimed => &[0x8b, 0x02], // mov eax, [edx]
            ExitKind::NoExit => &[],
        }
    }
}

/// The guest loop for `kind` (32-bit protected mode, flat segments): `iterations` exits, each
/// bracketed by `rdtsc`, the TSC delta stored at [`SAMPLES_START`] onwards; then `hlt`.
///
/// Every kind has the same instructions between the two `rdtsc`s except the exit itself, so
/// the emulation cost of that scaffolding (PVM emulates CPL0 code) is the same in every row.
fn loop_code(kind: ExitKind, iterations: u32) -> Vec<u8> {
    let mut code = vec![0xbb]; // mov ebx, target
    code.extend_from_slice(&kind.target().to_le_bytes());
    code.push(0xbf); // mov edi, SAMPLES_START
    code.extend_from_slice(&(SAMPLES_START as u32).to_le_bytes());
    code.push(0xb9); // mov ecx, iterations
    code.extend_from_slice(&iterations.to_le_bytes());
    code.push(0xfc); // cld: stosd counts upwards
    let body_start = code.len();
    code.extend([0x0f, 0x31]); // rdtsc
    code.extend([0x89, 0xc6]); // mov esi, eax
    code.extend([0x89, 0xda]); // mov edx, ebx (rdtsc clobbered edx)
    code.extend_from_slice(kind.exit_instruction());
    code.extend([0x0f, 0x31]); // rdtsc
    code.extend([0x29, 0xf0]); // sub eax, esi
    code.push(0xab); // stosd
    code.push(0x49); // dec ecx
    let back = body_start as i64 - (code.len() as i64 + 2);
    code.extend([0x75, back as i8 as u8]); // jnz body
    code.push(0xf4); // hlt
    code
}

/// Median and p99 of a set of samples, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub samples: usize,
    /// 50th percentile (nearest rank).
    pub median_us: f64,
    /// 99th percentile (nearest rank).
    pub p99_us: f64,
}

impl Summary {
    /// Summarises `samples` (µs); `None` when there are none.
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = |p: f64| {
            let index = (p * sorted.len() as f64).ceil() as usize;
            sorted[index.clamp(1, sorted.len()) - 1]
        };
        Some(Summary {
            samples: sorted.len(),
            median_us: rank(0.50),
            p99_us: rank(0.99),
        })
    }
}

/// The measured cost of one exit kind.
#[derive(Clone, Debug)]
pub struct ExitCost {
    /// Which exit.
    pub kind: ExitKind,
    /// Per-exit samples of all repetitions (guest TSC between the two `rdtsc`s).
    pub per_exit: Summary,
    /// Host wall time of each whole loop divided by its iterations, median over repetitions
    /// (includes the loop's own instructions).
    pub host_per_iteration_us: f64,
}

/// How many exits and repetitions to measure.
#[derive(Clone, Copy, Debug)]
pub struct ExitBenchParams {
    /// Exits per repetition (guest loop iterations).
    pub iterations: u32,
    /// Repetitions per exit kind (a warm-up loop runs first and is discarded).
    pub repetitions: u32,
}

/// No-op port device: the cheapest thing the port bus can dispatch to.
struct NoopDevice;

impl BusDevice for NoopDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// One-vCPU VM with the measured devices; the vCPU is re-entered at the loop per run.
struct ExitBenchVm {
    // Field order: the vCPU goes before the VM and the memory it runs on.
    vcpu: Vcpu,
    _vm: kvm_ioctls::VmFd,
    memory: GuestRam,
    tsc_khz: u32,
}

impl ExitBenchVm {
    fn new(iterations: u32) -> Result<Self> {
        let kvm = Kvm::new().map_err(|e| BenchError::Kvm("open /dev/kvm", e))?;
        let vm = kvm
            .create_vm()
            .map_err(|e| BenchError::Kvm("KVM_CREATE_VM", e))?;
        let sample_bytes = u64::from(iterations.max(WARMUP_ITERATIONS)) * 4;
        let memory_size = (SAMPLES_START + sample_bytes).next_multiple_of(2 << 20);
        let memory = create_guest_memory(memory_size, false)?;
        register_memory(&vm, &memory)?;

        let mut pio = Bus::new();
        pio.insert(Arc::new(Mutex::new(NoopDevice)), u64::from(NOOP_PORT), 1)?;
        let irq = EventFd::new(0).map_err(|e| BenchError::Io("eventfd", e))?;
        let serial = SerialDevice::new(IrqTrigger(irq), Box::new(std::io::sink()))
            .map_err(|e| BenchError::Io("serial device", e))?;
        pio.insert(Arc::new(Mutex::new(serial)), u64::from(COM1_PORT), 8)?;
        let mut mmio = Bus::new();
        let irq = EventFd::new(0).map_err(|e| BenchError::Io("eventfd", e))?;
        let transport = MmioTransport::new(
            Box::new(Console::new(Box::new(std::io::sink()))),
            memory.clone(),
            Arc::new(VirtioInterrupt::new(irq)),
        );
        mmio.insert(
            Arc::new(Mutex::new(transport)),
            VIRTIO_MMIO_START,
            VIRTIO_MMIO_SIZE,
        )?;

        let fd = vm
            .create_vcpu(0)
            .map_err(|e| BenchError::Kvm("KVM_CREATE_VCPU", e))?;
        fd.set_cpuid2(&cpu::vcpu_cpuid(&kvm, 0, 1)?)
            .map_err(|e| BenchError::Kvm("KVM_SET_CPUID2", e))?;
        cpu::setup_msrs(&fd)?;
        cpu::setup_fpu(&fd)?;
        cpu::setup_pvh_registers(
            &fd,
            &memory,
            GuestAddress(CODE_START),
            GuestAddress(PVH_INFO_START),
        )?;
        let tsc_khz = fd
            .get_tsc_khz()
            .map_err(|e| BenchError::Kvm("KVM_GET_TSC_KHZ", e))?;
        if tsc_khz == 0 {
            return Err(BenchError::Guest("KVM reports a 0 kHz guest TSC".into()));
        }
        let vcpu = Vcpu {
            fd,
            id: 0,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            exit: Arc::new(ExitEvent::new()?),
            counters: Arc::new(VcpuCounters::default()),
            interceptor: None,
        };
        Ok(ExitBenchVm {
            vcpu,
            _vm: vm,
            memory,
            tsc_khz,
        })
    }

    /// Runs `iterations` exits of `kind`; returns the host wall time and the per-exit
    /// samples in µs.
    fn run_loop(&mut self, kind: ExitKind, iterations: u32) -> Result<(Duration, Vec<f64>)> {
        self.memory
            .write_slice(&loop_code(kind, iterations), GuestAddress(CODE_START))
            .map_err(|e| BenchError::Memory(e.to_string()))?;
        let fd = &self.vcpu.fd;
        let mut regs = fd
            .get_regs()
            .map_err(|e| BenchError::Kvm("KVM_GET_REGS", e))?;
        regs.rip = CODE_START;
        regs.rflags = 2;
        fd.set_regs(&regs)
            .map_err(|e| BenchError::Kvm("KVM_SET_REGS", e))?;

        let control = VcpuControl::default();
        let started = Instant::now();
        let stop = self.vcpu.run(&control)?;
        let elapsed = started.elapsed();
        if stop != VcpuStop::Halted {
            return Err(BenchError::Guest(format!(
                "{} loop ended with {stop:?} instead of hlt",
                kind.name()
            )));
        }
        let mut raw = vec![0u8; iterations as usize * 4];
        self.memory
            .read_slice(&mut raw, GuestAddress(SAMPLES_START))
            .map_err(|e| BenchError::Memory(e.to_string()))?;
        let us_per_tick = 1000.0 / f64::from(self.tsc_khz);
        let samples = raw
            .chunks_exact(4)
            .map(|b| f64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])) * us_per_tick)
            .collect();
        Ok((elapsed, samples))
    }
}

/// Measures every [`ExitKind`] on one VM; the guest TSC frequency (kHz) comes back too.
pub fn measure_exits(params: ExitBenchParams) -> Result<(Vec<ExitCost>, u32)> {
    if params.iterations == 0 || params.iterations > MAX_ITERATIONS || params.repetitions == 0 {
        return Err(BenchError::Parameter(format!(
            "iterations must be 1..={MAX_ITERATIONS} and repetitions at least 1 (got {} and {})",
            params.iterations, params.repetitions
        )));
    }
    let mut vm = ExitBenchVm::new(params.iterations)?;
    let mut costs = Vec::new();
    for kind in ExitKind::ALL {
        // Warm-up: faults in the sample pages and the device paths.
        vm.run_loop(kind, WARMUP_ITERATIONS.min(params.iterations))?;
        let mut samples = Vec::with_capacity((params.iterations * params.repetitions) as usize);
        let mut per_iteration = Vec::new();
        for _ in 0..params.repetitions {
            let (elapsed, run) = vm.run_loop(kind, params.iterations)?;
            per_iteration.push(elapsed.as_secs_f64() * 1e6 / f64::from(params.iterations));
            samples.extend(run);
        }
        let per_exit = Summary::of(&samples)
            .ok_or_else(|| BenchError::Guest(format!("{}: no samples", kind.name())))?;
        let host = Summary::of(&per_iteration)
            .ok_or_else(|| BenchError::Guest(format!("{}: no repetitions", kind.name())))?;
        costs.push(ExitCost {
            kind,
            per_exit,
            host_per_iteration_us: host.median_us,
        });
    }
    Ok((costs, vm.tsc_khz))
}

/// Pause and resume latencies of a running vCPU through [`Vmm::pause`] and [`Vmm::resume`].
#[derive(Clone, Debug)]
pub struct PauseResumeCost {
    /// `Vmm::pause` until it returns (every vCPU kicked out of KVM_RUN and parked).
    pub pause: Summary,
    /// `Vmm::resume` until the guest's next exit is counted (the vCPU runs again).
    pub resume_to_running: Summary,
    /// The sum of both per round: a running vCPU paused and running again.
    pub round_trip: Summary,
    /// Whether the vCPU thread and the measuring thread had a CPU each (otherwise the
    /// resume figure includes a poll interval of about 70 µs).
    pub separate_cpus: bool,
}

/// Poll interval of [`RunningVmm::wait_for_exit_after`] when it may not spin (the timer slack
/// adds about 50 µs).
const POLL_INTERVAL: Duration = Duration::from_micros(20);

/// Keeps the vCPU thread and the measuring thread on different CPUs, so the measuring thread
/// can spin on the exit counter without taking the vCPU's core. vCPU threads inherit the
/// affinity of the thread that boots the VM; the measuring thread moves to another CPU after.
struct CpuPlacement {
    original: libc::cpu_set_t,
    /// The measuring thread's CPU, when the host let us choose two.
    measuring_cpu: Option<usize>,
}

fn thread_affinity() -> Result<libc::cpu_set_t> {
    // SAFETY: `cpu_set_t` is a plain bit array; all zeroes is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the size is that of the set the kernel fills.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return Err(BenchError::Io(
            "sched_getaffinity",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(set)
}

fn set_thread_affinity(set: &libc::cpu_set_t) -> Result<()> {
    // SAFETY: pid 0 is the calling thread; `set` is a valid set of the size given.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(set), set) };
    if rc != 0 {
        return Err(BenchError::Io(
            "sched_setaffinity",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(())
}

fn only_cpu(cpu: usize) -> libc::cpu_set_t {
    // SAFETY: all zeroes is the empty set; CPU_ZERO/CPU_SET only write inside the set
    // (CPU_SET ignores numbers beyond its size).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        set
    }
}

impl CpuPlacement {
    /// Pins the calling thread to the first allowed CPU (for the vCPU thread to inherit);
    /// [`Self::measure_elsewhere`] then moves it to the second.
    fn pin_for_vcpu() -> Result<Self> {
        let original = thread_affinity()?;
        // SAFETY: CPU_ISSET only reads inside the set.
        let allowed: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &original) })
            .take(2)
            .collect();
        let mut placement = CpuPlacement {
            original,
            measuring_cpu: None,
        };
        if let [vcpu_cpu, measuring_cpu] = allowed[..] {
            set_thread_affinity(&only_cpu(vcpu_cpu))?;
            placement.measuring_cpu = Some(measuring_cpu);
        }
        Ok(placement)
    }

    /// Moves the calling thread off the vCPU's CPU; true when it now has one of its own.
    fn measure_elsewhere(&self) -> Result<bool> {
        match self.measuring_cpu {
            Some(cpu) => set_thread_affinity(&only_cpu(cpu)).map(|()| true),
            None => Ok(false),
        }
    }
}

impl Drop for CpuPlacement {
    fn drop(&mut self) {
        if let Err(e) = set_thread_affinity(&self.original) {
            tracing::warn!("cannot restore the CPU affinity: {e}");
        }
    }
}

/// A booted [`Vmm`] with its main loop on a thread; shut down and cleaned up on drop, so an
/// error halfway through a measurement leaves no vCPU thread or file behind.
struct RunningVmm {
    vmm: Arc<Vmm>,
    main_loop: Option<std::thread::JoinHandle<ext_vmm::error::Result<ext_vmm::exit::ExitReason>>>,
    dir: PathBuf,
}

impl RunningVmm {
    fn start() -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("ext-vmm-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| BenchError::Io("create temp dir", e))?;
        let vmm = match Self::config(&dir).and_then(|c| Ok(Vmm::new(c)?)) {
            Ok(vmm) => vmm,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // From here on, dropping `running` shuts the VM down and removes `dir`.
        let mut running = RunningVmm {
            vmm: Arc::new(vmm),
            main_loop: None,
            dir,
        };
        running.vmm.boot()?;
        let vmm = running.vmm.clone();
        running.main_loop = Some(
            std::thread::Builder::new()
                .name("bench-main-loop".into())
                .spawn(move || vmm.run_until_exit())
                .map_err(|e| BenchError::Io("spawn main loop", e))?,
        );
        Ok(running)
    }

    fn config(dir: &std::path::Path) -> Result<VmConfig> {
        // out 0x80, al; jmp back: an exit every loop, so the vCPU is busy and visible.
        let kernel = dir.join("vmlinux");
        std::fs::write(
            &kernel,
            ext_vmm_tests::test_kernel::pvh_elf(&[0xe6, NOOP_PORT as u8, 0xeb, 0xfc]),
        )
        .map_err(|e| BenchError::Io("write synthetic kernel", e))?;
        let mut config = VmConfig::new(kernel);
        config.memory_size = 64 << 20;
        config.serial = SerialOutput::Off;
        Ok(config)
    }

    /// Port writes of vCPU 0 so far.
    fn guest_exits(&self) -> u64 {
        self.vmm
            .counters()
            .get("vcpu0")
            .and_then(|c| c.get("io_out"))
            .copied()
            .unwrap_or(0)
    }

    /// Waits until vCPU 0 made an exit after `since`; fails after a generous bound so a broken
    /// VMM reports an error instead of hanging (no speed is judged).
    ///
    /// Spins only when this thread has a core of its own (see [`CpuPlacement`]): otherwise
    /// the spinner would hold the core the woken vCPU thread needs and measure itself.
    fn wait_for_exit_after(&self, since: u64, spin: bool) -> Result<()> {
        let started = Instant::now();
        while self.guest_exits() <= since {
            if started.elapsed() > Duration::from_secs(30) {
                return Err(BenchError::Guest("vCPU 0 made no exit in 30 s".into()));
            }
            if spin {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(POLL_INTERVAL);
            }
        }
        Ok(())
    }
}

impl Drop for RunningVmm {
    fn drop(&mut self) {
        if let Err(e) = self.vmm.shutdown_vm() {
            tracing::debug!("bench VM shutdown: {e}");
        }
        if let Some(main_loop) = self.main_loop.take() {
            let _ = main_loop.join();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Pauses and resumes a busy one-vCPU [`Vmm`] `rounds` times.
pub fn measure_pause_resume(rounds: u32) -> Result<PauseResumeCost> {
    if rounds == 0 {
        return Err(BenchError::Parameter(
            "pause rounds must be at least 1".into(),
        ));
    }
    let placement = CpuPlacement::pin_for_vcpu()?;
    let running = RunningVmm::start()?;
    let spin = placement.measure_elsewhere()?;
    running.wait_for_exit_after(0, spin)?;
    let (mut pause, mut resume, mut round_trip) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let started = Instant::now();
        running.vmm.pause()?;
        let paused = started.elapsed();
        let exits = running.guest_exits();
        let started = Instant::now();
        running.vmm.resume()?;
        running.wait_for_exit_after(exits, spin)?;
        let resumed = started.elapsed();
        pause.push(paused.as_secs_f64() * 1e6);
        resume.push(resumed.as_secs_f64() * 1e6);
        round_trip.push((paused + resumed).as_secs_f64() * 1e6);
    }
    let summary = |v: &[f64]| Summary::of(v).ok_or_else(|| BenchError::Guest("no rounds".into()));
    Ok(PauseResumeCost {
        pause: summary(&pause)?,
        resume_to_running: summary(&resume)?,
        round_trip: summary(&round_trip)?,
        separate_cpus: spin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let summary = Summary::of(&samples).unwrap();
        assert_eq!(summary.samples, 100);
        assert_eq!(summary.median_us, 50.0);
        assert_eq!(summary.p99_us, 99.0);
        assert_eq!(Summary::of(&[7.0]).unwrap().p99_us, 7.0);
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn loop_jumps_back_to_the_first_rdtsc() {
        for kind in ExitKind::ALL {
            let code = loop_code(kind, 5);
            let jnz = code.len() - 3;
            assert_eq!(code[jnz], 0x75);
            let target = (jnz as i64 + 2 + i64::from(code[jnz + 1] as i8)) as usize;
            assert_eq!(&code[target..target + 2], &[0x0f, 0x31], "{kind:?}");
            assert_eq!(&code[11..15], &5u32.to_le_bytes());
        }
    }
}
