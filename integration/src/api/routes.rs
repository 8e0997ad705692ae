//! The endpoint table: which path and method call which [`VmmBackend`] method.
//!
//! Paths, methods and bodies follow Cloud Hypervisor's `/api/v1` API. Adding an endpoint is one
//! line in [`ROUTES`] (plus the backend method it calls); extension endpoints go under
//! `ext/`, e.g. `Route::put_json("ext/vm.snapshot-sparse", ...)`.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::backend::{ApiError, VmmBackend};
use super::http::Response;

/// Every endpoint lives under this prefix.
pub(crate) const API_PREFIX: &str = "/api/v1/";

/// What an endpoint does with the request body and what it answers on success.
#[derive(Clone, Copy)]
enum Action {
    /// Takes no body, answers `200` with the JSON the handler produced.
    Get(fn(&dyn VmmBackend) -> Result<Vec<u8>, ApiError>),
    /// Takes no body, answers `204`.
    Put(fn(&dyn VmmBackend) -> Result<(), ApiError>),
    /// Requires a JSON body, answers `204`.
    PutJson(fn(&dyn VmmBackend, &[u8]) -> Result<(), ApiError>),
}

/// One endpoint: the path below [`API_PREFIX`] and what to do for it.
#[derive(Clone, Copy)]
struct Route {
    path: &'static str,
    action: Action,
}

impl Route {
    const fn get(
        path: &'static str,
        handler: fn(&dyn VmmBackend) -> Result<Vec<u8>, ApiError>,
    ) -> Self {
        Route {
            path,
            action: Action::Get(handler),
        }
    }

    const fn put(path: &'static str, handler: fn(&dyn VmmBackend) -> Result<(), ApiError>) -> Self {
        Route {
            path,
            action: Action::Put(handler),
        }
    }

    const fn put_json(
        path: &'static str,
        handler: fn(&dyn VmmBackend, &[u8]) -> Result<(), ApiError>,
    ) -> Self {
        Route {
            path,
            action: Action::PutJson(handler),
        }
    }

    fn method(&self) -> &'static str {
        match self.action {
            Action::Get(_) => "GET",
            Action::Put(_) | Action::PutJson(_) => "PUT",
        }
    }
}

/// The API. Keep it in step with `integration/openapi/ext-vmm.yaml`.
const ROUTES: &[Route] = &[
    Route::get("vmm.ping", |vmm| to_json(&vmm.vmm_ping())),
    Route::put("vmm.shutdown", |vmm| vmm.vmm_shutdown()),
    Route::get("vm.info", |vmm| to_json(&vmm.vm_info()?)),
    Route::put("vm.pause", |vmm| vmm.vm_pause()),
    Route::put("vm.resume", |vmm| vmm.vm_resume()),
    Route::put("vm.shutdown", |vmm| vmm.vm_shutdown()),
    Route::get("vm.counters", |vmm| to_json(&vmm.vm_counters()?)),
    Route::put_json("vm.snapshot", |vmm, body| {
        vmm.vm_snapshot(&from_json(body)?)
    }),
    Route::put_json("vm.restore", |vmm, body| vmm.vm_restore(&from_json(body)?)),
    Route::put_json("ext/perm.create-view", |vmm, body| {
        vmm.perm_create_view(&from_json(body)?)
    }),
    Route::put_json("ext/perm.set", |vmm, body| vmm.perm_set(&from_json(body)?)),
    Route::put_json("ext/perm.assign", |vmm, body| {
        vmm.perm_assign(&from_json(body)?)
    }),
    Route::get("ext/perm.violations", |vmm| {
        to_json(&vmm.perm_violations()?)
    }),
    Route::get("ext/perm.capabilities", |vmm| {
        to_json(&vmm.perm_capabilities()?)
    }),
];

/// Answers one request. `target` is the request target as received (a query string, which
/// no endpoint uses, is ignored).
pub(crate) fn dispatch(
    backend: &dyn VmmBackend,
    method: &str,
    target: &str,
    body: &[u8],
) -> Response {
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    let Some(endpoint) = path.strip_prefix(API_PREFIX) else {
        return Response::error(
            404,
            &[format!(
                "unknown path {path}; the API is under {API_PREFIX}"
            )],
        );
    };
    let candidates: Vec<&Route> = ROUTES.iter().filter(|r| r.path == endpoint).collect();
    if candidates.is_empty() {
        return Response::error(404, &[format!("unknown endpoint {path}")]);
    }
    let Some(route) = candidates.iter().find(|r| r.method() == method) else {
        let allowed: Vec<&str> = candidates.iter().map(|r| r.method()).collect();
        let mut response = Response::error(
            405,
            &[format!(
                "{method} is not allowed on {path}; use {}",
                allowed.join(", ")
            )],
        );
        response.allow = Some(allowed.join(", "));
        return response;
    };
    let result = match route.action {
        Action::Get(handler) => no_body(endpoint, body)
            .and_then(|()| handler(backend))
            .map(|json| Response::json(200, json)),
        Action::Put(handler) => no_body(endpoint, body)
            .and_then(|()| handler(backend))
            .map(|()| Response::no_content()),
        Action::PutJson(handler) => {
            if body.is_empty() {
                Err(ApiError::new(
                    400,
                    format!("{endpoint} requires a JSON request body"),
                ))
            } else {
                handler(backend, body).map(|()| Response::no_content())
            }
        }
    };
    result.unwrap_or_else(error_response)
}

/// Cloud Hypervisor refuses a body on endpoints that take none; so do we, so that a client
/// sending parameters to the wrong endpoint learns about it.
fn no_body(endpoint: &str, body: &[u8]) -> Result<(), ApiError> {
    if body.is_empty() {
        Ok(())
    } else {
        Err(ApiError::new(
            400,
            format!("{endpoint} takes no request body"),
        ))
    }
}

fn error_response(error: ApiError) -> Response {
    // A backend status outside 4xx/5xx would make the client read an error as success.
    let status = if (400..=599).contains(&error.status) {
        error.status
    } else {
        500
    };
    Response::error(status, &error.messages)
}

fn to_json<T: Serialize>(value: &T) -> Result<Vec<u8>, ApiError> {
    serde_json::to_vec(value)
        .map_err(|err| ApiError::new(500, format!("cannot encode the response: {err}")))
}

fn from_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|err| ApiError {
        status: 400,
        messages: vec!["invalid JSON request body".to_string(), err.to_string()],
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The `(method, path)` pairs under `paths:` of the OpenAPI document. A line scan is
    /// enough for its layout: paths are keys indented by two spaces, methods by four.
    fn documented_operations(document: &str) -> BTreeSet<(String, String)> {
        let mut in_paths = false;
        let mut current_path = None;
        let mut operations = BTreeSet::new();
        for line in document.lines() {
            if !line.starts_with(' ') && !line.trim().is_empty() {
                in_paths = line == "paths:";
                continue;
            }
            if !in_paths {
                continue;
            }
            if let Some(path) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
                current_path = Some(path.to_string());
            } else if let (Some(path), Some(key)) = (
                &current_path,
                line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')),
            ) {
                if ["get", "put", "post", "patch", "delete"].contains(&key) {
                    operations.insert((key.to_string(), path.clone()));
                }
            }
        }
        operations
    }

    #[test]
    fn the_openapi_document_lists_exactly_the_routes() {
        let documented = documented_operations(include_str!("../../openapi/ext-vmm.yaml"));
        let routed: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method().to_lowercase(), r.path.to_string()))
            .collect();
        assert_eq!(documented, routed);
    }

    #[test]
    fn every_route_is_unique_and_has_a_plain_path() {
        for (i, route) in ROUTES.iter().enumerate() {
            assert!(!route.path.starts_with('/'), "{}", route.path);
            assert!(!route.path.contains('?'), "{}", route.path);
            let twins = ROUTES[i + 1..]
                .iter()
                .filter(|r| r.path == route.path && r.method() == route.method())
                .count();
            assert_eq!(twins, 0, "{} {} routed twice", route.method(), route.path);
        }
    }

    /// A backend without snapshot support whose pause fails with a status that is not an
    /// error status, to check what the router makes of both.
    struct MinimalVmm;

    impl VmmBackend for MinimalVmm {
        fn vmm_ping(&self) -> crate::api::VmmPingResponse {
            crate::api::VmmPingResponse {
                build_version: String::new(),
                version: String::new(),
                pid: 0,
                features: Vec::new(),
            }
        }
        fn vmm_shutdown(&self) -> Result<(), ApiError> {
            Ok(())
        }
        fn vm_info(&self) -> Result<crate::api::VmInfo, ApiError> {
            Err(ApiError::no_vm())
        }
        fn vm_pause(&self) -> Result<(), ApiError> {
            Err(ApiError::new(200, "not really an error status"))
        }
        fn vm_resume(&self) -> Result<(), ApiError> {
            Ok(())
        }
        fn vm_shutdown(&self) -> Result<(), ApiError> {
            Ok(())
        }
        fn vm_counters(&self) -> Result<crate::api::VmCounters, ApiError> {
            Ok(crate::api::VmCounters::new())
        }
    }

    #[test]
    fn snapshot_without_backend_support_is_not_implemented() {
        let body = br#"{"destination_url":"file:///x"}"#;
        let response = dispatch(&MinimalVmm, "PUT", "/api/v1/vm.snapshot", body);
        assert_eq!(response.status, 501);
    }

    #[test]
    fn a_backend_error_never_reads_as_success() {
        let response = dispatch(&MinimalVmm, "PUT", "/api/v1/vm.pause", b"");
        assert_eq!(response.status, 500);
    }
}
