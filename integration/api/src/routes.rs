//! The route table: which method and path parse into which [`ApiRequest`].
//!
//! Paths, methods and bodies follow Cloud Hypervisor's `/api/v1` API; extension endpoints live
//! under `ext/`. Adding an endpoint is one line in [`ROUTES`] (plus its [`ApiRequest`] variant).

use serde::de::DeserializeOwned;

use crate::action::{ApiRequest, ApiResponse, RequestHandler};
use crate::error::ApiError;
use crate::http::Response;
use crate::vm_config::VmCreateConfig;

/// Every endpoint lives under this prefix.
pub(crate) const API_PREFIX: &str = "/api/v1/";

/// How an endpoint's request is built.
#[derive(Clone, Copy)]
enum Parse {
    /// No body; always this request.
    Plain(fn() -> ApiRequest),
    /// A JSON body (required), parsed by the function.
    Json(fn(&[u8]) -> Result<ApiRequest, ApiError>),
}

/// One endpoint: method, path below [`API_PREFIX`], and how its request is built.
#[derive(Clone, Copy)]
struct Route {
    method: &'static str,
    path: &'static str,
    parse: Parse,
}

const fn get(path: &'static str, request: fn() -> ApiRequest) -> Route {
    Route {
        method: "GET",
        path,
        parse: Parse::Plain(request),
    }
}

const fn put(path: &'static str, request: fn() -> ApiRequest) -> Route {
    Route {
        method: "PUT",
        path,
        parse: Parse::Plain(request),
    }
}

const fn put_json(path: &'static str, parse: fn(&[u8]) -> Result<ApiRequest, ApiError>) -> Route {
    Route {
        method: "PUT",
        path,
        parse: Parse::Json(parse),
    }
}

/// The API. Keep it in step with `integration/openapi/ext-vmm.yaml` (a test checks).
const ROUTES: &[Route] = &[
    get("vmm.ping", || ApiRequest::VmmPing),
    put("vmm.shutdown", || ApiRequest::VmmShutdown),
    put_json("vm.create", |body| {
        VmCreateConfig::from_json(body).map(|c| ApiRequest::VmCreate(Box::new(c)))
    }),
    put("vm.boot", || ApiRequest::VmBoot),
    put("vm.delete", || ApiRequest::VmDelete),
    put("vm.reboot", || ApiRequest::VmReboot),
    put("vm.power-button", || ApiRequest::VmPowerButton),
    get("vm.info", || ApiRequest::VmInfo),
    put("vm.pause", || ApiRequest::VmPause),
    put("vm.resume", || ApiRequest::VmResume),
    put("vm.shutdown", || ApiRequest::VmShutdown),
    get("vm.counters", || ApiRequest::VmCounters),
    put_json("vm.snapshot", |body| {
        from_json(body).map(ApiRequest::VmSnapshot)
    }),
    put_json("vm.restore", |body| {
        from_json(body).map(ApiRequest::VmRestore)
    }),
    get("ext/vm.identity", || ApiRequest::VmIdentity),
    put_json("ext/vm.identity", |body| {
        from_json(body).map(ApiRequest::VmSetIdentity)
    }),
    put_json("ext/perm.create-view", |body| {
        from_json(body).map(ApiRequest::PermCreateView)
    }),
    put_json("ext/perm.set", |body| {
        from_json(body).map(ApiRequest::PermSet)
    }),
    put_json("ext/perm.assign", |body| {
        from_json(body).map(ApiRequest::PermAssign)
    }),
    get("ext/perm.violations", || ApiRequest::PermViolations),
    get("ext/perm.capabilities", || ApiRequest::PermCapabilities),
];

/// Parses one request into an [`ApiRequest`], or the error response to send instead.
/// `target` is the request target as received (a query string, which no endpoint uses, is
/// ignored).
pub(crate) fn parse_request(
    method: &str,
    target: &str,
    body: &[u8],
) -> Result<ApiRequest, Response> {
    let path = target.split_once('?').map_or(target, |(path, _query)| path);
    let Some(endpoint) = path.strip_prefix(API_PREFIX) else {
        return Err(Response::error(
            404,
            &[format!(
                "unknown path {path}; the API is under {API_PREFIX}"
            )],
        ));
    };
    let candidates: Vec<&Route> = ROUTES.iter().filter(|r| r.path == endpoint).collect();
    if candidates.is_empty() {
        return Err(Response::error(404, &[format!("unknown endpoint {path}")]));
    }
    let Some(route) = candidates.iter().find(|r| r.method == method) else {
        let allowed: Vec<&str> = candidates.iter().map(|r| r.method).collect();
        let mut response = Response::error(
            405,
            &[format!(
                "{method} is not allowed on {path}; use {}",
                allowed.join(", ")
            )],
        );
        response.allow = Some(allowed.join(", "));
        return Err(response);
    };
    let request = match route.parse {
        // Cloud Hypervisor refuses a body on endpoints that take none; so do we, so that a
        // client sending parameters to the wrong endpoint learns about it.
        Parse::Plain(_) if !body.is_empty() => Err(ApiError::bad_request(format!(
            "{endpoint} takes no request body"
        ))),
        Parse::Plain(request) => Ok(request()),
        Parse::Json(_) if body.is_empty() => Err(ApiError::bad_request(format!(
            "{endpoint} requires a JSON request body"
        ))),
        Parse::Json(parse) => parse(body),
    };
    request.map_err(|e| error_response(&e))
}

/// Answers one request: parse, hand to the VMM, encode.
pub(crate) fn dispatch(
    handler: &dyn RequestHandler,
    method: &str,
    target: &str,
    body: &[u8],
) -> Response {
    let request = match parse_request(method, target, body) {
        Ok(request) => request,
        Err(response) => return response,
    };
    match handler.handle(request) {
        Ok(ApiResponse::Empty) => Response::no_content(),
        Ok(ApiResponse::Json(json)) => Response::json(200, json),
        Err(error) => error_response(&error),
    }
}

/// The error table's answer: the status of the error's kind, messages as a JSON array.
fn error_response(error: &ApiError) -> Response {
    Response::error(error.status(), &error.messages)
}

fn from_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|err| ApiError::bad_request_with("invalid JSON request body", err.to_string()))
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
            .map(|r| (r.method.to_lowercase(), r.path.to_string()))
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
                .filter(|r| r.path == route.path && r.method == route.method)
                .count();
            assert_eq!(twins, 0, "{} {} routed twice", route.method, route.path);
        }
    }

    /// A handler that answers ping and refuses everything else as not implemented.
    struct MinimalVmm;

    impl RequestHandler for MinimalVmm {
        fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
            match request {
                ApiRequest::VmmPing => ApiResponse::json(&serde_json::json!({"version": "0"})),
                ApiRequest::VmPause => Err(ApiError::internal("pause failed")),
                _ => Err(ApiError::not_implemented("not in this VMM")),
            }
        }
    }

    #[test]
    fn requests_reach_the_handler_and_errors_map_to_their_status() {
        let body = br#"{"destination_url":"file:///x"}"#;
        assert_eq!(
            dispatch(&MinimalVmm, "PUT", "/api/v1/vm.snapshot", body).status,
            501
        );
        assert_eq!(
            dispatch(&MinimalVmm, "PUT", "/api/v1/vm.pause", b"").status,
            500
        );
        assert_eq!(
            dispatch(&MinimalVmm, "GET", "/api/v1/vmm.ping", b"").status,
            200
        );
    }

    #[test]
    fn json_bodies_keep_the_field_order_of_their_type() {
        #[derive(serde::Serialize)]
        struct Ordered {
            zebra: u8,
            apple: u8,
        }
        let answer = ApiResponse::json(&Ordered { zebra: 1, apple: 2 }).unwrap();
        assert_eq!(
            answer,
            ApiResponse::Json(br#"{"zebra":1,"apple":2}"#.to_vec())
        );
    }

    #[test]
    fn bodies_are_parsed_before_the_handler_runs() {
        assert_eq!(
            dispatch(&MinimalVmm, "PUT", "/api/v1/vm.snapshot", b"{").status,
            400
        );
        assert_eq!(
            dispatch(&MinimalVmm, "PUT", "/api/v1/vm.create", b"").status,
            400
        );
        assert_eq!(
            dispatch(&MinimalVmm, "PUT", "/api/v1/vm.boot", b"{}").status,
            400
        );
        assert_eq!(
            dispatch(&MinimalVmm, "GET", "/api/v1/vm.boot", b"").status,
            405
        );
        assert_eq!(
            parse_request(
                "PUT",
                "/api/v1/vm.create",
                br#"{"payload":{"kernel":"/k"}}"#
            )
            .map(|r| matches!(r, ApiRequest::VmCreate(_)))
            .ok(),
            Some(true)
        );
    }
}
