//! Cloud-Hypervisor-compatible REST API served on a unix socket.

pub mod backend;

pub use backend::{ApiError, VmCounters, VmInfo, VmState, VmmBackend, VmmPingResponse};
