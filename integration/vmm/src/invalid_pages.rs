//! The invalid-page map of vhost-user backends that keep one (vhost-user-mem's balloon), for
//! snapshots: pages the guest inflated are typed `Invalid` (recorded by type, never by data).
//!
//! A `--generic-vhost-user` device with `control_socket=<path>` names the backend's control
//! API; a snapshot asks it `GET /api/v1/invalid-pages`, which answers
//! `{"page_size": 4096, "ranges": [{"gfn": <first>, "count": <n>}, ...]}`. The VM is paused,
//! so the guest inflates nothing meanwhile. A backend that does not answer costs only the
//! typing: its inflated pages are holes in the memfd, which the writer records as
//! never-populated.

use vhost_user_mem::invalid_pages::InvalidPages;

use crate::virtio::vhost_user::VhostUserConfig;

/// The union of the invalid-page maps of every device with a control socket (its
/// `gfn_words()` are what ext-snapshot's `GfnBitmap` takes); `None` when no device has one or
/// none answered.
pub fn fetch(devices: &[VhostUserConfig]) -> Option<InvalidPages> {
    let mut union: Option<InvalidPages> = None;
    for socket in devices.iter().filter_map(|d| d.control_socket.as_deref()) {
        match ext_vmm_api::backend::fetch_invalid_pages(socket) {
            Ok(ranges) => {
                let union = union.get_or_insert_with(InvalidPages::new);
                for (first, count) in ranges {
                    union.insert_range(first, count);
                }
            }
            Err(e) => tracing::warn!(
                "invalid pages from {}: {e}; inflated pages are typed by residency",
                socket.display()
            ),
        }
    }
    union
}
