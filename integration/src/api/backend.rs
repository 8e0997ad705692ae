//! The boundary between the REST API server and the VMM.
//!
//! The HTTP server (in [`crate::api`]) parses requests and calls a [`VmmBackend`]; the VMM
//! implements it. The types mirror Cloud Hypervisor's API bodies (`vmm.ping`, `vm.info`,
//! `vm.counters`), so `ch-remote`-style clients read them unchanged.

use std::collections::BTreeMap;

use ext_perm::api::{AssignViewRequest, CreateViewRequest, EventsResponse, SetPermissionsRequest};
use serde::{Deserialize, Serialize};

/// The lifecycle state of the VM, as Cloud Hypervisor reports it in `vm.info`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Configured, not yet booted.
    Created,
    /// vCPUs are running.
    Running,
    /// vCPUs are stopped; memory and device state are frozen.
    Paused,
    /// The guest powered off or was shut down.
    Shutdown,
}

/// Body of `GET /api/v1/vmm.ping`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmmPingResponse {
    /// Build identifier (crate version plus git description when known).
    pub build_version: String,
    /// The VMM version.
    pub version: String,
    /// Process id of the VMM.
    pub pid: i64,
    /// Optional features compiled in.
    pub features: Vec<String>,
}

/// Body of `GET /api/v1/vm.info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// The VM configuration, in Cloud Hypervisor's `VmConfig` shape (fields we do not support
    /// are absent).
    pub config: serde_json::Value,
    /// Current lifecycle state.
    pub state: VmState,
    /// Guest memory size in bytes as currently provided to the guest.
    pub memory_actual_size: u64,
    /// ext-vmm extension: figures of the last `vm.snapshot` and of the restore this VM came
    /// from (pages by type, bytes, seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<serde_json::Value>,
}

/// Body of `GET /api/v1/vm.counters`: device id → counter name → value.
pub type VmCounters = BTreeMap<String, BTreeMap<String, u64>>;

/// Body of `PUT /api/v1/vm.snapshot`, in Cloud Hypervisor's `VmSnapshotConfig` shape.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSnapshotConfig {
    /// Where to write the snapshot, e.g. `file:///var/snapshots/vm1`.
    pub destination_url: String,
    /// ext-vmm extension: a snapshot directory of this same VM taken earlier; the memory is
    /// then written as a diff holding only pages dirtied since that snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// Body of `PUT /api/v1/vm.restore`, in Cloud Hypervisor's `RestoreConfig` shape (fields we do
/// not support, such as `prefault` and `net_fds`, are ignored).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRestoreConfig {
    /// Snapshot directory, e.g. `file:///var/snapshots/vm1`.
    pub source_url: String,
    /// `copy` (default), `mapped` or `ondemand`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_restore_mode: Option<String>,
    /// Resume the VM after restoring it (default false: it stays paused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<bool>,
}

/// Body of `GET /api/v1/ext/perm.capabilities`: how this VM enforces page permissions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PermCapabilities {
    /// Enforcement backend ("kvm-memslot").
    pub backend: String,
    /// Whether views are enforced per vCPU without exits (false on KVM memslots).
    pub per_vcpu_views: bool,
    /// RAM memslots registered right now (grows as protections split RAM).
    pub memslots: u64,
    /// `KVM_SET_USER_MEMORY_REGION` calls made by the backend so far.
    pub memslot_operations: u64,
    /// ext-perm's capability probe of this host's KVM.
    pub kvm: serde_json::Value,
}

/// The answer of a backend without page-permission support.
fn perm_not_supported() -> ApiError {
    ApiError::new(
        501,
        "page permissions (ext/perm.*) are not available in this VMM",
    )
}

/// An error the backend returns; the server turns it into an HTTP status and a JSON array of
/// strings (outermost error first, then its causes), as Cloud Hypervisor does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code (4xx for a request the VMM refuses, 5xx for a failure inside the VMM).
    pub status: u16,
    /// Human-readable messages, outermost first.
    pub messages: Vec<String>,
}

impl ApiError {
    /// A 4xx/5xx error with a single message.
    pub fn new(status: u16, message: impl Into<String>) -> Self {
        ApiError {
            status,
            messages: vec![message.into()],
        }
    }

    /// `404 Not Found` for a request that needs a VM when none exists.
    pub fn no_vm() -> Self {
        ApiError::new(404, "VM is not created")
    }

    /// `405`-style refusal when the VM is in a state that forbids the action (Cloud Hypervisor
    /// answers such requests with a 4xx and the reason).
    pub fn invalid_state(action: &str, state: VmState) -> Self {
        ApiError::new(405, format!("cannot {action}: VM is {state:?}"))
    }
}

/// What the VMM offers the API server. Every method is called from the API server thread and
/// must not block for long; state changes (pause, resume, shutdown) complete before returning.
pub trait VmmBackend: Send + Sync + 'static {
    /// `GET vmm.ping`.
    fn vmm_ping(&self) -> VmmPingResponse;
    /// `PUT vmm.shutdown`: stop the VM if any, then make the VMM process exit.
    fn vmm_shutdown(&self) -> Result<(), ApiError>;
    /// `GET vm.info`.
    fn vm_info(&self) -> Result<VmInfo, ApiError>;
    /// `PUT vm.pause`: stop every vCPU; returns once all are stopped.
    fn vm_pause(&self) -> Result<(), ApiError>;
    /// `PUT vm.resume`: let paused vCPUs run again.
    fn vm_resume(&self) -> Result<(), ApiError>;
    /// `PUT vm.shutdown`: stop the VM (the VMM process keeps serving the API).
    fn vm_shutdown(&self) -> Result<(), ApiError>;
    /// `GET vm.counters`.
    fn vm_counters(&self) -> Result<VmCounters, ApiError>;
    /// `PUT vm.snapshot`: write a snapshot of the paused VM to `config.destination_url`.
    ///
    /// A VMM that cannot snapshot yet keeps this default, which answers `501 Not Implemented`
    /// so clients learn the endpoint exists but is not available in this build.
    fn vm_snapshot(&self, config: &VmSnapshotConfig) -> Result<(), ApiError> {
        let _ = config;
        Err(ApiError::new(
            501,
            "vm.snapshot is not supported by this VMM",
        ))
    }
    /// `PUT vm.restore`: create the VM from a snapshot. Only a VMM that has no VM yet accepts
    /// it. Default: 501.
    fn vm_restore(&self, config: &VmRestoreConfig) -> Result<(), ApiError> {
        let _ = config;
        Err(ApiError::new(
            501,
            "vm.restore is not supported by this VMM",
        ))
    }
    /// `PUT ext/perm.create-view`: create a permission view (ext-perm). Default: 501.
    fn perm_create_view(&self, request: &CreateViewRequest) -> Result<(), ApiError> {
        let _ = request;
        Err(perm_not_supported())
    }
    /// `PUT ext/perm.set`: set permissions on a guest-physical range of a view. Default: 501.
    fn perm_set(&self, request: &SetPermissionsRequest) -> Result<(), ApiError> {
        let _ = request;
        Err(perm_not_supported())
    }
    /// `PUT ext/perm.assign`: put a vCPU in a view. Default: 501.
    fn perm_assign(&self, request: &AssignViewRequest) -> Result<(), ApiError> {
        let _ = request;
        Err(perm_not_supported())
    }
    /// `GET ext/perm.violations`: violation and grant reports and counters. Default: 501.
    fn perm_violations(&self) -> Result<EventsResponse, ApiError> {
        Err(perm_not_supported())
    }
    /// `GET ext/perm.capabilities`: the enforcement backend and KVM's capabilities. Default: 501.
    fn perm_capabilities(&self) -> Result<PermCapabilities, ApiError> {
        Err(perm_not_supported())
    }
}
