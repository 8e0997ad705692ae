//! vCPU threads: the KVM_RUN exit loop that dispatches port I/O and MMIO to the buses, and
//! the pause/resume/stop machinery that kicks vCPUs out of KVM_RUN with a signal.
//!
//! A kick is race-free: the controller publishes its request before signalling, and the signal
//! handler sets `kvm_run.immediate_exit`, so a signal that lands just before KVM_RUN makes the
//! ioctl return `EINTR` at once instead of being lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use ext_perm::kvm::complete_mmio_read;
use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::bus::Bus;
use super::error::{Error, Result};
use super::exit::{ExitEvent, ExitReason};

/// An exit the loop copied out of `kvm_run` and offers to its [`ExitInterceptor`] before its
/// own dispatch (the copy lets the interceptor use the vCPU fd while it decides).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterceptedExit {
    /// `KVM_EXIT_MMIO` read of `len` bytes (at most 8).
    MmioRead {
        /// Guest-physical address.
        gpa: u64,
        /// Access size.
        len: usize,
    },
    /// `KVM_EXIT_MMIO` write.
    MmioWrite {
        /// Guest-physical address.
        gpa: u64,
        /// The bytes written (the first `len`).
        data: [u8; 8],
        /// Access size (at most 8).
        len: usize,
    },
    /// `KVM_EXIT_INTERNAL_ERROR` with its suberror.
    InternalError {
        /// `kvm_run.internal.suberror`.
        suberror: u32,
    },
    /// `KVM_EXIT_DEBUG`.
    Debug,
}

/// What an interceptor made of an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Interception {
    /// Not the interceptor's: the loop dispatches it as usual (buses, fatal errors).
    NotHandled,
    /// Handled; for an MMIO read the interceptor filled the data. The vCPU keeps running.
    Handled,
    /// Handled, and the vCPU must stop for this reason.
    Stop(VcpuStop),
}

/// A component that sees vCPU exits before the loop dispatches them: ext-perm's wiring
/// (`perm.rs`) implements it to enforce page permissions. The loop itself knows nothing of
/// what an interceptor does.
pub trait ExitInterceptor: Send + Sync {
    /// Right before `KVM_RUN` on vCPU `vcpu`.
    fn before_run(&self, vcpu: u8);
    /// Right after `KVM_RUN` returns.
    fn after_run(&self, vcpu: u8);
    /// Offers one exit; `data` is the MMIO read buffer to fill (empty for other exits).
    fn intercept(
        &self,
        fd: &VcpuFd,
        vcpu: u8,
        exit: InterceptedExit,
        data: &mut [u8],
    ) -> Result<Interception>;
    /// The vCPU is about to park or stop: release whatever it holds (e.g. a grant that
    /// keeps the other vCPUs waiting).
    fn vcpu_leaving(&self, fd: &VcpuFd, vcpu: u8);
}

/// Per-vCPU exit counters, exported through `vm.counters`.
#[derive(Default)]
pub struct VcpuCounters {
    /// Port-I/O reads.
    pub io_in: AtomicU64,
    /// Port-I/O writes.
    pub io_out: AtomicU64,
    /// MMIO reads.
    pub mmio_read: AtomicU64,
    /// MMIO writes.
    pub mmio_write: AtomicU64,
    /// KVM_RUN returns interrupted by a kick.
    pub interrupted: AtomicU64,
    /// Every other exit.
    pub other: AtomicU64,
}

impl VcpuCounters {
    /// Name/value pairs for `vm.counters`.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("io_in", self.io_in.load(Ordering::Relaxed)),
            ("io_out", self.io_out.load(Ordering::Relaxed)),
            ("mmio_read", self.mmio_read.load(Ordering::Relaxed)),
            ("mmio_write", self.mmio_write.load(Ordering::Relaxed)),
            ("interrupted", self.interrupted.load(Ordering::Relaxed)),
            ("other_exits", self.other.load(Ordering::Relaxed)),
        ]
    }
}

/// What the controller wants the vCPUs to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Request {
    Run,
    Pause,
    Stop,
}

/// Work the controller asks every parked vCPU thread to do on its own vCPU (KVM wants vCPU
/// state read and written by the thread that runs it, and `VcpuFd` lives on that thread).
pub type ParkedWork = Arc<dyn Fn(&Vcpu) + Send + Sync>;

struct ControlState {
    request: Request,
    /// The latest work for parked threads, and its generation number.
    work: Option<ParkedWork>,
    work_generation: u64,
    /// Parked threads that finished the current work.
    work_done: usize,
    /// vCPU threads currently inside their loop (not yet finished).
    alive: usize,
    /// vCPU threads parked on the condition variable.
    parked: usize,
}

/// Shared between the controller (API/main thread) and every vCPU thread.
pub struct VcpuControl {
    /// Fast path for vCPU threads: true whenever `request != Run`.
    pending: AtomicBool,
    state: Mutex<ControlState>,
    changed: Condvar,
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            pending: AtomicBool::new(false),
            state: Mutex::new(ControlState {
                request: Request::Run,
                work: None,
                work_generation: 0,
                work_done: 0,
                alive: 0,
                parked: 0,
            }),
            changed: Condvar::new(),
        }
    }
}

impl VcpuControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_request(&self, request: Request) {
        let mut state = self.lock();
        state.request = request;
        self.pending
            .store(request != Request::Run, Ordering::SeqCst);
        self.changed.notify_all();
    }

    /// Called by a vCPU thread that saw `pending`: parks while paused, doing the controller's
    /// [`ParkedWork`] on `vcpu` meanwhile. Returns false on stop.
    fn park(&self, vcpu: &Vcpu) -> bool {
        let mut state = self.lock();
        if state.request == Request::Pause {
            state.parked += 1;
            // Work published before this thread parked is not for it.
            let mut seen = state.work_generation;
            self.changed.notify_all();
            while state.request == Request::Pause {
                if state.work_generation != seen {
                    seen = state.work_generation;
                    if let Some(work) = state.work.clone() {
                        drop(state);
                        work(vcpu);
                        state = self.lock();
                        state.work_done += 1;
                        self.changed.notify_all();
                        continue;
                    }
                }
                state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
            }
            state.parked -= 1;
            self.changed.notify_all();
        }
        state.request != Request::Stop
    }

    fn thread_started(&self) {
        self.lock().alive += 1;
    }

    fn thread_finished(&self) {
        let mut state = self.lock();
        state.alive -= 1;
        self.changed.notify_all();
    }
}

thread_local! {
    /// `kvm_run.immediate_exit` of the vCPU owned by this thread, for the kick handler.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let flag = IMMEDIATE_EXIT.with(|cell| cell.get());
    if !flag.is_null() {
        // SAFETY: the pointer was set by this thread to its vCPU's kvm_run mapping, which
        // outlives the registration (it is cleared before the VcpuFd drops); a volatile byte
        // store is async-signal-safe.
        unsafe { std::ptr::write_volatile(flag, 1) };
    }
}

/// Installs the kick handler (idempotent; call before starting vCPU threads).
pub fn register_kick_handler() -> Result<()> {
    register_signal_handler(kick_signal(), handle_kick)
        .map_err(|e| Error::Sys("sigaction(vCPU kick)", e.into()))
}

/// One vCPU and what its exits are dispatched to.
pub struct Vcpu {
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Index (also APIC ID).
    pub id: u8,
    /// Port-I/O bus.
    pub pio: Arc<Bus>,
    /// MMIO bus.
    pub mmio: Arc<Bus>,
    /// Where fatal exits are reported.
    pub exit: Arc<ExitEvent>,
    /// Exit counters.
    pub counters: Arc<VcpuCounters>,
    /// Sees MMIO, internal-error and debug exits first (`None`: the loop dispatches them).
    pub interceptor: Option<Arc<dyn ExitInterceptor>>,
}

/// Why a vCPU loop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuStop {
    /// The controller asked for it.
    Stopped,
    /// The guest halted with no in-kernel irqchip to wake it (hand-built test guests).
    Halted,
    /// The guest reset or powered off.
    GuestExit(ExitReason),
}

impl Vcpu {
    /// Handles one exit; `Ok(None)` means keep running.
    fn handle_exit(&mut self) -> Result<Option<VcpuStop>> {
        let id = self.id;
        let interceptor = self.interceptor.clone();
        if let Some(interceptor) = &interceptor {
            interceptor.before_run(id);
        }
        let result = self.fd.run();
        if let Some(interceptor) = &interceptor {
            interceptor.after_run(id);
        }
        // Exits an interceptor may claim are copied out of `kvm_run` and dispatched below,
        // once the fd is no longer borrowed by the exit.
        let copied = match result {
            Ok(VcpuExit::IoOut(port, data)) => {
                self.counters.io_out.fetch_add(1, Ordering::Relaxed);
                if !self.pio.write(u64::from(port), data) {
                    tracing::trace!("vCPU {id}: unclaimed out {port:#x} <- {data:x?}");
                }
                return Ok(None);
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                self.counters.io_in.fetch_add(1, Ordering::Relaxed);
                if !self.pio.read(u64::from(port), data) {
                    // An absent ISA port floats high.
                    data.fill(0xff);
                    tracing::trace!("vCPU {id}: unclaimed in {port:#x}");
                }
                return Ok(None);
            }
            Ok(VcpuExit::MmioRead(gpa, data)) => {
                self.counters.mmio_read.fetch_add(1, Ordering::Relaxed);
                InterceptedExit::MmioRead {
                    gpa,
                    len: data.len().min(8),
                }
            }
            Ok(VcpuExit::MmioWrite(gpa, data)) => {
                self.counters.mmio_write.fetch_add(1, Ordering::Relaxed);
                let len = data.len().min(8);
                let mut copy = [0u8; 8];
                copy[..len].copy_from_slice(&data[..len]);
                InterceptedExit::MmioWrite {
                    gpa,
                    data: copy,
                    len,
                }
            }
            Ok(VcpuExit::InternalError) => InterceptedExit::InternalError { suberror: 0 },
            Ok(VcpuExit::Debug(_)) => InterceptedExit::Debug,
            Ok(VcpuExit::Hlt) => return Ok(Some(VcpuStop::Halted)),
            Ok(VcpuExit::Shutdown) => {
                // A triple fault: the guest is gone, as on a PC that resets.
                return Ok(Some(VcpuStop::GuestExit(ExitReason::Reset)));
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                self.counters.other.fetch_add(1, Ordering::Relaxed);
                let reason = match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                    other => ExitReason::Error(format!("system event {other}")),
                };
                return Ok(Some(VcpuStop::GuestExit(reason)));
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                return Err(Error::VcpuExit(
                    id,
                    format!(
                        "KVM entry failed: reason {reason:#x} on host CPU {cpu}, {}",
                        guest_position(&self.fd)
                    ),
                ));
            }
            Ok(other) => {
                self.counters.other.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("vCPU {id}: ignored exit {other:?}");
                return Ok(None);
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                self.counters.interrupted.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => return Err(Error::Kvm("KVM_RUN", e)),
        };
        let exit = match copied {
            InterceptedExit::InternalError { .. } => InterceptedExit::InternalError {
                suberror: internal_error_suberror(&mut self.fd),
            },
            other => other,
        };
        self.dispatch_copied(exit, interceptor.as_deref())
    }

    /// Offers a copied exit to the interceptor, then does the usual thing with it.
    fn dispatch_copied(
        &mut self,
        exit: InterceptedExit,
        interceptor: Option<&dyn ExitInterceptor>,
    ) -> Result<Option<VcpuStop>> {
        let id = self.id;
        let mut buffer = [0u8; 8];
        let data: &mut [u8] = match exit {
            InterceptedExit::MmioRead { len, .. } => &mut buffer[..len],
            _ => &mut [],
        };
        let interception = match interceptor {
            Some(interceptor) => interceptor.intercept(&self.fd, id, exit, data)?,
            None => Interception::NotHandled,
        };
        if interception == Interception::NotHandled {
            match exit {
                InterceptedExit::MmioRead { gpa, .. } => {
                    if !self.mmio.read(gpa, data) {
                        data.fill(0);
                        tracing::debug!("vCPU {id}: unclaimed MMIO read {gpa:#x}");
                    }
                }
                InterceptedExit::MmioWrite { gpa, data, len } => {
                    let data = &data[..len];
                    if !self.mmio.write(gpa, data) {
                        tracing::debug!("vCPU {id}: unclaimed MMIO write {gpa:#x} <- {data:x?}");
                    }
                }
                InterceptedExit::InternalError { suberror } => {
                    return Err(Error::VcpuExit(
                        id,
                        format!(
                            "KVM internal error, suberror {suberror}, {}",
                            guest_position(&self.fd)
                        ),
                    ));
                }
                InterceptedExit::Debug => {
                    tracing::debug!("vCPU {id}: debug exit nobody asked for");
                }
            }
        }
        if let InterceptedExit::MmioRead { .. } = exit {
            complete_mmio_read(&mut self.fd, data);
        }
        match interception {
            Interception::Stop(stop) => Ok(Some(stop)),
            Interception::NotHandled | Interception::Handled => Ok(None),
        }
    }

    /// Tells the interceptor the vCPU parks or stops.
    fn leaving(&self) {
        if let Some(interceptor) = &self.interceptor {
            interceptor.vcpu_leaving(&self.fd, self.id);
        }
    }

    /// Runs until the guest halts/exits, an error occurs, or `control` asks to stop.
    pub fn run(&mut self, control: &VcpuControl) -> Result<VcpuStop> {
        let stop = self.run_until_stop(control);
        self.leaving();
        stop
    }

    fn run_until_stop(&mut self, control: &VcpuControl) -> Result<VcpuStop> {
        loop {
            if control.pending.load(Ordering::SeqCst) {
                // A parked vCPU must not keep the others held (e.g. by a permission grant).
                self.leaving();
                if !control.park(self) {
                    return Ok(VcpuStop::Stopped);
                }
            }
            if let Some(stop) = self.handle_exit()? {
                return Ok(stop);
            }
        }
    }
}

/// Where the guest was, for error messages.
pub(super) fn guest_position(fd: &VcpuFd) -> String {
    match (fd.get_regs(), fd.get_sregs()) {
        (Ok(regs), Ok(sregs)) => format!(
            "rip {:#x} cs {:#x} cr0 {:#x} cr3 {:#x} efer {:#x}",
            regs.rip, sregs.cs.selector, sregs.cr0, sregs.cr3, sregs.efer
        ),
        _ => "registers unreadable".to_string(),
    }
}

fn internal_error_suberror(fd: &mut VcpuFd) -> u32 {
    let run = fd.get_kvm_run();
    // SAFETY: KVM sets `exit_reason` to KVM_EXIT_INTERNAL_ERROR, for which the `internal`
    // member of the exit union is the one it filled.
    unsafe { run.__bindgen_anon_1.internal.suberror }
}

/// A started vCPU thread.
pub struct VcpuHandle {
    /// Index of the vCPU.
    pub id: u8,
    thread: JoinHandle<()>,
}

/// Starts `vcpu` on its own thread. Fatal exits and errors go to the VM's [`ExitEvent`].
pub fn spawn_vcpu(mut vcpu: Vcpu, control: Arc<VcpuControl>) -> Result<VcpuHandle> {
    let id = vcpu.id;
    control.thread_started();
    let thread_control = control.clone();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            let control = thread_control;
            let flag: *mut u8 = &mut vcpu.fd.get_kvm_run().immediate_exit;
            IMMEDIATE_EXIT.with(|cell| cell.set(flag));
            let outcome = vcpu.run(&control);
            IMMEDIATE_EXIT.with(|cell| cell.set(std::ptr::null_mut()));
            match outcome {
                Ok(VcpuStop::Stopped) => {}
                Ok(VcpuStop::Halted) => {
                    tracing::warn!("vCPU {id} halted with no interrupt source");
                    vcpu.exit
                        .request(ExitReason::Error(format!("vCPU {id} halted")));
                }
                Ok(VcpuStop::GuestExit(reason)) => vcpu.exit.request(reason),
                Err(e) => {
                    tracing::error!("{e}");
                    vcpu.exit.request(ExitReason::Error(e.to_string()));
                }
            }
            control.thread_finished();
        })
        .map_err(|e| {
            control.thread_finished();
            Error::Sys("spawn vCPU thread", e)
        })?;
    Ok(VcpuHandle { id, thread })
}

/// Stops every vCPU out of KVM_RUN and waits until all are parked (or gone).
pub fn pause_all(control: &VcpuControl, handles: &[VcpuHandle]) {
    control.set_request(Request::Pause);
    kick_until(control, handles, |state| state.parked >= state.alive);
}

/// Makes vCPU threads park as soon as they start (a restored VM that must stay paused).
pub fn hold_before_start(control: &VcpuControl) {
    control.set_request(Request::Pause);
}

/// Runs `work` on every parked vCPU thread and returns once all of them have done it. The
/// caller has paused the VM (`pause_all`) and keeps it paused meanwhile; returns how many
/// threads did the work.
pub fn run_on_parked(control: &VcpuControl, work: ParkedWork) -> usize {
    let mut state = control.lock();
    if state.request != Request::Pause {
        return 0;
    }
    state.work = Some(work);
    state.work_generation += 1;
    state.work_done = 0;
    control.changed.notify_all();
    while state.work_done < state.parked {
        state = control
            .changed
            .wait(state)
            .unwrap_or_else(|p| p.into_inner());
    }
    state.work = None;
    state.work_done
}

/// Lets parked vCPUs run again.
pub fn resume_all(control: &VcpuControl) {
    control.set_request(Request::Run);
}

/// Stops and joins every vCPU thread.
pub fn stop_all(control: &VcpuControl, handles: Vec<VcpuHandle>) {
    control.set_request(Request::Stop);
    kick_until(control, &handles, |_| {
        handles.iter().all(|h| h.thread.is_finished())
    });
    for handle in handles {
        if handle.thread.join().is_err() {
            tracing::error!("vCPU {} thread panicked", handle.id);
        }
    }
}

/// Signals the live vCPU threads until `done` holds. Signals are repeated because a thread
/// busy in a device handler (not in KVM_RUN) sees the request only when it comes back.
/// `done` is checked under the control lock right before each wait: a vCPU that parks after
/// the kick notifies `changed` while holding that lock, so its wake-up cannot be lost.
fn kick_until(control: &VcpuControl, handles: &[VcpuHandle], done: impl Fn(&ControlState) -> bool) {
    loop {
        if done(&control.lock()) {
            return;
        }
        for handle in handles.iter().filter(|h| !h.thread.is_finished()) {
            // ESRCH only means the thread already ended.
            let _ = handle.thread.kill(kick_signal());
        }
        let state = control.lock();
        if done(&state) {
            return;
        }
        let _ = control
            .changed
            .wait_timeout(state, Duration::from_millis(20))
            .unwrap_or_else(|p| p.into_inner());
    }
}
