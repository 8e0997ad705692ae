//! The route table and the endpoint handlers: which method and path run which handler, and
//! what each answers. Keep [`ROUTES`] and `openapi.yaml` in step (a test checks).
//!
//! Handlers take the backend lock only to copy what they need (or to call `resize` and
//! `request_stats`), then work without it: a slow client or a long snapshot never holds up
//! the vhost-user side.

use std::path::PathBuf;
use std::sync::{PoisonError, RwLockReadGuard};
use std::time::UNIX_EPOCH;

use serde::de::DeserializeOwned;
use serde::Serialize;
use vhost_user_backend::VhostUserBackendMut;
use vm_memory::{GuestMemory, GuestMemoryRegion};

use super::http::Response;
use super::types::{
    FeatureStatus, GfnRange, InvalidPagesResponse, PageCounts, ResizeRequest, SnapshotRequest,
    SnapshotResponse, Statistic, StatsResponse, StatusResponse,
};
use super::ApiContext;
use crate::backend::{lock, BalloonBackend, SharedBackend};
use crate::balloon::{
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_REPORTING, VIRTIO_BALLOON_F_STATS_VQ,
};
use crate::error::Error;
use crate::memory::{self, PAGE_SIZE};
use crate::snapshot::{self, SnapshotSource};

mod page_server;
pub(crate) use page_server::PageServerSlot;

/// Every endpoint is below this prefix.
pub(crate) const PREFIX: &str = "/api/v1/";

/// What a handler answers when it succeeds.
enum Reply {
    /// `204`.
    Done,
    /// `200` with this JSON.
    Json(Vec<u8>),
}

/// A refusal: a status and messages, outermost first.
#[derive(Debug)]
struct Refusal {
    status: u16,
    messages: Vec<String>,
}

impl Refusal {
    fn new(status: u16, message: impl Into<String>) -> Self {
        Refusal {
            status,
            messages: vec![message.into()],
        }
    }

    /// The crate error and its causes, with the status its kind deserves: 409 for a state
    /// that forbids the request, 400 for what the client asked wrongly, 500 for the rest.
    fn from_error(error: &Error) -> Self {
        let status = match error {
            Error::NoMemoryTable => 409,
            Error::SnapshotDestination { .. } => 400,
            _ => 500,
        };
        Refusal {
            status,
            messages: error_chain(error),
        }
    }
}

/// An error's text, then its causes'.
fn error_chain(error: &dyn std::error::Error) -> Vec<String> {
    let mut messages = vec![error.to_string()];
    let mut cause = error.source();
    while let Some(e) = cause {
        messages.push(e.to_string());
        cause = e.source();
    }
    messages
}

type Handler = fn(&ApiContext, &[u8]) -> Result<Reply, Refusal>;

/// One endpoint.
struct Route {
    method: &'static str,
    /// Below [`PREFIX`].
    path: &'static str,
    /// Whether the request carries a JSON body (required) or none (refused).
    json_body: bool,
    handler: Handler,
}

/// The API.
const ROUTES: &[Route] = &[
    Route {
        method: "GET",
        path: "status",
        json_body: false,
        handler: status,
    },
    Route {
        method: "PUT",
        path: "resize",
        json_body: true,
        handler: resize,
    },
    Route {
        method: "GET",
        path: "stats",
        json_body: false,
        handler: stats,
    },
    Route {
        method: "GET",
        path: "invalid-pages",
        json_body: false,
        handler: invalid_pages,
    },
    Route {
        method: "PUT",
        path: "snapshot",
        json_body: true,
        handler: snapshot,
    },
    Route {
        method: "GET",
        path: "page-server",
        json_body: false,
        handler: page_server::status,
    },
    Route {
        method: "PUT",
        path: "page-server",
        json_body: true,
        handler: page_server::start,
    },
    Route {
        method: "DELETE",
        path: "page-server",
        json_body: false,
        handler: page_server::stop,
    },
];

/// Answers one request.
pub(crate) fn dispatch(context: &ApiContext, method: &str, path: &str, body: &[u8]) -> Response {
    let endpoint = path.strip_prefix(PREFIX).unwrap_or_default();
    let matching: Vec<&Route> = ROUTES.iter().filter(|r| r.path == endpoint).collect();
    if matching.is_empty() {
        return Response::failure(
            404,
            &[format!("no endpoint {path}; the API is under {PREFIX}")],
        );
    }
    let Some(route) = matching.iter().find(|r| r.method == method) else {
        let allowed = matching
            .iter()
            .map(|r| r.method)
            .collect::<Vec<_>>()
            .join(", ");
        let mut response = Response::failure(
            405,
            &[format!("{method} is not allowed on {path}: use {allowed}")],
        );
        response.allow = Some(allowed);
        return response;
    };
    let outcome = match (route.json_body, body.is_empty()) {
        (true, true) => Err(Refusal::new(400, format!("{path} needs a JSON body"))),
        (false, false) => Err(Refusal::new(400, format!("{path} takes no body"))),
        _ => (route.handler)(context, body),
    };
    match outcome {
        Ok(Reply::Done) => Response::empty(),
        Ok(Reply::Json(json)) => Response::with_json(200, json),
        Err(refusal) => Response::failure(refusal.status, &refusal.messages),
    }
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(body).map_err(|e| Refusal {
        status: 400,
        messages: vec!["invalid JSON request body".into(), e.to_string()],
    })
}

fn json<T: Serialize>(value: &T) -> Result<Reply, Refusal> {
    serde_json::to_vec(value)
        .map(Reply::Json)
        .map_err(|e| Refusal::new(500, format!("cannot encode the answer: {e}")))
}

/// Reads the backend; a panic elsewhere does not make its state unreadable.
fn read(backend: &SharedBackend) -> RwLockReadGuard<'_, BalloonBackend> {
    backend.read().unwrap_or_else(PoisonError::into_inner)
}

fn status(context: &ApiContext, _body: &[u8]) -> Result<Reply, Refusal> {
    let (balloon_state, offered, memory) = {
        let backend = read(&context.backend);
        let balloon = backend.balloon();
        let state = (
            balloon.counters(),
            balloon.target_pages(),
            balloon.actual_pages(),
            balloon.acked_features(),
            balloon.invalid_pages().len(),
        );
        (state, backend.features(), backend.guest_memory())
    };
    let (counters, target_pages, actual_pages, acked, invalid_pages) = balloon_state;
    let allocated_bytes = memory
        .as_deref()
        .map(memory::allocated_bytes)
        .transpose()
        .map_err(|e| Refusal {
            status: 500,
            messages: vec!["cannot read the guest memory files".into(), e.to_string()],
        })?;
    let acked_bit = |bit: u32| acked & (1 << bit) != 0;
    json(&StatusResponse {
        connected: context.connected(),
        features: FeatureStatus {
            offered,
            acked,
            stats: acked_bit(VIRTIO_BALLOON_F_STATS_VQ),
            deflate_on_oom: acked_bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM),
            reporting: acked_bit(VIRTIO_BALLOON_F_REPORTING),
        },
        target_pages,
        actual_pages,
        invalid_pages,
        bytes_inflated: counters.inflated_pages * PAGE_SIZE,
        bytes_deflated: counters.deflated_pages * PAGE_SIZE,
        bytes_reported: counters.reported_bytes,
        bytes_punched: counters.punched_bytes,
        refused_requests: counters.refused_requests,
        punch_errors: counters.punch_errors,
        stats_updates: counters.stats_updates,
        allocated_bytes,
        guest_memory_bytes: memory.map(|m| m.iter().map(|r| r.len()).sum()),
    })
}

fn resize(context: &ApiContext, body: &[u8]) -> Result<Reply, Refusal> {
    let ResizeRequest { target_bytes } = parse(body)?;
    if target_bytes % PAGE_SIZE != 0 {
        return Err(Refusal::new(
            400,
            format!("target_bytes {target_bytes} is not a multiple of {PAGE_SIZE}"),
        ));
    }
    let pages = u32::try_from(target_bytes / PAGE_SIZE).map_err(|_| {
        Refusal::new(
            400,
            format!("target_bytes {target_bytes} is over the balloon's 2^32 pages"),
        )
    })?;
    let mut backend = lock(&context.backend);
    let memory_bytes: Option<u64> = backend
        .guest_memory()
        .map(|m| m.iter().map(|r| r.len()).sum());
    if let Some(limit) = memory_bytes.filter(|&limit| target_bytes > limit) {
        return Err(Refusal::new(
            400,
            format!("target_bytes {target_bytes} is over the guest's {limit} bytes of memory"),
        ));
    }
    let told = backend.resize(pages);
    drop(backend);
    tracing::info!(
        target_bytes,
        told_the_guest = told,
        "balloon resized by the API"
    );
    Ok(Reply::Done)
}

/// Names of the `VIRTIO_BALLOON_S_*` tags, by tag: virtio 1.2 §5.5.6.3 defines 0 to 9; the
/// rest are Linux's (`include/uapi/linux/virtio_balloon.h`), with Linux's names.
const STAT_NAMES: [&str; 16] = [
    "swap-in",
    "swap-out",
    "major-faults",
    "minor-faults",
    "free-memory",
    "total-memory",
    "available-memory",
    "disk-caches",
    "hugetlb-allocations",
    "hugetlb-failures",
    "oom-kills",
    "alloc-stalls",
    "async-scans",
    "direct-scans",
    "async-reclaims",
    "direct-reclaims",
];

fn stats(context: &ApiContext, _body: &[u8]) -> Result<Reply, Refusal> {
    let (values, received_at, updates) = {
        let backend = read(&context.backend);
        let balloon = backend.balloon();
        (
            balloon.stats().clone(),
            balloon.stats_received_at(),
            balloon.counters().stats_updates,
        )
    };
    // Returning the held buffer asks the guest for fresh values, answered by a later GET.
    let refresh_requested = lock(&context.backend).request_stats().unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot ask the guest for fresh stats");
        false
    });
    json(&StatsResponse {
        received_at_unix_ms: received_at
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        updates,
        refresh_requested,
        stats: values
            .into_iter()
            .map(|(tag, value)| Statistic {
                tag,
                name: STAT_NAMES.get(usize::from(tag)).map(|n| n.to_string()),
                value,
            })
            .collect(),
    })
}

fn invalid_pages(context: &ApiContext, _body: &[u8]) -> Result<Reply, Refusal> {
    let ranges: Vec<GfnRange> = read(&context.backend)
        .balloon()
        .invalid_pages()
        .ranges()
        .into_iter()
        .map(|(gfn, count)| GfnRange { gfn, count })
        .collect();
    json(&InvalidPagesResponse {
        page_size: PAGE_SIZE,
        pages: ranges.iter().map(|r| r.count).sum(),
        ranges,
    })
}

fn snapshot(context: &ApiContext, body: &[u8]) -> Result<Reply, Refusal> {
    let request: SnapshotRequest = parse(body)?;
    let path = destination(request)?;
    snapshot::check_destination(&path).map_err(|e| Refusal::from_error(&e))?;
    // One snapshot at a time: two writers would share `<path>.tmp` names and the disk.
    let Ok(_only_one) = context.snapshot_running.try_lock() else {
        return Err(Refusal::new(409, "a snapshot is already being written"));
    };
    let source =
        SnapshotSource::capture(&read(&context.backend)).map_err(|e| Refusal::from_error(&e))?;
    let figures = source.write(&path).map_err(|e| Refusal::from_error(&e))?;
    let count = |t: ext_snapshot::PageType| figures.pages(t);
    tracing::info!(path = %path.display(), bytes = figures.bytes_written, "snapshot written");
    json(&SnapshotResponse {
        path: figures.path.clone(),
        id: figures.id.to_string(),
        bytes_written: figures.bytes_written,
        pages: PageCounts {
            not_populated: count(ext_snapshot::PageType::NotPopulated),
            invalid: count(ext_snapshot::PageType::Invalid),
            zero: count(ext_snapshot::PageType::Zero),
            data: count(ext_snapshot::PageType::Data),
        },
        duration_ms: u64::try_from(figures.duration.as_millis()).unwrap_or(u64::MAX),
    })
}

/// The file a snapshot request names: `destination_url` (`file://` + path) or `path`.
fn destination(request: SnapshotRequest) -> Result<PathBuf, Refusal> {
    named_file(
        ("destination_url", request.destination_url),
        ("path", request.path),
    )
}

/// The file a request names by exactly one of two fields, given as `(name, value)`: a
/// `file://` URL or a path.
fn named_file(
    (url_field, url): (&str, Option<String>),
    (path_field, path): (&str, Option<PathBuf>),
) -> Result<PathBuf, Refusal> {
    match (url, path) {
        (Some(url), None) => url
            .strip_prefix("file://")
            .map(PathBuf::from)
            .ok_or_else(|| Refusal::new(400, format!("{url_field} {url:?} is not a file:// URL"))),
        (None, Some(path)) => Ok(path),
        _ => Err(Refusal::new(
            400,
            format!("give exactly one of {url_field} and {path_field}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;

    /// `(method, path)` of every operation in an OpenAPI document: the keys one level below
    /// each path key under `paths:`, whatever the indent step.
    fn documented(document: &str) -> BTreeSet<(String, String)> {
        let indent = |line: &str| line.len() - line.trim_start().len();
        let mut found = BTreeSet::new();
        let mut lines = document
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .skip_while(|l| *l != "paths:")
            .skip(1)
            .take_while(|l| indent(l) > 0);
        let mut path: Option<(usize, String)> = None;
        for line in lines.by_ref() {
            let key = line.trim().trim_end_matches(':');
            if key.starts_with('/') {
                path = Some((indent(line), key.to_string()));
            } else if let Some((depth, p)) = &path {
                let is_method = ["get", "put", "post", "patch", "delete", "head"].contains(&key);
                if is_method && indent(line) > *depth && line.trim().ends_with(':') {
                    found.insert((key.to_uppercase(), p.clone()));
                }
            }
        }
        found
    }

    #[test]
    fn openapi_documents_exactly_the_routes() {
        let routed: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.to_string(), format!("/{}", r.path)))
            .collect();
        let file = documented(include_str!("../../openapi.yaml"));
        assert_eq!(file, routed);
        // Each (method, path) once, paths plain.
        assert_eq!(routed.len(), ROUTES.len());
        assert!(ROUTES.iter().all(|r| !r.path.contains(['/', '?'])));
    }

    #[test]
    fn a_snapshot_names_exactly_one_destination() {
        let request = |url: Option<&str>, path: Option<&str>| SnapshotRequest {
            destination_url: url.map(str::to_string),
            path: path.map(PathBuf::from),
        };
        assert_eq!(
            destination(request(Some("file:///tmp/s"), None)).unwrap(),
            PathBuf::from("/tmp/s")
        );
        assert_eq!(
            destination(request(None, Some("/tmp/s"))).unwrap(),
            PathBuf::from("/tmp/s")
        );
        assert!(destination(request(Some("http://x/s"), None)).is_err());
        assert!(destination(request(None, None)).is_err());
        assert!(destination(request(Some("file:///a"), Some("/b"))).is_err());
    }

    #[test]
    fn routing_refuses_before_any_handler_runs() {
        let context = ApiContext::new(crate::backend::BalloonBackend::shared(), None);
        let status =
            |method: &str, path: &str, body: &[u8]| dispatch(&context, method, path, body).status;
        assert_eq!(status("GET", "/api/v1/nothing", b""), 404);
        assert_eq!(status("GET", "/status", b""), 404);
        assert_eq!(status("DELETE", "/api/v1/status", b""), 405);
        assert_eq!(status("GET", "/api/v1/status", b"{}"), 400);
        assert_eq!(status("PUT", "/api/v1/resize", b""), 400);
        assert_eq!(
            status("PUT", "/api/v1/resize", br#"{"target_bytes":1}"#),
            400
        );
        assert_eq!(
            status("PUT", "/api/v1/resize", br#"{"target_bytes":4096,"x":1}"#),
            400
        );
        assert_eq!(
            status(
                "PUT",
                "/api/v1/resize",
                br#"{"target_bytes":17592186044416}"#
            ),
            400
        );
        assert_eq!(
            status("PUT", "/api/v1/resize", br#"{"target_bytes":8192}"#),
            204
        );
        assert_eq!(read(&context.backend).balloon().target_pages(), 2);
        let snapshot = br#"{"path":"/tmp/vum-never-written"}"#;
        assert_eq!(status("PUT", "/api/v1/snapshot", snapshot), 409);
        assert_eq!(status("GET", "/api/v1/status", b""), 200);
    }

    #[test]
    fn page_server_requests_are_checked_before_anything_starts() {
        let context = ApiContext::new(crate::backend::BalloonBackend::shared(), None);
        let status =
            |method: &str, path: &str, body: &[u8]| dispatch(&context, method, path, body).status;
        let route = "/api/v1/page-server";
        assert_eq!(status("GET", route, b""), 200);
        assert_eq!(status("DELETE", route, b""), 409, "none runs");
        assert_eq!(status("DELETE", route, b"{}"), 400);
        assert_eq!(status("PUT", route, b""), 400);
        let refused: &[&[u8]] = &[
            br#"{"socket":"/tmp/vum-p.sock"}"#,
            br#"{"snapshot":"s","socket":"/tmp/vum-p.sock"}"#,
            br#"{"snapshot":"/s","socket":"p.sock"}"#,
            br#"{"snapshot":"/s","snapshot_url":"file:///s","socket":"/tmp/vum-p.sock"}"#,
            br#"{"snapshot_url":"http://x/s","socket":"/tmp/vum-p.sock"}"#,
            br#"{"snapshot":"/s","socket":"/tmp/vum-p.sock","extra":1}"#,
            br#"{"snapshot":"/s","socket":"/tmp/vum-p.sock","prefault":"yes"}"#,
            br#"{"snapshot":"/nonexistent/vum.snap","socket":"/tmp/vum-p.sock"}"#,
        ];
        for body in refused {
            assert_eq!(
                status("PUT", route, body),
                400,
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        let wrong = dispatch(&context, "POST", route, b"{}");
        assert_eq!(wrong.status, 405);
        assert_eq!(wrong.allow.as_deref(), Some("GET, PUT, DELETE"));
        assert!(!Path::new("/tmp/vum-p.sock").exists());
        let body = dispatch(&context, "GET", route, b"").json.unwrap();
        let now: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(now["running"], false);
        assert_eq!(now["counters"], serde_json::Value::Null);
    }
}
