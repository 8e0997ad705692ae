//! The VMM process's one VM slot, which is what the API server talks to.
//!
//! As in Cloud Hypervisor, a VMM started with only `--api-socket` has an empty slot:
//! `vm.create` (a `VmConfig`) or `vm.restore` (a snapshot) fills it, `vm.boot` starts a
//! created VM, `vm.delete` empties the slot again, `vm.reboot` replaces the VM by a fresh one
//! from the same configuration, and `vmm.shutdown` ends the process. The process's main
//! thread waits here for each VM to run ([`VmmSlot::wait_next`]). Every other request goes to
//! the VM in the slot ([`Vmm::handle`]).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use ext_snapshot::RestoreMode;
use ext_vmm_api::{
    ApiError, ApiRequest, ApiResponse, RequestHandler, VmCreateConfig, VmRestoreConfig, VmState,
};

use super::config::{SerialOutput, VmConfig};
use super::error::Error;
use super::exit::ExitReason;
use super::snapshot::{check_page_server, parse_restore_mode, RestoreConfig};
use super::terminal::RawTerminal;
use super::{ping_response, Vmm};

#[derive(Default)]
struct SlotState {
    vmm: Option<Arc<Vmm>>,
    /// Set by `vmm.shutdown`: the process ends.
    exit_requested: bool,
}

/// Holds the VM of this process, if there is one.
#[derive(Default)]
pub struct VmmSlot {
    state: Mutex<SlotState>,
    changed: Condvar,
}

/// What the process's main thread should do next.
pub enum SlotEvent {
    /// A VM (other than the last one) is in the slot: run it.
    Vm(Arc<Vmm>),
    /// `vmm.shutdown` arrived.
    Exit,
}

impl VmmSlot {
    /// A slot holding `vmm` from the start.
    pub fn with_vmm(vmm: Arc<Vmm>) -> Self {
        VmmSlot {
            state: Mutex::new(SlotState {
                vmm: Some(vmm),
                exit_requested: false,
            }),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn vm(&self) -> Result<Arc<Vmm>, ApiError> {
        self.lock().vmm.clone().ok_or_else(ApiError::no_vm)
    }

    /// Blocks until the slot holds a VM that is not `last`, or `vmm.shutdown` arrives.
    pub fn wait_next(&self, last: Option<&Arc<Vmm>>) -> SlotEvent {
        let mut state = self.lock();
        loop {
            if state.exit_requested {
                return SlotEvent::Exit;
            }
            if let Some(vmm) = state.vmm.as_ref() {
                if !last.is_some_and(|last| Arc::ptr_eq(last, vmm)) {
                    return SlotEvent::Vm(vmm.clone());
                }
            }
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The process's main loop: runs each VM that comes into the slot until it ends, then
    /// waits for the next, until `vmm.shutdown` (or, without an API to bring another VM,
    /// until the first one ends). `boot_first`: the VM already in the slot (from the command
    /// line) boots at once; a VM created through the API waits for `vm.boot`. Returns why
    /// the last VM ended.
    pub fn run(&self, boot_first: bool, keep_serving: bool) -> Result<ExitReason, Error> {
        let mut boot_now = boot_first;
        let mut last: Option<Arc<Vmm>> = None;
        let mut last_reason = ExitReason::Requested;
        loop {
            let vmm = match self.wait_next(last.as_ref()) {
                SlotEvent::Vm(vmm) => vmm,
                SlotEvent::Exit => return Ok(last_reason),
            };
            last = Some(vmm.clone());
            if std::mem::take(&mut boot_now) && vmm.state() == VmState::Created {
                vmm.boot()?;
            }
            if vmm.wait_while_created() == VmState::Shutdown {
                // Deleted before it booted.
                continue;
            }
            // Raw mode only while the guest console is on this terminal.
            let raw_terminal = if vmm.config().serial == SerialOutput::Tty {
                RawTerminal::enable().map_err(|e| Error::Sys("terminal raw mode", e))?
            } else {
                None
            };
            let reason = vmm.run_until_exit()?;
            drop(raw_terminal);
            tracing::info!("VM stopped: {reason:?}");
            if !keep_serving {
                return Ok(reason);
            }
            last_reason = reason;
        }
    }

    /// Puts `vmm` in the empty slot; `action` names the request for the error.
    fn fill(
        &self,
        action: &str,
        build: impl FnOnce() -> Result<Vmm, ApiError>,
    ) -> Result<(), ApiError> {
        // Held across the build so two concurrent requests cannot both fill the slot.
        let mut state = self.lock();
        if let Some(vmm) = &state.vmm {
            return Err(ApiError::invalid_state(
                &format!("{action}: this VMM already has a VM"),
                vmm.state(),
            ));
        }
        state.vmm = Some(Arc::new(build()?));
        self.changed.notify_all();
        Ok(())
    }

    fn create(&self, config: &VmCreateConfig) -> Result<(), ApiError> {
        let config = VmConfig::from_create(config).map_err(build_error)?;
        self.fill("create", || Vmm::new(config).map_err(build_error))
    }

    fn restore(&self, body: &VmRestoreConfig) -> Result<(), ApiError> {
        let restore = restore_config(body)?;
        // A restored VM's vCPU threads start parked (running at once with `resume`), as in
        // Cloud Hypervisor; the main thread then runs it.
        self.fill("restore", || {
            Vmm::restore(&restore).map_err(|e| match e {
                Error::Snapshot(_) | Error::SnapshotMemory(_) | Error::File { .. } => {
                    ApiError::bad_request(format!("cannot restore: {e}"))
                }
                other => ApiError::internal(format!("cannot restore: {other}")),
            })
        })
    }

    /// Stops the VM if it runs and empties the slot.
    fn delete(&self) -> Result<(), ApiError> {
        let vmm = self.vm()?;
        if vmm.state() != VmState::Shutdown {
            vmm.shutdown_vm()
                .map_err(|e| ApiError::internal(format!("cannot stop the VM: {e}")))?;
        }
        let mut state = self.lock();
        if state.vmm.as_ref().is_some_and(|v| Arc::ptr_eq(v, &vmm)) {
            state.vmm = None;
        }
        self.changed.notify_all();
        Ok(())
    }

    /// Stops the VM and boots a fresh one from the same configuration (memory, devices and
    /// guest state start anew, as after a hardware reset).
    fn reboot(&self) -> Result<(), ApiError> {
        let vmm = self.vm()?;
        let state = vmm.state();
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(ApiError::invalid_state("reboot", state));
        }
        let config = vmm.config().clone();
        vmm.shutdown_vm()
            .map_err(|e| ApiError::internal(format!("cannot stop the VM: {e}")))?;
        let fresh = Vmm::new(config).map_err(build_error)?;
        fresh
            .boot()
            .map_err(|e| ApiError::internal(format!("cannot boot the rebooted VM: {e}")))?;
        let mut slot = self.lock();
        slot.vmm = Some(Arc::new(fresh));
        self.changed.notify_all();
        Ok(())
    }

    fn vmm_shutdown(&self) -> Result<(), ApiError> {
        let vmm = self.lock().vmm.clone();
        if let Some(vmm) = vmm {
            if matches!(vmm.state(), VmState::Running | VmState::Paused) {
                vmm.shutdown_vm()
                    .map_err(|e| ApiError::internal(format!("cannot stop the VM: {e}")))?;
            }
        }
        self.lock().exit_requested = true;
        self.changed.notify_all();
        Ok(())
    }
}

/// A VM that cannot be built from its configuration: the request's fault when a file it
/// names cannot be read or a setting is refused, the VMM's otherwise.
fn build_error(e: Error) -> ApiError {
    match e {
        Error::File { .. } | Error::InvalidOption(_) | Error::Unsupported(_) | Error::Boot(_) => {
            ApiError::bad_request(format!("cannot create the VM: {e}"))
        }
        other => ApiError::internal(format!("cannot create the VM: {other}")),
    }
}

/// Converts the API body into the restore options (`copy` when no mode is given).
pub fn restore_config(body: &VmRestoreConfig) -> Result<RestoreConfig, ApiError> {
    let memory_restore_mode = match body.memory_restore_mode.as_deref() {
        None => RestoreMode::Eager,
        Some(text) => parse_restore_mode(text).ok_or_else(|| {
            ApiError::bad_request(format!(
                "memory_restore_mode {text:?}: expected copy, mapped or ondemand"
            ))
        })?,
    };
    let page_server = body.page_server.as_deref().map(std::path::PathBuf::from);
    check_page_server(memory_restore_mode, page_server.as_deref())
        .map_err(|reason| ApiError::bad_request(format!("page_server {reason}")))?;
    Ok(RestoreConfig {
        source_url: body.source_url.clone(),
        memory_restore_mode,
        resume: body.resume.unwrap_or(false),
        page_server,
        serial: None,
    })
}

impl RequestHandler for VmmSlot {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        let done = |result: Result<(), ApiError>| result.map(|()| ApiResponse::Empty);
        match request {
            ApiRequest::VmmPing => ApiResponse::json(&ping_response()),
            ApiRequest::VmmShutdown => done(self.vmm_shutdown()),
            ApiRequest::VmCreate(config) => done(self.create(&config)),
            ApiRequest::VmRestore(config) => done(self.restore(&config)),
            ApiRequest::VmDelete => done(self.delete()),
            ApiRequest::VmReboot => done(self.reboot()),
            other => self.vm()?.handle_vm_request(other),
        }
    }
}
