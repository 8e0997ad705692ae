//! The invalid-page map of vhost-user backends that keep one (vhost-user-mem's balloon), for
//! snapshots: pages the guest inflated are typed `Invalid` (recorded by type, never by data).
//!
//! A `--generic-vhost-user` device with `control_socket=<path>` names the backend's control
//! API; a snapshot asks it `GET /api/v1/invalid-pages`, which answers
//! `{"page_size": 4096, "ranges": [{"gfn": <first>, "count": <n>}, ...]}`. The VM is paused,
//! so the guest inflates nothing meanwhile. A backend that does not answer costs only the
//! typing: its inflated pages are holes in the memfd, which the writer records as
//! never-populated.

use std::path::Path;

use serde::Deserialize;

use ext_vmm_api::ApiClient;
use vhost_user_mem::invalid_pages::InvalidPages;

use crate::virtio::vhost_user::VhostUserConfig;

#[derive(Deserialize)]
struct InvalidPageRanges {
    page_size: u64,
    ranges: Vec<GfnRange>,
}

#[derive(Deserialize)]
struct GfnRange {
    gfn: u64,
    count: u64,
}

/// Largest map accepted from a backend (1 TiB of 4 KiB frames), so a confused backend cannot
/// make the VMM allocate without bound.
const MAX_GFN: u64 = 1 << 28;

/// The union of the invalid-page maps of every device with a control socket (its
/// `gfn_words()` are what ext-snapshot's `GfnBitmap` takes); `None` when no device has one or
/// none answered.
pub fn fetch(devices: &[VhostUserConfig]) -> Option<InvalidPages> {
    let mut union: Option<InvalidPages> = None;
    for socket in devices.iter().filter_map(|d| d.control_socket.as_deref()) {
        match fetch_one(socket) {
            Ok(map) => {
                let union = union.get_or_insert_with(InvalidPages::new);
                for range in map.ranges {
                    for gfn in range.gfn..range.gfn.saturating_add(range.count) {
                        union.insert(gfn);
                    }
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

fn fetch_one(socket: &Path) -> Result<InvalidPageRanges, String> {
    let mut client = ApiClient::connect(socket).map_err(|e| e.to_string())?;
    let response = client
        .request("GET", "invalid-pages", None)
        .map_err(|e| e.to_string())?;
    if !response.is_success() {
        return Err(format!(
            "status {}: {}",
            response.status,
            response.body_text()
        ));
    }
    let map: InvalidPageRanges =
        serde_json::from_slice(&response.body).map_err(|e| format!("bad answer: {e}"))?;
    if map.page_size != 4096 {
        return Err(format!("page size {} (4096 expected)", map.page_size));
    }
    if let Some(bad) = map
        .ranges
        .iter()
        .find(|r| r.gfn.checked_add(r.count).is_none_or(|end| end > MAX_GFN))
    {
        return Err(format!(
            "range at gfn {} of {} pages is out of bounds",
            bad.gfn, bad.count
        ));
    }
    Ok(map)
}
