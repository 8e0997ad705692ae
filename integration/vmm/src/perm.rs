//! `ext-perm` inside `ext-vmm`: guest page permissions enforced on this VM's memslots.
//!
//! [`PermHook::attach`] hands the RAM memslots `register_memory` created over to ext-perm's
//! KVM memslot backend (`KvmMemslotBackend::adopt`), so every protection set through the API
//! is a real memslot change (read-only slot, or no slot). [`PermHook`] is the vCPU loop's
//! [`ExitInterceptor`]: each vCPU thread
//! - brackets `KVM_RUN` with `before_run`/`after_run` (ext-perm's `RunGate`, which holds the
//!   other vCPUs while one runs under a single-step grant);
//! - offers every MMIO, emulation-failure and debug exit to `intercept`, which asks ext-perm;
//!   exits that are not permission faults go back to the loop (device buses, fatal errors);
//! - calls `vcpu_leaving` before it parks or stops, so a grant never outlives a vCPU that is
//!   not running.
//!
//! A denied access injects #GP(0) into the guest (the refused write is dropped, a refused
//! read returns all-ones, a refused fetch never runs); a Linux guest turns that into
//! `SIGSEGV` for a user program. The API thread reaches the manager through the
//! `perm_*` methods below (`ext/perm.*` endpoints).

use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::Arc;

use ext_perm::api::{AssignViewRequest, CreateViewRequest, EventsResponse, SetPermissionsRequest};
use ext_perm::kvm::{KvmMemslotBackend, KvmVcpu};
use ext_perm::Permissions;
use ext_perm::{
    Decision, DenyAction, ExitHandler, GrantPreference, ManagerConfig, PermissionControl,
    PermissionExit, PermissionManager, RunGate, StraddlePolicy,
};
use ext_vmm_api::{ErrorKind, PermAssign, PermCreateView, PermSet};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemory, GuestMemoryRegion};

use super::error::{Error, Result};
use super::exit::ExitReason;
use super::memory::GuestRam;
use super::vcpu::{kick_signal, ExitInterceptor, InterceptedExit, Interception, VcpuStop};
use ext_vmm_api::{ApiError, PermCapabilities};

/// `#GP`, the exception a refused access raises in the guest.
const GENERAL_PROTECTION: u8 = 13;

type Manager = PermissionManager<KvmMemslotBackend, GuestRam>;

/// The VM's permission manager and the gate its vCPU threads pass through.
pub struct PermHook {
    manager: Manager,
    gate: Arc<RunGate>,
    vcpus: u32,
    ram: Vec<Range<u64>>,
}

fn perm_error(context: &str, error: ext_perm::Error) -> ApiError {
    use ext_perm::Error as E;
    let kind = match error {
        E::InvalidRange { .. }
        | E::Unaligned { .. }
        | E::NoSuchView(_)
        | E::ViewExists(_)
        | E::InvalidPermissions(_) => ErrorKind::BadRequest,
        _ => ErrorKind::Internal,
    };
    ApiError {
        kind,
        messages: vec![context.to_string(), error.to_string()],
    }
}

/// Parses a `"rwx"`-style permission string of a request.
fn permissions(text: &str) -> std::result::Result<Permissions, ApiError> {
    text.parse().map_err(|e: ext_perm::Error| {
        ApiError::bad_request_with(format!("invalid permissions {text:?}"), e.to_string())
    })
}

impl PermHook {
    /// Takes over the RAM memslots of `vm` (registered by `register_memory`, region `i` as
    /// slot `i`) with ext-perm's KVM backend. Nothing is protected until the API says so.
    pub fn attach(kvm: &Kvm, vm: &VmFd, memory: &GuestRam, vcpus: u8) -> Result<Self> {
        // The backend wants its own handle on the VM: a duplicate of the VM fd names the same
        // VM, and the VmFd the VMM keeps is untouched.
        // SAFETY: dup of a descriptor this process owns; the result is checked below.
        let dup = unsafe { libc::dup(vm.as_raw_fd()) };
        if dup < 0 {
            return Err(Error::last_os("dup(VM fd)"));
        }
        // SAFETY: `dup` is a fresh descriptor of a KVM VM that nobody else owns; the VmFd
        // takes ownership and closes it on drop.
        let vm_dup = unsafe { kvm.create_vmfd_from_rawfd(dup) }
            .map_err(|e| Error::Kvm("VmFd from a duplicated VM fd", e))?;
        let backend = KvmMemslotBackend::adopt(Arc::new(vm_dup), Arc::new(memory.clone()), 0)
            .map_err(|e| Error::Memory(format!("ext-perm cannot adopt the RAM memslots: {e}")))?;
        tracing::info!("ext-perm: {:?}", backend.capabilities());
        let gate = Arc::new(RunGate::new(Some(kick_signal())));
        let config = ManagerConfig {
            deny_action: DenyAction::InjectException {
                vector: GENERAL_PROTECTION,
                error_code: Some(0),
            },
            straddle: StraddlePolicy::Grant,
            grant: GrantPreference::Auto,
            ..ManagerConfig::default()
        };
        let manager =
            PermissionManager::new(backend, Arc::new(memory.clone()), gate.clone(), config)
                .map_err(|e| Error::Memory(format!("ext-perm: {e}")))?;
        let ram = memory
            .iter()
            .map(|r| r.start_addr().0..r.start_addr().0 + r.len())
            .collect();
        Ok(PermHook {
            manager,
            gate,
            vcpus: u32::from(vcpus),
            ram,
        })
    }

    /// `PUT ext/perm.create-view`.
    pub fn create_view(&self, request: &PermCreateView) -> std::result::Result<(), ApiError> {
        let request = CreateViewRequest {
            view: request.view,
            default_permissions: permissions(&request.default_permissions)?,
        };
        PermissionControl::create_view(&self.manager, &request)
            .map_err(|e| perm_error("cannot create the view", e))
    }

    /// `PUT ext/perm.set`: the range must lie inside one guest RAM region.
    pub fn set(&self, request: &PermSet) -> std::result::Result<(), ApiError> {
        let end = request.gpa.checked_add(request.size);
        let in_ram = end.is_some_and(|end| {
            self.ram
                .iter()
                .any(|r| r.start <= request.gpa && end <= r.end)
        });
        if !in_ram {
            return Err(ApiError {
                kind: ErrorKind::BadRequest,
                messages: vec![
                    "cannot set permissions".into(),
                    format!(
                        "range {:#x}+{:#x} is not inside guest RAM ({})",
                        request.gpa,
                        request.size,
                        self.ram
                            .iter()
                            .map(|r| format!("{:#x}..{:#x}", r.start, r.end))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                ],
            });
        }
        let request = SetPermissionsRequest {
            view: request.view,
            gpa: request.gpa,
            size: request.size,
            permissions: permissions(&request.permissions)?,
        };
        PermissionControl::set_permissions(&self.manager, &request)
            .map_err(|e| perm_error("cannot set permissions", e))
    }

    /// `PUT ext/perm.assign`.
    pub fn assign(&self, request: &PermAssign) -> std::result::Result<(), ApiError> {
        if request.vcpu >= self.vcpus {
            return Err(ApiError {
                kind: ErrorKind::BadRequest,
                messages: vec![
                    "cannot assign the view".into(),
                    format!(
                        "vCPU {} does not exist (the VM has {})",
                        request.vcpu, self.vcpus
                    ),
                ],
            });
        }
        let request = AssignViewRequest {
            vcpu: request.vcpu,
            view: request.view,
        };
        PermissionControl::assign_view(&self.manager, &request)
            .map_err(|e| perm_error("cannot assign the view", e))
    }

    /// `GET ext/perm.violations`: every retained violation and grant, and the counters.
    pub fn violations(&self) -> EventsResponse {
        self.manager.events(0)
    }

    /// `GET ext/perm.capabilities`.
    pub fn capabilities(&self) -> PermCapabilities {
        let info = self.manager.backend_info();
        self.manager.with_backend(|backend| PermCapabilities {
            backend: info.backend,
            per_vcpu_views: info.per_vcpu_views,
            memslots: backend.memslot_count() as u64,
            memslot_operations: backend.memslot_operations(),
            kvm: serde_json::to_value(backend.capabilities()).unwrap_or_default(),
        })
    }
}

impl ExitInterceptor for PermHook {
    fn before_run(&self, vcpu: u8) {
        self.gate.enter(u32::from(vcpu));
    }

    fn after_run(&self, vcpu: u8) {
        self.gate.leave(u32::from(vcpu));
    }

    /// Asks ext-perm about an exit; whatever is not a permission fault is left to the loop.
    fn intercept(
        &self,
        fd: &VcpuFd,
        vcpu: u8,
        exit: InterceptedExit,
        data: &mut [u8],
    ) -> Result<Interception> {
        let exit = match exit {
            InterceptedExit::MmioRead { gpa, .. } => PermissionExit::MmioRead { gpa, data },
            InterceptedExit::MmioWrite { gpa, ref data, len } => PermissionExit::MmioWrite {
                gpa,
                data: &data[..len],
            },
            InterceptedExit::InternalError { suberror } => {
                PermissionExit::InternalError { suberror }
            }
            InterceptedExit::Debug => PermissionExit::Debug,
        };
        let decision = self
            .manager
            .handle_exit(&KvmVcpu::new(fd, u32::from(vcpu)), exit)
            .map_err(|e| Error::VcpuExit(vcpu, format!("ext-perm: {e}")))?;
        Ok(match decision {
            Decision::NotHandled => Interception::NotHandled,
            Decision::Denied { stop: true } => {
                Interception::Stop(VcpuStop::GuestExit(ExitReason::Error(format!(
                    "vCPU {vcpu} stopped by ext-perm after a refused access"
                ))))
            }
            _ => Interception::Handled,
        })
    }

    /// Revokes a single-step grant the vCPU still holds, releasing the other vCPUs (it
    /// re-faults and is granted again when it runs).
    fn vcpu_leaving(&self, fd: &VcpuFd, vcpu: u8) {
        if let Err(e) = self
            .manager
            .vcpu_stopped(&KvmVcpu::new(fd, u32::from(vcpu)))
        {
            tracing::error!("vCPU {vcpu}: ext-perm could not revoke its grant: {e}");
        }
    }
}
