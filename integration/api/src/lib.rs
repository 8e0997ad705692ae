//! The REST API of `ext-vmm`: Cloud Hypervisor's `/api/v1` endpoints and bodies on a unix
//! socket, byte for byte in the wire format of micro_http (Cloud Hypervisor's HTTP server), so
//! Cloud Hypervisor's own `ch-remote` drives ext-vmm; plus extension endpoints under `ext/`.
//!
//! This crate knows no KVM and no guest memory: it parses requests into one enum,
//! [`ApiRequest`], hands each to the VMM's [`RequestHandler`], and writes the answer; errors are
//! [`ApiError`]s whose [`ErrorKind`] decides the status in one table. The paths, bodies and
//! errors are documented in `integration/openapi/ext-vmm.yaml` (a test checks the route table
//! against it).
//!
//! - [`start_api_server`] serves a handler on a socket (mode 0600) until
//!   [`ApiServer::shutdown`] or drop; the server answers only after the handler returns, so a
//!   handler for `vmm.shutdown` should signal the VMM's main thread rather than exit.
//! - [`ApiClient`] is the matching client (one keep-alive connection), used by `ext-remote`
//!   and the tests.
//!
//! Modules: `types` and `vm_config` (bodies), `action` (the request enum and the handler
//! trait), `error` (the status table), `routes` (method + path → request), `http` (one
//! connection's wire format), `server` (socket, threads, limits), `client`.

pub mod action;
pub mod backend;
pub mod client;
pub mod error;
mod http;
mod routes;
mod server;
pub mod types;
pub mod vm_config;

pub use action::{ApiRequest, ApiResponse, RequestHandler};
pub use client::{endpoint_path, ApiClient, ApiClientError, ApiResponse as ClientResponse};
pub use error::{ApiError, ErrorKind};
pub use server::{
    start_api_server, start_api_server_with_limits, ApiServer, ApiServerError, ApiServerLimits,
};
pub use types::{
    PermAssign, PermCapabilities, PermCreateView, PermSet, VmCounters, VmIdentity,
    VmIdentityConfig, VmInfo, VmRestoreConfig, VmSnapshotConfig, VmState, VmmPingResponse,
};
pub use vm_config::{DiskSpec, OutputMode, VhostUserSpec, VmCreateConfig};
