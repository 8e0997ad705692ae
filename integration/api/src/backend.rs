//! What a VMM asks a vhost-user backend's own control API: the invalid-page map of
//! vhost-user-mem's balloon (`GET /api/v1/invalid-pages`), which snapshot writers type
//! `Invalid`. ext-vmm and the patched Cloud Hypervisor (through ext-ch) both read it here.
//!
//! The answer is `{"page_size": 4096, "ranges": [{"gfn": <first>, "count": <n>}, ...]}`.

use std::path::Path;

use serde::Deserialize;

use crate::client::ApiClient;

/// Largest frame number accepted from a backend (1 TiB of 4 KiB frames), so a confused
/// backend cannot make the VMM allocate without bound.
pub const MAX_GFN: u64 = 1 << 28;

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

/// The invalid-page map of the backend whose control API listens on `socket`, as
/// `(first gfn, count)` ranges of 4 KiB frames. `Err` names what went wrong: no answer, an
/// error status, an undecodable body, another page size, a range past [`MAX_GFN`].
pub fn fetch_invalid_pages(socket: &Path) -> Result<Vec<(u64, u64)>, String> {
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
    Ok(map.ranges.into_iter().map(|r| (r.gfn, r.count)).collect())
}
