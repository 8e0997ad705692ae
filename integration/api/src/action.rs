//! Every request the API accepts, as one enum: the server parses a request into an
//! [`ApiRequest`], the VMM's [`RequestHandler`] answers it. Adding an endpoint is a variant,
//! a line in the route table and a match arm in the VMM, not a method forwarded through
//! every layer.

use serde::Serialize;

use crate::error::ApiError;
use crate::types::{
    PermAssign, PermCreateView, PermSet, VmIdentityConfig, VmRestoreConfig, VmSnapshotConfig,
};
use crate::vm_config::VmCreateConfig;

/// One API request, parsed and checked.
#[derive(Clone, Debug, PartialEq)]
pub enum ApiRequest {
    /// `GET vmm.ping`.
    VmmPing,
    /// `PUT vmm.shutdown`: stop the VM if any, then end the VMM process.
    VmmShutdown,
    /// `PUT vm.create`: build a VM from a Cloud Hypervisor `VmConfig` (state `Created`).
    VmCreate(Box<VmCreateConfig>),
    /// `PUT vm.boot`: start the created VM's vCPUs.
    VmBoot,
    /// `PUT vm.delete`: stop the VM if it runs and forget it.
    VmDelete,
    /// `PUT vm.reboot`: stop the VM and boot a fresh one from the same configuration.
    VmReboot,
    /// `PUT vm.power-button`: press the ACPI power button (the guest decides what to do).
    VmPowerButton,
    /// `GET vm.info`.
    VmInfo,
    /// `PUT vm.pause`.
    VmPause,
    /// `PUT vm.resume`.
    VmResume,
    /// `PUT vm.shutdown`: stop the VM; the VMM keeps serving.
    VmShutdown,
    /// `GET vm.counters`.
    VmCounters,
    /// `PUT vm.snapshot`.
    VmSnapshot(VmSnapshotConfig),
    /// `PUT vm.restore`: build the VM from a snapshot (only into a VMM without a VM).
    VmRestore(VmRestoreConfig),
    /// `GET ext/vm.identity`.
    VmIdentity,
    /// `PUT ext/vm.identity`: give the VM a new identity (a clone, before it runs).
    VmSetIdentity(VmIdentityConfig),
    /// `PUT ext/perm.create-view`.
    PermCreateView(PermCreateView),
    /// `PUT ext/perm.set`.
    PermSet(PermSet),
    /// `PUT ext/perm.assign`.
    PermAssign(PermAssign),
    /// `GET ext/perm.violations`.
    PermViolations,
    /// `GET ext/perm.capabilities`.
    PermCapabilities,
}

/// A successful answer: `204` without a body, or `200` with a JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiResponse {
    /// `204 No Content`.
    Empty,
    /// `200 OK` with this JSON body, already serialized: fields stay in the order the
    /// response type declares them (a `serde_json::Value` would sort them), as Cloud
    /// Hypervisor's bodies have them.
    Json(Vec<u8>),
}

impl ApiResponse {
    /// A `200` whose body is `value` serialized.
    pub fn json<T: Serialize>(value: &T) -> Result<Self, ApiError> {
        serde_json::to_vec(value)
            .map(ApiResponse::Json)
            .map_err(|e| ApiError::internal(format!("cannot encode the response: {e}")))
    }
}

/// What the VMM gives the API server: one method that answers every request. Called from the
/// server's threads one request at a time; state changes (pause, resume, shutdown) complete
/// before it returns.
pub trait RequestHandler: Send + Sync + 'static {
    /// Answers `request`.
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError>;
}
