//! The control surface a REST layer exposes: serde request and response bodies, and a
//! trait object the VMM can hold without knowing the backend or memory types.
//!
//! Suggested endpoints (ext-vmm's OpenAPI file is the authority):
//!
//! | method and path                         | body                   | response             |
//! |-----------------------------------------|------------------------|----------------------|
//! | `PUT /api/v1/vm.perm.create-view`       | [`CreateViewRequest`]  | 204                  |
//! | `PUT /api/v1/vm.perm.set-permissions`   | [`SetPermissionsRequest`] | 204               |
//! | `PUT /api/v1/vm.perm.assign-view`       | [`AssignViewRequest`]  | 204                  |
//! | `GET /api/v1/vm.perm.violations?since=N`| —                      | [`EventsResponse`]   |
//! | `GET /api/v1/vm.perm.capabilities`      | —                      | [`BackendInfo`]      |

use serde::{Deserialize, Serialize};
use vm_memory::GuestMemory;

use crate::backend::EnforcementBackend;
use crate::error::{Error, Result};
use crate::manager::PermissionManager;
use crate::permissions::{Permissions, PAGE_SIZE};
use crate::report::{PermissionEvent, PermissionStats};
use crate::table::ViewId;

/// Body of "create a view".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateViewRequest {
    /// New view id (0 exists already).
    pub view: ViewId,
    /// Permissions of every gfn not set explicitly, e.g. `"rwx"`.
    pub default_permissions: Permissions,
}

/// Body of "set permissions on a GPA range for a view".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetPermissionsRequest {
    /// The view to change.
    pub view: ViewId,
    /// Page-aligned guest-physical start address.
    pub gpa: u64,
    /// Page-aligned size in bytes.
    pub size: u64,
    /// New permissions, e.g. `"r-x"`.
    pub permissions: Permissions,
}

/// Body of "assign a vCPU to a view".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssignViewRequest {
    /// vCPU index.
    pub vcpu: u32,
    /// Its new view.
    pub view: ViewId,
}

/// Response of "read violation reports".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventsResponse {
    /// Retained events with `sequence >= since`, oldest first.
    pub events: Vec<PermissionEvent>,
    /// Sequence number to pass as `since` next time.
    pub next: u64,
    /// Counters.
    pub stats: PermissionStats,
}

/// Response of "capabilities".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendInfo {
    /// Backend name.
    pub backend: String,
    /// Whether views are enforced per vCPU without exits.
    pub per_vcpu_views: bool,
}

/// What the REST layer calls; implemented by every [`PermissionManager`].
pub trait PermissionControl: Send + Sync {
    /// Creates a view.
    fn create_view(&self, request: &CreateViewRequest) -> Result<()>;
    /// Sets permissions on a GPA range of a view.
    fn set_permissions(&self, request: &SetPermissionsRequest) -> Result<()>;
    /// Assigns a vCPU to a view.
    fn assign_view(&self, request: &AssignViewRequest) -> Result<()>;
    /// Events since a sequence number.
    fn events(&self, since: u64) -> EventsResponse;
    /// Backend description.
    fn backend_info(&self) -> BackendInfo;
}

impl<B: EnforcementBackend, M: GuestMemory + Send + Sync> PermissionControl
    for PermissionManager<B, M>
{
    fn create_view(&self, request: &CreateViewRequest) -> Result<()> {
        PermissionManager::create_view(self, request.view, request.default_permissions)
    }

    fn set_permissions(&self, request: &SetPermissionsRequest) -> Result<()> {
        let (gpa, size) = (request.gpa, request.size);
        if gpa % PAGE_SIZE != 0 || size % PAGE_SIZE != 0 || size == 0 {
            return Err(Error::Unaligned { gpa, size });
        }
        let end = gpa
            .checked_add(size)
            .ok_or(Error::Unaligned { gpa, size })?;
        PermissionManager::set_permissions(
            self,
            request.view,
            gpa / PAGE_SIZE..end / PAGE_SIZE,
            request.permissions,
        )
    }

    fn assign_view(&self, request: &AssignViewRequest) -> Result<()> {
        self.assign_vcpu(request.vcpu, request.view)
    }

    fn events(&self, since: u64) -> EventsResponse {
        let events = self.events_since(since);
        let next = events.last().map_or(since, |e| e.sequence() + 1);
        EventsResponse {
            events,
            next,
            stats: self.stats(),
        }
    }

    fn backend_info(&self) -> BackendInfo {
        self.with_backend(|b| BackendInfo {
            backend: b.name().to_string(),
            per_vcpu_views: b.per_vcpu_views(),
        })
    }
}
