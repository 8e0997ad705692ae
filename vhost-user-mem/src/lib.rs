//! Out-of-process guest memory backend speaking vhost-user.
//!
//! `vhost-user-mem` is a daemon that receives the guest memory table from a vhost-user
//! frontend (Cloud Hypervisor's `--generic-vhost-user device_type=balloon`, later `ext-vmm`)
//! and runs a virtio-balloon device (virtio 1.2 §5.5) with statistics, deflate-on-OOM and free
//! page reporting. Inflated pages and reported ranges are punched out of the guest memory file,
//! so the host really gets the memory back; inflated pages are kept in an invalid-page map that
//! snapshot writers (`ext-snapshot`) take as their `Invalid` page set.
//!
//! Layout, as in rust-vmm's vhost-device crates:
//! - [`balloon`]: the device logic over a virtqueue and guest memory, no vhost types;
//! - [`memory`]: guest ranges against the memory table, hole punching;
//! - [`invalid_pages`]: the invalid-page map;
//! - [`backend`]: `VhostUserBackendMut` for the balloon;
//! - [`daemon`]: the serve loop that listens again after each frontend disconnect;
//! - [`api`]: the control API (HTTP/JSON on its own unix socket, `openapi.yaml`): status,
//!   resize, stats, the invalid-page map, snapshots;
//! - [`snapshot`]: ext-snapshot files of guest memory written by the daemon, inflated pages
//!   typed `Invalid`;
//! - [`page_server`]: the lazy page server (`serve --snapshot`) and its VMM-side client;
//! - the `vhost-user-mem` binary: arguments into a [`daemon::DaemonConfig`], then the loop.
//!
//! Not here yet: the lazy page server (see the README).

pub mod api;
pub mod backend;
pub mod balloon;
pub mod config_change;
pub mod daemon;
pub mod error;
pub mod invalid_pages;
pub mod memory;
pub mod page_server;
pub mod snapshot;

pub use backend::{BalloonBackend, SharedBackend};
pub use daemon::{Daemon, DaemonConfig};
pub use error::{Error, Result};
