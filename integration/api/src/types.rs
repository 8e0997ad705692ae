//! Request and response bodies of the API, in Cloud Hypervisor's shapes (`vmm.ping`,
//! `vm.info`, `vm.counters`, `vm.snapshot`, `vm.restore`), so Cloud Hypervisor's `ch-remote`
//! and clients written for it read and send them unchanged, plus the bodies of the extension
//! endpoints under `ext/`.

use std::collections::BTreeMap;

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
    /// ext-vmm extension, with `ondemand` only: the unix socket of a `vhost-user-mem serve`
    /// page server that serves the restored memory's faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_server: Option<String>,
}

/// Body of `PUT /api/v1/ext/vm.identity`: the identity a clone takes before it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmIdentityConfig {
    /// The new VM generation ID, 32 hex digits (dashes allowed); absent: a fresh random one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vmgenid: Option<String>,
}

/// Body of `GET` and `PUT /api/v1/ext/vm.identity`: the VM's identity now.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmIdentity {
    /// The VM generation ID the guest sees (ACPI VMGenID), 32 lower-case hex digits.
    pub vmgenid: String,
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

/// Body of `PUT /api/v1/ext/perm.create-view`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermCreateView {
    /// New view id (view 0 always exists).
    pub view: u16,
    /// Permissions of every page not set explicitly, as `"rwx"`, `"r-x"`, `"---"`...
    pub default_permissions: String,
}

/// Body of `PUT /api/v1/ext/perm.set`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermSet {
    /// The view to change.
    pub view: u16,
    /// Page-aligned guest-physical start address.
    pub gpa: u64,
    /// Page-aligned size in bytes.
    pub size: u64,
    /// New permissions, e.g. `"r-x"`.
    pub permissions: String,
}

/// Body of `PUT /api/v1/ext/perm.assign`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermAssign {
    /// vCPU index.
    pub vcpu: u32,
    /// Its new view.
    pub view: u16,
}
