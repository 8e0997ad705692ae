//! The VMM process's one VM slot, which is what the API server talks to.
//!
//! `ext-vmm --api-socket` without a kernel starts with the slot empty, as Cloud Hypervisor
//! does: `vm.info` answers 404 and `vm.restore` fills the slot from a snapshot. Once a VM is
//! in the slot every request goes to it.

use std::sync::{Arc, Condvar, Mutex};

use ext_perm::api::{AssignViewRequest, CreateViewRequest, EventsResponse, SetPermissionsRequest};

use super::error::Error;
use super::snapshot::{MemoryRestoreMode, RestoreConfig};
use super::Vmm;
use crate::api::{
    ApiError, PermCapabilities, VmCounters, VmInfo, VmRestoreConfig, VmSnapshotConfig, VmmBackend,
    VmmPingResponse,
};

/// Holds the VM of this process, if there is one yet.
#[derive(Default)]
pub struct VmmSlot {
    vmm: Mutex<Option<Arc<Vmm>>>,
    /// Set by `vmm.shutdown` while the slot is empty.
    exit_requested: Mutex<bool>,
    changed: Condvar,
}

/// What the process's main thread should do next.
pub enum SlotEvent {
    /// A VM is in the slot: run it.
    Vm(Arc<Vmm>),
    /// `vmm.shutdown` arrived before any VM.
    Exit,
}

impl VmmSlot {
    /// A slot holding `vmm` from the start.
    pub fn with_vmm(vmm: Arc<Vmm>) -> Self {
        VmmSlot {
            vmm: Mutex::new(Some(vmm)),
            ..Default::default()
        }
    }

    fn current(&self) -> Option<Arc<Vmm>> {
        self.vmm.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn vm(&self) -> Result<Arc<Vmm>, ApiError> {
        self.current().ok_or_else(ApiError::no_vm)
    }

    /// Blocks until a VM is in the slot or `vmm.shutdown` arrives.
    pub fn wait(&self) -> SlotEvent {
        let mut vmm = self.vmm.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(vmm) = vmm.as_ref() {
                return SlotEvent::Vm(vmm.clone());
            }
            if *self
                .exit_requested
                .lock()
                .unwrap_or_else(|p| p.into_inner())
            {
                return SlotEvent::Exit;
            }
            vmm = self.changed.wait(vmm).unwrap_or_else(|p| p.into_inner());
        }
    }
}

/// Converts the API body into the restore options (`copy` when no mode is given).
pub fn restore_config(body: &VmRestoreConfig) -> Result<RestoreConfig, ApiError> {
    let mode = match body.memory_restore_mode.as_deref() {
        None | Some("copy") | Some("Copy") => MemoryRestoreMode::Copy,
        Some("mapped") | Some("Mapped") => MemoryRestoreMode::Mapped,
        Some("ondemand") | Some("OnDemand") => MemoryRestoreMode::OnDemand,
        Some(other) => {
            return Err(ApiError::new(
                400,
                format!("memory_restore_mode {other:?}: expected copy, mapped or ondemand"),
            ))
        }
    };
    Ok(RestoreConfig {
        source_url: body.source_url.clone(),
        memory_restore_mode: mode,
        resume: body.resume.unwrap_or(false),
    })
}

impl VmmBackend for VmmSlot {
    fn vmm_ping(&self) -> VmmPingResponse {
        match self.current() {
            Some(vmm) => vmm.vmm_ping(),
            None => VmmPingResponse {
                build_version: env!("CARGO_PKG_VERSION").to_string(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                pid: i64::from(std::process::id()),
                features: vec!["kvm".into(), "virtio-mmio".into(), "snapshot".into()],
            },
        }
    }

    fn vmm_shutdown(&self) -> Result<(), ApiError> {
        if let Some(vmm) = self.current() {
            return vmm.vmm_shutdown();
        }
        *self
            .exit_requested
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = true;
        let _vmm = self.vmm.lock().unwrap_or_else(|p| p.into_inner());
        self.changed.notify_all();
        Ok(())
    }

    fn vm_info(&self) -> Result<VmInfo, ApiError> {
        self.vm()?.vm_info()
    }

    fn vm_pause(&self) -> Result<(), ApiError> {
        self.vm()?.vm_pause()
    }

    fn vm_resume(&self) -> Result<(), ApiError> {
        self.vm()?.vm_resume()
    }

    fn vm_shutdown(&self) -> Result<(), ApiError> {
        self.vm()?.vm_shutdown()
    }

    fn vm_counters(&self) -> Result<VmCounters, ApiError> {
        self.vm()?.vm_counters()
    }

    fn vm_snapshot(&self, config: &VmSnapshotConfig) -> Result<(), ApiError> {
        self.vm()?.vm_snapshot(config)
    }

    fn vm_restore(&self, body: &VmRestoreConfig) -> Result<(), ApiError> {
        let restore = restore_config(body)?;
        // Held across the restore so two concurrent requests cannot both fill the slot.
        let mut slot = self.vmm.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return Err(ApiError::new(
                405,
                "cannot restore: this VMM already has a VM",
            ));
        }
        let vmm = Vmm::restore(&restore).map_err(|e| match e {
            Error::Snapshot(_) | Error::SnapshotMemory(_) | Error::File { .. } => {
                ApiError::new(400, format!("cannot restore: {e}"))
            }
            other => ApiError::new(500, format!("cannot restore: {other}")),
        })?;
        *slot = Some(Arc::new(vmm));
        self.changed.notify_all();
        Ok(())
    }

    fn perm_create_view(&self, request: &CreateViewRequest) -> Result<(), ApiError> {
        self.vm()?.perm_create_view(request)
    }

    fn perm_set(&self, request: &SetPermissionsRequest) -> Result<(), ApiError> {
        self.vm()?.perm_set(request)
    }

    fn perm_assign(&self, request: &AssignViewRequest) -> Result<(), ApiError> {
        self.vm()?.perm_assign(request)
    }

    fn perm_violations(&self) -> Result<EventsResponse, ApiError> {
        self.vm()?.perm_violations()
    }

    fn perm_capabilities(&self) -> Result<PermCapabilities, ApiError> {
        self.vm()?.perm_capabilities()
    }
}
