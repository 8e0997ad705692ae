//! Harnesses that run the same guest code on the software model and on `/dev/kvm`, so one
//! behavioural suite checks both backends.

#![allow(dead_code)]

use std::sync::Arc;

pub mod guest;

use ext_perm::kvm::{run_vcpu, KvmMemslotBackend, VcpuStop};
use ext_perm::model::{ram_gfns, ModelStop, ModelVcpu, SoftwareModel};
use ext_perm::{
    EnforcementBackend, ExitHandler, ManagerConfig, PermissionControl, PermissionManager,
    Registers, RunGate,
};
use guest::{kvm_available, TestGuest, GUEST_RAM_SIZE, STACK_TOP};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// How a guest run ended, in terms both backends share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    Halted,
    Denied,
    Other(String),
}

/// A VM under test: one backend, its manager, vCPUs that run code from guest memory.
pub trait Harness {
    fn name(&self) -> &'static str;
    fn control(&self) -> &dyn PermissionControl;
    fn handler(&self) -> &dyn ExitHandler;
    fn write(&self, gpa: u64, bytes: &[u8]);
    fn read_u64(&self, gpa: u64) -> u64;
    /// Runs vCPU `vcpu` from `rip` with RAX/RBX/RCX set; returns the stop and the registers.
    fn run(&mut self, vcpu: u32, rip: u64, rax: u64, rbx: u64, rcx: u64) -> (Stop, Registers);
}

fn initial_registers(rip: u64, rax: u64, rbx: u64, rcx: u64) -> Registers {
    let mut regs = Registers {
        rip,
        rflags: 2,
        ..Default::default()
    };
    regs.gprs[0] = rax;
    regs.gprs[1] = rcx;
    regs.gprs[3] = rbx;
    regs.gprs[4] = STACK_TOP;
    regs
}

pub struct ModelHarness {
    memory: Arc<GuestMemoryMmap>,
    manager: PermissionManager<SoftwareModel, GuestMemoryMmap>,
    vcpus: Vec<ModelVcpu>,
}

impl ModelHarness {
    pub fn new(vcpus: u32, config: ManagerConfig) -> Self {
        let memory = Arc::new(
            GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_RAM_SIZE as usize)])
                .expect("anonymous guest memory"),
        );
        let backend = SoftwareModel::new(vec![ram_gfns(0, GUEST_RAM_SIZE)]);
        let manager = PermissionManager::new(
            backend,
            memory.clone(),
            Arc::new(RunGate::new(None)),
            config,
        )
        .expect("manager");
        let vcpus = (0..vcpus)
            .map(|id| ModelVcpu::new(id, 0, Registers::default()))
            .collect();
        Self {
            memory,
            manager,
            vcpus,
        }
    }
}

impl ModelHarness {
    /// The manager itself, for calls outside the REST surface.
    pub fn manager(&self) -> &PermissionManager<SoftwareModel, GuestMemoryMmap> {
        &self.manager
    }
}

impl Harness for ModelHarness {
    fn name(&self) -> &'static str {
        "software-model"
    }
    fn control(&self) -> &dyn PermissionControl {
        &self.manager
    }
    fn handler(&self) -> &dyn ExitHandler {
        &self.manager
    }
    fn write(&self, gpa: u64, bytes: &[u8]) {
        self.memory.write_slice(bytes, GuestAddress(gpa)).unwrap();
    }
    fn read_u64(&self, gpa: u64) -> u64 {
        self.memory.read_obj(GuestAddress(gpa)).unwrap()
    }
    fn run(&mut self, vcpu: u32, rip: u64, rax: u64, rbx: u64, rcx: u64) -> (Stop, Registers) {
        use ext_perm::VcpuControl;
        let cpu = &self.vcpus[vcpu as usize];
        cpu.set_registers(&initial_registers(rip, rax, rbx, rcx))
            .unwrap();
        let manager = &self.manager;
        let installed = |v: u32, g: u64| manager.with_backend(|b| b.installed(v, g));
        let stop = cpu
            .run(&*self.memory, manager, &installed, 100_000)
            .expect("model run");
        let stop = match stop {
            ModelStop::Halted => Stop::Halted,
            ModelStop::Stopped => Stop::Denied,
            other => Stop::Other(format!("{other:?}")),
        };
        (stop, cpu.registers().unwrap())
    }
}

pub struct KvmHarness {
    pub guest: TestGuest,
    pub manager: Arc<PermissionManager<KvmMemslotBackend, GuestMemoryMmap>>,
    pub gate: Arc<RunGate>,
}

impl KvmHarness {
    /// `None` (after printing the SKIPPED line) when `/dev/kvm` is missing.
    pub fn new(test: &str, vcpus: u32, config: ManagerConfig) -> Option<Self> {
        if !kvm_available() {
            // .ci/run sets EXT_REQUIRE_ALL=1: there a missing environment is a failure.
            assert!(
                std::env::var("EXT_REQUIRE_ALL").as_deref() != Ok("1"),
                "EXT_REQUIRE_ALL=1, but this test would be skipped: {}",
                format_args!("SKIPPED: {test}: /dev/kvm not available")
            );
            println!("SKIPPED: {test}: /dev/kvm not available");
            eprintln!("SKIPPED: {test}: /dev/kvm not available");
            return None;
        }
        let guest = TestGuest::new(vcpus).expect("test guest");
        let backend =
            KvmMemslotBackend::new(guest.vm.clone(), guest.memory.clone(), 0).expect("backend");
        let gate = Arc::new(RunGate::new(Some(kick_signal())));
        let manager = Arc::new(
            PermissionManager::new(backend, guest.memory.clone(), gate.clone(), config)
                .expect("manager"),
        );
        Some(Self {
            guest,
            manager,
            gate,
        })
    }
}

/// The signal the RunGate kicks vCPU threads with; its handler does nothing, so the only
/// effect is that KVM_RUN returns EINTR.
pub fn kick_signal() -> libc::c_int {
    use std::sync::Once;
    static INSTALL: Once = Once::new();
    let signal = vmm_sys_util::signal::SIGRTMIN() + 2;
    extern "C" fn nothing(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    INSTALL.call_once(|| {
        vmm_sys_util::signal::register_signal_handler(signal, nothing)
            .expect("install kick signal handler");
    });
    signal
}

impl Harness for KvmHarness {
    fn name(&self) -> &'static str {
        "kvm-memslot"
    }
    fn control(&self) -> &dyn PermissionControl {
        &*self.manager
    }
    fn handler(&self) -> &dyn ExitHandler {
        &*self.manager
    }
    fn write(&self, gpa: u64, bytes: &[u8]) {
        self.guest.write(gpa, bytes).unwrap();
    }
    fn read_u64(&self, gpa: u64) -> u64 {
        self.guest.read_u64(gpa).unwrap()
    }
    fn run(&mut self, vcpu: u32, rip: u64, rax: u64, rbx: u64, rcx: u64) -> (Stop, Registers) {
        use ext_perm::kvm::KvmVcpu;
        use ext_perm::VcpuControl;
        let fd = &mut self.guest.vcpus[vcpu as usize];
        KvmVcpu::new(fd, vcpu)
            .set_registers(&initial_registers(rip, rax, rbx, rcx))
            .unwrap();
        let stop = run_vcpu(fd, vcpu, &self.gate, &*self.manager).expect("KVM run");
        let stop = match stop {
            VcpuStop::Halted => Stop::Halted,
            VcpuStop::Denied => Stop::Denied,
            other => Stop::Other(format!("{other:?}")),
        };
        (stop, KvmVcpu::new(fd, vcpu).registers().unwrap())
    }
}
