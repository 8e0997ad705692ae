//! Cloud-Hypervisor-compatible REST API served on a unix socket.
//!
//! The VMM starts the server with [`start_api_server`] (or [`start_api_server_with_limits`]),
//! handing it an `Arc<dyn VmmBackend>`; the returned [`ApiServer`] stops the server and
//! removes the socket on [`ApiServer::shutdown`] or drop. Requests are HTTP/1.1 on the socket,
//! under `/api/v1/` with Cloud Hypervisor's paths and bodies (see
//! `integration/openapi/ext-vmm.yaml`): `GET vmm.ping`, `PUT vmm.shutdown`, `GET vm.info`,
//! `PUT vm.pause`, `PUT vm.resume`, `PUT vm.shutdown`, `GET vm.counters`, `PUT vm.snapshot`.
//! Errors are a 4xx/5xx status with a JSON array of strings, outermost message first.
//!
//! The server writes a response only after the backend method returns, so
//! [`VmmBackend::vmm_shutdown`] should signal the VMM's main thread to exit (which then calls
//! [`ApiServer::shutdown`]) rather than exit the process itself, or the client never gets
//! its `204`.
//!
//! [`ApiClient`] is the matching client (one connection, keep-alive), used by `ext-remote`
//! and the tests.
//!
//! Layout: `backend` (the VMM boundary), `routes` (endpoint table), `http` (wire format of
//! one connection), `server` (socket, threads, limits), `client`.

pub mod backend;
pub mod client;
mod http;
mod routes;
mod server;

pub use backend::{
    ApiError, PermCapabilities, VmCounters, VmInfo, VmRestoreConfig, VmSnapshotConfig, VmState,
    VmmBackend, VmmPingResponse,
};
pub use client::{endpoint_path, ApiClient, ApiClientError, ApiResponse};
pub use server::{
    start_api_server, start_api_server_with_limits, ApiServer, ApiServerError, ApiServerLimits,
};
