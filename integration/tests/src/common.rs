//! Helpers shared by the host-level test crates that run guests on `/dev/kvm`.

use std::path::Path;
use std::time::{Duration, Instant};

use ext_vmm_api::{
    ApiError, ApiRequest, ApiResponse, RequestHandler, VmCounters, VmInfo, VmRestoreConfig,
    VmSnapshotConfig,
};

/// Set (to `1`) by `.ci/run`: what the tests need must exist, so a missing `/dev/kvm`,
/// userfaultfd or lab image fails the test instead of skipping it.
pub const REQUIRE_ENV: &str = "EXT_REQUIRE_ALL";

/// Whether `.ci/run` demands every test environment (see [`REQUIRE_ENV`]).
pub fn required() -> bool {
    std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1")
}

/// Reports a missing test environment: prints the SKIPPED line for `test` and returns false,
/// or panics when [`required`] (CI must not pass by skipping).
pub fn skip(test: &str, missing: &str) -> bool {
    assert!(
        !required(),
        "{test}: {missing}, and {REQUIRE_ENV}=1 says it must exist"
    );
    println!("SKIPPED: {test}: {missing}");
    false
}

/// True when `/dev/kvm` exists; otherwise [`skip`]s `test`.
pub fn kvm_available(test: &str) -> bool {
    Path::new("/dev/kvm").exists() || skip(test, "/dev/kvm not available")
}

/// Polls `condition` until it holds or `limit` passes; returns whether it held. The limit is
/// generous, only so that a broken build fails instead of hanging: no speed is asserted.
pub fn wait_for(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// Typed calls of the API requests the tests make, on anything that answers them (the
/// process's slot, a VM, a fixture), decoding the JSON answers.
pub trait Calls {
    /// Sends one request.
    fn call(&self, request: ApiRequest) -> Result<ApiResponse, ApiError>;

    /// A request answered with `204`.
    fn empty(&self, request: ApiRequest) -> Result<(), ApiError> {
        self.call(request).map(|_| ())
    }

    /// A request answered with JSON, decoded.
    fn json<T: serde::de::DeserializeOwned>(&self, request: ApiRequest) -> Result<T, ApiError> {
        match self.call(request)? {
            ApiResponse::Json(json) => serde_json::from_slice(&json)
                .map_err(|e| ApiError::internal(format!("undecodable answer: {e}"))),
            ApiResponse::Empty => Err(ApiError::internal("empty answer")),
        }
    }

    /// `vm.info`.
    fn vm_info(&self) -> Result<VmInfo, ApiError> {
        self.json(ApiRequest::VmInfo)
    }

    /// `vm.counters`.
    fn vm_counters(&self) -> Result<VmCounters, ApiError> {
        self.json(ApiRequest::VmCounters)
    }

    /// `vm.pause`.
    fn vm_pause(&self) -> Result<(), ApiError> {
        self.empty(ApiRequest::VmPause)
    }

    /// `vm.resume`.
    fn vm_resume(&self) -> Result<(), ApiError> {
        self.empty(ApiRequest::VmResume)
    }

    /// `vm.shutdown`.
    fn vm_shutdown(&self) -> Result<(), ApiError> {
        self.empty(ApiRequest::VmShutdown)
    }

    /// `vmm.shutdown`.
    fn vmm_shutdown(&self) -> Result<(), ApiError> {
        self.empty(ApiRequest::VmmShutdown)
    }

    /// `vm.snapshot`.
    fn vm_snapshot(&self, config: &VmSnapshotConfig) -> Result<(), ApiError> {
        self.empty(ApiRequest::VmSnapshot(config.clone()))
    }

    /// `vm.restore`.
    fn vm_restore(&self, config: &VmRestoreConfig) -> Result<(), ApiError> {
        self.empty(ApiRequest::VmRestore(config.clone()))
    }
}

impl<T: RequestHandler + ?Sized> Calls for T {
    fn call(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        self.handle(request)
    }
}
