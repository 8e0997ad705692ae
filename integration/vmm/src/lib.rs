//! `ext-vmm`'s VMM: builds one VM from a [`config::VmConfig`], runs its vCPUs, and drives its
//! lifecycle (Created → Running ⇄ Paused → Shutdown) for the main loop and the REST API
//! (through [`ext_vmm_api::VmmBackend`]).

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod checkpoint;
pub mod config;
pub mod cpu;
pub mod devices;
pub mod error;
pub mod exit;
pub mod figures;
pub mod identity;
pub mod invalid_pages;
pub mod layout;
pub mod memory;
pub mod options;
pub mod perm;
pub mod persist;
mod restored_memory;
pub mod slot;
pub mod snapshot;
pub mod terminal;
pub mod vcpu;
pub mod virtio;
pub mod vm;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};

use checkpoint::DirtyTracking;
use config::{SerialOutput, VmConfig};
use devices::serial::{SerialCounters, SerialInput};
use error::{Error, Result};
use exit::{ExitEvent, ExitReason};
use ext_vmm_api::{
    ApiError, ApiRequest, ApiResponse, ErrorKind, RequestHandler, VmCounters, VmIdentity,
    VmIdentityConfig, VmInfo, VmState, VmmPingResponse,
};
use figures::SnapshotFigures;
use restored_memory::RestoredMemory;
use vcpu::{VcpuControl, VcpuCounters, VcpuHandle};
use vm::{VirtioSlot, Vm};
use vm_superio::Trigger;

struct Lifecycle {
    state: VmState,
    /// The built VM until `boot` moves its vCPUs into threads.
    pending: Option<Vm>,
    handles: Vec<VcpuHandle>,
    /// The VM fd and guest memory of a booted VM: vCPUs run on this memory, so it lives as
    /// long as the VMM.
    booted: Option<(kvm_ioctls::VmFd, memory::GuestRam)>,
}

/// One VMM process: one VM, its counters and its lifecycle.
pub struct Vmm {
    config: VmConfig,
    exit: Arc<ExitEvent>,
    control: Arc<VcpuControl>,
    lifecycle: Mutex<Lifecycle>,
    state_changed: Condvar,
    serial: Arc<Mutex<devices::serial::SerialDevice>>,
    serial_counters: Arc<SerialCounters>,
    vcpu_counters: Vec<Arc<VcpuCounters>>,
    virtio: Vec<VirtioSlot>,
    /// ext-perm's permission manager of this VM, for the `ext/perm.*` endpoints.
    perm: Option<Arc<perm::PermHook>>,
    /// Figures of the last snapshot and of the restore this VM came from.
    figures: Mutex<(Option<SnapshotFigures>, Option<SnapshotFigures>)>,
    /// KVM dirty logging and the snapshot it counts from, for diff snapshots.
    dirty: Mutex<DirtyTracking>,
    /// Keeps the userfaultfd handler of an on-demand restore alive as long as the VM.
    restored_memory: RestoredMemory,
    /// The ACPI power button's interrupt.
    power_button: Arc<devices::IrqTrigger>,
    /// The VM generation ID.
    generation_id: Arc<identity::GenerationId>,
}

/// Wakes the main loop when the VM wants to stop; the loop then reads the reason.
struct ExitWatcher(Arc<ExitEvent>);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(self.0.fd(), EventSet::IN)) {
            tracing::error!("cannot watch the VM exit event: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Drain the counter; the reason itself is read by the main loop.
        let _ = self.0.fd().read();
    }
}

impl Vmm {
    /// Builds the VM (state `Created`).
    pub fn new(config: VmConfig) -> Result<Self> {
        vcpu::register_kick_handler()?;
        let vm = Vm::new(&config)?;
        Ok(Self::from_vm(config, vm, RestoredMemory::Ready))
    }

    /// Wraps a built (or restored) VM, state `Created`.
    fn from_vm(config: VmConfig, mut vm: Vm, restored_memory: RestoredMemory) -> Self {
        let virtio = std::mem::take(&mut vm.virtio);
        Vmm {
            figures: Mutex::default(),
            dirty: Mutex::default(),
            restored_memory,
            perm: vm.perm.clone(),
            power_button: vm.power_button.clone(),
            generation_id: vm.generation_id.clone(),
            exit: vm.exit.clone(),
            control: Arc::new(VcpuControl::default()),
            serial: vm.serial.clone(),
            serial_counters: vm.serial_counters.clone(),
            vcpu_counters: vm.vcpu_counters.clone(),
            virtio,
            lifecycle: Mutex::new(Lifecycle {
                state: VmState::Created,
                pending: Some(vm),
                handles: Vec::new(),
                booted: None,
            }),
            state_changed: Condvar::new(),
            config,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Lifecycle> {
        self.lifecycle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The VM's configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The current lifecycle state.
    pub fn state(&self) -> VmState {
        self.lock().state
    }

    /// Starts the vCPU threads (Created → Running).
    pub fn boot(&self) -> Result<()> {
        let mut lifecycle = self.lock();
        let Some(vm) = lifecycle.pending.take() else {
            return Err(Error::InvalidState(lifecycle.state, "boot"));
        };
        let Vm {
            fd, memory, vcpus, ..
        } = vm;
        lifecycle.booted = Some((fd, memory));
        for vcpu in vcpus {
            match vcpu::spawn_vcpu(vcpu, self.control.clone()) {
                Ok(handle) => lifecycle.handles.push(handle),
                Err(e) => {
                    let handles = std::mem::take(&mut lifecycle.handles);
                    vcpu::stop_all(&self.control, handles);
                    lifecycle.state = VmState::Shutdown;
                    return Err(e);
                }
            }
        }
        lifecycle.state = VmState::Running;
        self.state_changed.notify_all();
        Ok(())
    }

    /// Serves stdin and the exit event until the VM stops; then stops the vCPUs and returns
    /// why the VM ended (state `Shutdown`).
    pub fn run_until_exit(&self) -> Result<ExitReason> {
        let mut manager: EventManager<Box<dyn MutEventSubscriber + Send>> =
            EventManager::new().map_err(|e| Error::Sys("epoll", io_error(e)))?;
        manager.add_subscriber(Box::new(ExitWatcher(self.exit.clone())));
        if self.config.serial == SerialOutput::Tty && devices::serial::stdin_is_pollable() {
            let input = SerialInput::new(self.serial.clone())
                .map_err(|e| Error::Sys("serial input eventfd", e))?;
            manager.add_subscriber(Box::new(input));
        }
        let reason = loop {
            if let Some(reason) = self.exit.reason() {
                break reason;
            }
            manager
                .run_with_timeout(500)
                .map_err(|e| Error::Sys("epoll_wait", io_error(e)))?;
        };
        self.stop_vcpus();
        Ok(reason)
    }

    fn stop_vcpus(&self) {
        let handles = std::mem::take(&mut self.lock().handles);
        vcpu::stop_all(&self.control, handles);
        let mut lifecycle = self.lock();
        lifecycle.state = VmState::Shutdown;
        lifecycle.pending = None;
        self.state_changed.notify_all();
    }

    /// Blocks while the VM is `Created` (waiting for `vm.boot`, or deleted before it).
    pub fn wait_while_created(&self) -> VmState {
        let mut lifecycle = self.lock();
        while lifecycle.state == VmState::Created {
            lifecycle = self
                .state_changed
                .wait(lifecycle)
                .unwrap_or_else(|p| p.into_inner());
        }
        lifecycle.state
    }

    /// Pauses every vCPU (Running → Paused).
    pub fn pause(&self) -> Result<()> {
        let mut lifecycle = self.lock();
        if lifecycle.state != VmState::Running {
            return Err(Error::InvalidState(lifecycle.state, "pause"));
        }
        vcpu::pause_all(&self.control, &lifecycle.handles);
        lifecycle.state = VmState::Paused;
        self.state_changed.notify_all();
        Ok(())
    }

    /// Resumes paused vCPUs (Paused → Running).
    pub fn resume(&self) -> Result<()> {
        let mut lifecycle = self.lock();
        if lifecycle.state != VmState::Paused {
            return Err(Error::InvalidState(lifecycle.state, "resume"));
        }
        vcpu::resume_all(&self.control);
        lifecycle.state = VmState::Running;
        self.state_changed.notify_all();
        Ok(())
    }

    /// Asks the main loop to stop the VM and waits until it has.
    pub fn shutdown_vm(&self) -> Result<()> {
        let mut lifecycle = self.lock();
        match lifecycle.state {
            VmState::Shutdown => return Err(Error::InvalidState(VmState::Shutdown, "shut down")),
            VmState::Created => {
                lifecycle.state = VmState::Shutdown;
                lifecycle.pending = None;
                self.state_changed.notify_all();
            }
            VmState::Running | VmState::Paused => {}
        }
        self.exit.request(ExitReason::Requested);
        while lifecycle.state != VmState::Shutdown {
            lifecycle = self
                .state_changed
                .wait(lifecycle)
                .unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// Every counter: serial, per-vCPU exits, per virtio device.
    pub fn counters(&self) -> VmCounters {
        let mut all = VmCounters::new();
        let serial = &self.serial_counters;
        all.insert(
            "serial".into(),
            BTreeMap::from([
                ("tx_bytes".into(), serial.tx_bytes.load(Ordering::Relaxed)),
                ("rx_bytes".into(), serial.rx_bytes.load(Ordering::Relaxed)),
            ]),
        );
        for (id, counters) in self.vcpu_counters.iter().enumerate() {
            let map = counters
                .snapshot()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            all.insert(format!("vcpu{id}"), map);
        }
        for slot in &self.virtio {
            let transport = slot.transport.lock().unwrap_or_else(|p| p.into_inner());
            let map = transport
                .device()
                .counters()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect();
            all.insert(slot.name.clone(), map);
        }
        let figures = self
            .figures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (name, figures) in [("snapshot", figures.0), ("restore", figures.1)] {
            if let Some(figures) = figures {
                all.insert(name.into(), figures.counters().into_iter().collect());
            }
        }
        if let Some(ondemand) = self.restored_memory.counters() {
            all.insert("restore_ondemand".into(), ondemand.into_iter().collect());
        }
        all
    }

    /// `vm.info`'s snapshot figures: the last snapshot and the restore this VM came from.
    pub fn snapshot_info(&self) -> serde_json::Value {
        let figures = self
            .figures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        serde_json::json!({
            "last_snapshot": figures.0.map(|f| f.to_json()),
            "restored_from": figures.1.map(|f| f.to_json()),
        })
    }
}

impl Vmm {
    /// The VM's permission manager, or 501 when ext-perm could not attach (see the log).
    fn perm_hook(&self) -> std::result::Result<&perm::PermHook, ApiError> {
        self.perm.as_deref().ok_or_else(|| {
            ApiError::not_implemented(
                "page permissions are unavailable: ext-perm could not take over the memslots",
            )
        })
    }
}

impl RequestHandler for Vmm {
    fn handle(&self, request: ApiRequest) -> std::result::Result<ApiResponse, ApiError> {
        self.handle_vm_request(request)
    }
}

fn io_error(e: event_manager::Error) -> std::io::Error {
    std::io::Error::other(format!("{e:?}"))
}

fn api_error(e: Error) -> ApiError {
    match e {
        Error::InvalidState(state, action) => ApiError::invalid_state(action, state),
        Error::Snapshot(_) => ApiError::bad_request(e.to_string()),
        other => ApiError::internal(other.to_string()),
    }
}

/// What `vmm.ping` says about this build.
pub fn ping_response() -> VmmPingResponse {
    VmmPingResponse {
        build_version: env!("CARGO_PKG_VERSION").to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: i64::from(std::process::id()),
        features: vec!["kvm".into(), "virtio-mmio".into(), "snapshot".into()],
    }
}

impl Vmm {
    /// Presses the ACPI power button: the GED's interrupt, whose `_EVT` notifies the
    /// PNP0C0C button. What follows is the guest's choice (usually an orderly power-off).
    pub fn power_button(&self) -> Result<()> {
        let state = self.state();
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(Error::InvalidState(state, "press the power button"));
        }
        self.power_button
            .trigger()
            .map_err(|e| Error::Sys("power button interrupt", e))
    }

    /// The VM's identity as the guest sees it.
    pub fn identity(&self) -> Result<VmIdentity> {
        Ok(VmIdentity {
            vmgenid: self.generation_id.get()?.to_string(),
        })
    }

    /// Gives the VM a new generation ID (`config.vmgenid`, or a random one) and tells the
    /// guest; allowed until the VM shuts down.
    pub fn set_identity(
        &self,
        config: &VmIdentityConfig,
    ) -> std::result::Result<VmIdentity, ApiError> {
        let state = self.state();
        if state == VmState::Shutdown {
            return Err(api_error(Error::InvalidState(state, "change the identity")));
        }
        let id = match &config.vmgenid {
            Some(text) => identity::VmGenId::parse(text).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "vmgenid {text:?}: expected 32 hex digits (dashes allowed)"
                ))
            })?,
            None => identity::VmGenId::random().map_err(api_error)?,
        };
        self.generation_id.set(id).map_err(api_error)?;
        tracing::info!("VM generation ID is now {id}");
        self.identity().map_err(api_error)
    }

    /// Answers the API requests about this VM. Requests about the process (create, boot of
    /// a created VM, delete, restore, ping, shutdown of the VMM) are the slot's
    /// ([`slot::VmmSlot`]); they never get here.
    pub fn handle_vm_request(
        &self,
        request: ApiRequest,
    ) -> std::result::Result<ApiResponse, ApiError> {
        let done = |result: Result<()>| result.map(|()| ApiResponse::Empty).map_err(api_error);
        match request {
            ApiRequest::VmInfo => ApiResponse::json(&VmInfo {
                config: self.config.to_ch_json(),
                state: self.state(),
                memory_actual_size: self.config.memory_size,
                snapshot: Some(self.snapshot_info()),
            }),
            ApiRequest::VmBoot => done(self.boot()),
            ApiRequest::VmPause => done(self.pause()),
            ApiRequest::VmResume => done(self.resume()),
            ApiRequest::VmShutdown => done(self.shutdown_vm()),
            ApiRequest::VmPowerButton => done(self.power_button()),
            ApiRequest::VmCounters => ApiResponse::json(&self.counters()),
            ApiRequest::VmSnapshot(config) => self
                .snapshot(&config)
                .map(|_| ApiResponse::Empty)
                .map_err(api_error),
            ApiRequest::VmIdentity => ApiResponse::json(&self.identity().map_err(api_error)?),
            ApiRequest::VmSetIdentity(config) => ApiResponse::json(&self.set_identity(&config)?),
            ApiRequest::PermCreateView(request) => self
                .perm_hook()?
                .create_view(&request)
                .map(|()| ApiResponse::Empty),
            ApiRequest::PermSet(request) => {
                self.perm_hook()?.set(&request).map(|()| ApiResponse::Empty)
            }
            ApiRequest::PermAssign(request) => self
                .perm_hook()?
                .assign(&request)
                .map(|()| ApiResponse::Empty),
            ApiRequest::PermViolations => ApiResponse::json(&self.perm_hook()?.violations()),
            ApiRequest::PermCapabilities => ApiResponse::json(&self.perm_hook()?.capabilities()),
            ApiRequest::VmmPing
            | ApiRequest::VmmShutdown
            | ApiRequest::VmCreate(_)
            | ApiRequest::VmDelete
            | ApiRequest::VmReboot
            | ApiRequest::VmRestore(_) => Err(ApiError::new(
                ErrorKind::Internal,
                "a request about the VMM process reached the VM",
            )),
        }
    }
}
