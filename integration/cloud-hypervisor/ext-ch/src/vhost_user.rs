//! The invalid-page maps of vhost-user backends that keep one (vhost-user-mem's balloon).
//!
//! A `--generic-vhost-user ...,control_socket=<path>` device names its backend's control API
//! ([`register`]); `vm.snapshot` asks every registered backend for the pages its balloon holds
//! ([`invalid_pages`]) and types them `Invalid`. The VM is paused then, so the guest inflates
//! nothing meanwhile. A backend that does not answer costs only the typing: the daemon punched
//! its inflated pages out of the memfd, so the writer finds them never populated.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::GfnSet;

static SOCKETS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Remembers `control_socket` as a backend to ask at the next snapshots (once per path).
pub fn register(control_socket: &Path) {
    let mut sockets = SOCKETS.lock().unwrap_or_else(PoisonError::into_inner);
    if !sockets.iter().any(|s| s == control_socket) {
        sockets.push(control_socket.to_owned());
    }
}

/// The union of the registered backends' invalid-page maps, and one message per backend
/// that did not answer with one.
pub fn invalid_pages() -> (GfnSet, Vec<String>) {
    let sockets = SOCKETS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let mut set = GfnSet::new();
    let mut failures = Vec::new();
    for socket in sockets {
        match ext_vmm_api::backend::fetch_invalid_pages(&socket) {
            Ok(ranges) => {
                for (first, count) in ranges {
                    set.insert_range(first, count);
                }
            }
            Err(e) => failures.push(format!("invalid pages from {}: {e}", socket.display())),
        }
    }
    (set, failures)
}
