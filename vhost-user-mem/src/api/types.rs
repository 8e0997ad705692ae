//! The JSON bodies of the control API, as `openapi.yaml` documents them. Requests refuse
//! unknown fields; responses keep their fields in declaration order.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `GET /api/v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusResponse {
    /// Whether a frontend is connected now.
    pub connected: bool,
    /// Features offered and negotiated.
    pub features: FeatureStatus,
    /// The balloon target (`num_pages`), in 4 KiB pages.
    pub target_pages: u32,
    /// Pages the guest says the balloon holds (`actual`, written by the guest).
    pub actual_pages: u32,
    /// Pages in the invalid-page map now (inflated and not deflated).
    pub invalid_pages: u64,
    /// Bytes that entered the invalid-page map by inflation since the daemon started.
    pub bytes_inflated: u64,
    /// Bytes that left it by deflation since the daemon started.
    pub bytes_deflated: u64,
    /// Bytes the guest reported free since the daemon started.
    pub bytes_reported: u64,
    /// Bytes punched out of guest memory files (inflate and reporting).
    pub bytes_punched: u64,
    /// Guest requests refused for bad input.
    pub refused_requests: u64,
    /// Holes the system refused to punch.
    pub punch_errors: u64,
    /// Stats buffers received.
    pub stats_updates: u64,
    /// Bytes the host has allocated for guest memory files; `None` without a memory table.
    pub allocated_bytes: Option<u64>,
    /// Size of guest memory in the current memory table; `None` without one.
    pub guest_memory_bytes: Option<u64>,
}

/// Feature bits: what the daemon offers, what the driver acknowledged, and the balloon
/// features that decoded from the acknowledged bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureStatus {
    /// Virtio feature bits the daemon offers (device, transport and vhost-user bits).
    pub offered: u64,
    /// Feature bits the driver acknowledged on the latest connection (0 before any).
    pub acked: u64,
    /// `VIRTIO_BALLOON_F_STATS_VQ` acknowledged.
    pub stats: bool,
    /// `VIRTIO_BALLOON_F_DEFLATE_ON_OOM` acknowledged.
    pub deflate_on_oom: bool,
    /// `VIRTIO_BALLOON_F_REPORTING` acknowledged.
    pub reporting: bool,
}

/// `PUT /api/v1/resize`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeRequest {
    /// The new balloon target in bytes, a multiple of 4096.
    pub target_bytes: u64,
}

/// `GET /api/v1/stats`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsResponse {
    /// When the latest stats buffer arrived, milliseconds since the Unix epoch; `None` before
    /// the first.
    pub received_at_unix_ms: Option<u64>,
    /// Stats buffers received since the daemon started.
    pub updates: u64,
    /// Whether this request asked the guest for fresh stats (the device held its buffer and
    /// gave it back); the answer arrives in a later `GET`.
    pub refresh_requested: bool,
    /// The latest value of each statistic, by tag.
    pub stats: Vec<Statistic>,
}

/// One guest statistic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statistic {
    /// `VIRTIO_BALLOON_S_*` tag.
    pub tag: u16,
    /// The tag's name as Linux names it (`free-memory`, ...); `None` for a tag not known here.
    pub name: Option<String>,
    /// The value (bytes for the memory statistics, counts for the others).
    pub value: u64,
}

/// `GET /api/v1/invalid-pages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvalidPagesResponse {
    /// Page size the gfns count in (4096).
    pub page_size: u64,
    /// Pages in the map.
    pub pages: u64,
    /// The map as runs of consecutive gfns, ascending.
    pub ranges: Vec<GfnRange>,
}

/// Consecutive guest frame numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GfnRange {
    /// First gfn (guest physical address / 4096).
    pub gfn: u64,
    /// Number of frames.
    pub count: u64,
}

/// `PUT /api/v1/snapshot`: exactly one of the two fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// `file://` followed by the absolute path of the snapshot file (not percent-decoded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_url: Option<String>,
    /// The absolute path of the snapshot file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
}

/// The answer to `PUT /api/v1/snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotResponse {
    /// Where the snapshot is.
    pub path: PathBuf,
    /// The snapshot's identity, 32 hex digits.
    pub id: String,
    /// Length of the snapshot file.
    pub bytes_written: u64,
    /// Guest pages of each type.
    pub pages: PageCounts,
    /// Time the write took, milliseconds.
    pub duration_ms: u64,
}

/// Guest pages by ext-snapshot page type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCounts {
    /// Never populated on the host (holes: never written, reported, or punched).
    pub not_populated: u64,
    /// Ballooned by the guest (in the invalid-page map).
    pub invalid: u64,
    /// Populated and all zero.
    pub zero: u64,
    /// Stored with their bytes.
    pub data: u64,
}

/// `PUT /api/v1/page-server`: exactly one of `snapshot` and `snapshot_url`, as the snapshot
/// endpoint names its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PageServerRequest {
    /// The absolute path of the ext-snapshot file to serve (a full snapshot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<PathBuf>,
    /// `file://` followed by the absolute path of the snapshot file (not percent-decoded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_url: Option<String>,
    /// The absolute path of the unix socket restoring VMMs connect to (mode 0600; a stale
    /// socket there is replaced, a live one refused).
    pub socket: PathBuf,
    /// Copy every data page in the background too, not only on fault (default `false`).
    #[serde(default)]
    pub prefault: bool,
}

/// `GET /api/v1/page-server`, and the answer to `PUT`: the page server running in the daemon,
/// or `running: false` and nulls when none is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageServerStatus {
    /// Whether a page server accepts restoring VMMs now.
    pub running: bool,
    /// The snapshot file it serves.
    pub snapshot: Option<PathBuf>,
    /// The socket it listens on.
    pub socket: Option<PathBuf>,
    /// Whether it copies data pages in the background.
    pub prefault: bool,
    /// The identity of the snapshot served, 32 hex digits (what a VMM's hello may name).
    pub snapshot_id: Option<String>,
    /// Data pages in the snapshot.
    pub data_pages: Option<u64>,
    /// When it started, milliseconds since the Unix epoch.
    pub started_at_unix_ms: Option<u64>,
    /// Connections, sessions and pages served so far.
    pub counters: Option<crate::page_server::ServerCounters>,
}
