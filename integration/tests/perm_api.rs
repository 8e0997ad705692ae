//! ext-perm inside ext-vmm, driven over the REST API on this host's `/dev/kvm`: the
//! `ext/perm.*` endpoints' errors and effects, and two tiny PVH "kernels" whose memory
//! accesses go through ext-vmm's exit loop into ext-perm.
//!
//! The VM behind the API is a real [`Vmm`] (KVM VM, memslots adopted by ext-perm's KVM
//! backend). Where `/dev/kvm` is missing every test prints a `SKIPPED:` line and returns.

// Test fixtures unwrap: a panic is how a test fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;

use ext_vmm::config::{SerialOutput, VmConfig};
use ext_vmm::exit::ExitReason;
use ext_vmm::Vmm;
use ext_vmm_api::{
    start_api_server, ApiClient, ApiError, ApiRequest, ApiResponse, ApiServer, ClientResponse,
    RequestHandler,
};

use ext_vmm_tests::common::kvm_available;

/// A page of guest RAM the guests below use, away from the kernel (1 MiB), the start info
/// and the initramfs (top of RAM).
const TEST_PAGE: u64 = 0x20_0000;
const MEMORY_SIZE: u64 = 64 << 20;

/// `mov dx, 0x3c0; mov al, 0x34; out dx, al`: ACPI S5, which ends the VM with `PowerOff`.
const POWER_OFF: [u8; 7] = [0x66, 0xba, 0xc0, 0x03, 0xb0, 0x34, 0xee];

struct TestVm {
    vmm: Arc<Vmm>,
    client: ApiClient,
    _server: ApiServer,
    serial: PathBuf,
    _dir: tempfile::TempDir,
}

/// A created (not booted) VM running `code`, with its API on a socket and a client.
fn test_vm(code: &[u8]) -> TestVm {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    std::fs::write(&kernel, ext_vmm_tests::test_kernel::pvh_elf(code)).unwrap();
    let mut config = VmConfig::new(kernel);
    config.memory_size = MEMORY_SIZE;
    let serial = dir.path().join("serial.out");
    config.serial = SerialOutput::File(serial.clone());
    let vmm = Arc::new(Vmm::new(config).unwrap());
    let socket = dir.path().join("api.sock");
    let server = start_api_server(&socket, vmm.clone() as Arc<dyn RequestHandler>).unwrap();
    let client = ApiClient::connect(&socket).unwrap();
    TestVm {
        vmm,
        client,
        _server: server,
        serial,
        _dir: dir,
    }
}

impl TestVm {
    fn put(&mut self, endpoint: &str, body: &str) -> ClientResponse {
        // A refused request closes the connection (Connection: close): use a fresh one.
        let response = self
            .client
            .request("PUT", endpoint, Some(body.as_bytes()))
            .unwrap();
        if !response.is_success() {
            self.reconnect();
        }
        response
    }

    fn get(&mut self, endpoint: &str) -> serde_json::Value {
        let response = self.client.request("GET", endpoint, None).unwrap();
        assert_eq!(response.status, 200, "{}", response.body_text());
        serde_json::from_slice(&response.body).unwrap()
    }

    fn reconnect(&mut self) {
        let socket = self._dir.path().join("api.sock");
        self.client = ApiClient::connect(&socket).unwrap();
    }

    fn set(&mut self, gpa: u64, size: u64, permissions: &str) -> ClientResponse {
        let body =
            format!(r#"{{"view":0,"gpa":{gpa},"size":{size},"permissions":"{permissions}"}}"#);
        self.put("ext/perm.set", &body)
    }
}

/// Asserts a 400 whose body is a non-empty JSON array of strings mentioning `needle`.
fn assert_refused(response: &ClientResponse, needle: &str) {
    assert_eq!(response.status, 400, "{}", response.body_text());
    let messages: Vec<String> = serde_json::from_slice(&response.body).unwrap();
    assert!(!messages.is_empty());
    assert!(
        messages.iter().any(|m| m.contains(needle)),
        "{needle:?} not in {messages:?}"
    );
}

#[test]
fn perm_endpoints_refuse_bad_requests() {
    if !kvm_available("perm_endpoints_refuse_bad_requests") {
        return;
    }
    let mut vm = test_vm(&POWER_OFF);
    assert_refused(&vm.put("ext/perm.set", "{not json"), "invalid JSON");
    assert_refused(
        &vm.put("ext/perm.set", r#"{"view":0,"gpa":0,"size":4096}"#),
        "permissions",
    );
    assert_refused(&vm.set(TEST_PAGE, 4096, "rwz"), "invalid permissions");
    assert_refused(&vm.set(TEST_PAGE + 1, 4096, "r-x"), "not page aligned");
    assert_refused(&vm.set(TEST_PAGE, 100, "r-x"), "not page aligned");
    assert_refused(&vm.set(TEST_PAGE, 0, "r-x"), "not page aligned");
    assert_refused(&vm.set(MEMORY_SIZE, 4096, "r-x"), "not inside guest RAM");
    assert_refused(
        &vm.set(u64::MAX - 4095, 8192, "r-x"),
        "not inside guest RAM",
    );
    let unknown_view = r#"{"view":7,"gpa":2097152,"size":4096,"permissions":"r-x"}"#;
    assert_refused(
        &vm.put("ext/perm.set", unknown_view),
        "view 7 does not exist",
    );
    assert_refused(
        &vm.put("ext/perm.assign", r#"{"vcpu":3,"view":0}"#),
        "vCPU 3 does not exist",
    );
    assert_refused(
        &vm.put("ext/perm.assign", r#"{"vcpu":0,"view":9}"#),
        "view 9 does not exist",
    );
    let existing = r#"{"view":0,"default_permissions":"rwx"}"#;
    assert_refused(&vm.put("ext/perm.create-view", existing), "already exists");
    let response = vm.client.request("GET", "ext/perm.set", None).unwrap();
    assert_eq!(response.status, 405);
    vm.reconnect();
    let response = vm
        .client
        .request("GET", "ext/perm.violations", Some(b"{}"))
        .unwrap();
    assert_eq!(response.status, 400);
    vm.reconnect();
    // Nothing refused above left a trace in the table or the memslots.
    let capabilities = vm.get("ext/perm.capabilities");
    assert_eq!(capabilities["backend"], "kvm-memslot");
    assert_eq!(capabilities["memslots"], 1);
    assert_eq!(capabilities["memslot_operations"], 0);
    let violations = vm.get("ext/perm.violations");
    assert_eq!(violations["events"].as_array().unwrap().len(), 0);
}

#[test]
fn perm_set_reshapes_memslots_and_views_are_created_and_assigned() {
    if !kvm_available("perm_set_reshapes_memslots_and_views_are_created_and_assigned") {
        return;
    }
    let mut vm = test_vm(&POWER_OFF);
    assert_eq!(vm.set(TEST_PAGE, 4096, "r-x").status, 204);
    // RAM split around the read-only page: below, the page, above.
    assert_eq!(vm.get("ext/perm.capabilities")["memslots"], 3);
    assert_eq!(vm.set(TEST_PAGE, 4096, "rwx").status, 204);
    assert_eq!(vm.get("ext/perm.capabilities")["memslots"], 1);
    let view = r#"{"view":1,"default_permissions":"rwx"}"#;
    assert_eq!(vm.put("ext/perm.create-view", view).status, 204);
    let set = r#"{"view":1,"gpa":2097152,"size":8192,"permissions":"---"}"#;
    assert_eq!(vm.put("ext/perm.set", set).status, 204);
    // View 1 has no vCPU yet, so nothing is installed for it.
    assert_eq!(vm.get("ext/perm.capabilities")["memslots"], 1);
    assert_eq!(
        vm.put("ext/perm.assign", r#"{"vcpu":0,"view":1}"#).status,
        204
    );
    // Now it is active: two unbacked pages split RAM into two slots.
    assert_eq!(vm.get("ext/perm.capabilities")["memslots"], 2);
}

#[test]
fn guest_accesses_to_a_non_executable_page_are_emulated_and_devices_still_work() {
    if !kvm_available("guest_accesses_to_a_non_executable_page_are_emulated_and_devices_still_work")
    {
        return;
    }
    let page = (TEST_PAGE as u32).to_le_bytes();
    let mut code = vec![0xbf]; // mov edi, TEST_PAGE
    code.extend(page);
    code.extend([0xc7, 0x07, 0x0d, 0xf0, 0xfe, 0xca]); // mov dword [edi], 0xcafef00d
    code.extend([0x8b, 0x07]); // mov eax, [edi]
    code.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8 (COM1)
    for _ in 0..3 {
        code.extend([0xee, 0xc1, 0xe8, 0x08]); // out dx, al; shr eax, 8
    }
    code.push(0xee); // out dx, al
    code.extend(POWER_OFF);
    let mut vm = test_vm(&code);
    // rw-: readable and writable, not executable; on KVM the page has no memslot at all.
    assert_eq!(vm.set(TEST_PAGE, 4096, "rw-").status, 204);
    vm.vmm.boot().unwrap();
    assert_eq!(vm.vmm.run_until_exit().unwrap(), ExitReason::PowerOff);
    // The guest read back what it wrote, through ext-perm's emulation, and COM1 (port I/O)
    // and ACPI still work.
    assert_eq!(std::fs::read(&vm.serial).unwrap(), [0x0d, 0xf0, 0xfe, 0xca]);
    let report = vm.get("ext/perm.violations");
    assert_eq!(report["stats"]["emulated_writes"], 1, "{report}");
    assert_eq!(report["stats"]["emulated_reads"], 1, "{report}");
    assert_eq!(report["stats"]["violations"], 0, "{report}");
}

#[test]
fn guest_jump_into_a_non_executable_page_is_refused_and_reported() {
    if !kvm_available("guest_jump_into_a_non_executable_page_is_refused_and_reported") {
        return;
    }
    // The guest writes "print X, power off" into the page, then jumps there.
    let mut payload = vec![0x66, 0xba, 0xf8, 0x03, 0xb0, b'X', 0xee]; // mov dx,0x3f8; mov al,'X'; out
    payload.extend(POWER_OFF);
    payload.resize(16, 0x90);
    let mut code = vec![0xbf]; // mov edi, TEST_PAGE
    code.extend((TEST_PAGE as u32).to_le_bytes());
    for (i, chunk) in payload.chunks(4).enumerate() {
        code.extend([0xc7, 0x47, (i * 4) as u8]); // mov dword [edi + i*4], imm32
        code.extend(chunk);
    }
    code.extend([0xff, 0xe7]); // jmp edi
    let mut vm = test_vm(&code);
    assert_eq!(vm.set(TEST_PAGE, 4096, "rw-").status, 204);
    vm.vmm.boot().unwrap();
    // The refused fetch injects #GP; this guest has no IDT, so it triple-faults (a reset).
    // Had the page run, it would have printed X and powered off.
    assert_eq!(vm.vmm.run_until_exit().unwrap(), ExitReason::Reset);
    assert_eq!(std::fs::read(&vm.serial).unwrap(), b"");
    let report = vm.get("ext/perm.violations");
    assert_eq!(report["stats"]["emulated_writes"], 4, "{report}");
    assert_eq!(report["stats"]["violations"], 1, "{report}");
    let event = &report["events"][0];
    assert_eq!(event["event"], "violation", "{report}");
    assert_eq!(event["access"], "execute", "{report}");
    assert_eq!(event["kind"], "execute", "{report}");
    assert_eq!(event["gpa"], TEST_PAGE, "{report}");
    assert_eq!(event["rip"], TEST_PAGE, "{report}");
    assert_eq!(event["outcome"], "fault_injected", "{report}");
}

/// A VMM without page-permission support: every `ext/perm.*` request gets a 501.
struct NoPermVmm;

impl RequestHandler for NoPermVmm {
    fn handle(&self, request: ApiRequest) -> Result<ApiResponse, ApiError> {
        match request {
            ApiRequest::PermCreateView(_)
            | ApiRequest::PermSet(_)
            | ApiRequest::PermAssign(_)
            | ApiRequest::PermViolations
            | ApiRequest::PermCapabilities => Err(ApiError::not_implemented(
                "page permissions are not available in this VMM",
            )),
            _ => Ok(ApiResponse::Empty),
        }
    }
}

#[test]
fn a_vmm_without_perm_support_answers_501_but_still_checks_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("api.sock");
    let _server = start_api_server(&socket, Arc::new(NoPermVmm)).unwrap();
    let requests: [(&str, &str, Option<&str>); 5] = [
        (
            "PUT",
            "ext/perm.set",
            Some(r#"{"view":0,"gpa":0,"size":4096,"permissions":"r-x"}"#),
        ),
        ("PUT", "ext/perm.assign", Some(r#"{"vcpu":0,"view":0}"#)),
        (
            "PUT",
            "ext/perm.create-view",
            Some(r#"{"view":1,"default_permissions":"rwx"}"#),
        ),
        ("GET", "ext/perm.violations", None),
        ("GET", "ext/perm.capabilities", None),
    ];
    for (method, endpoint, body) in requests {
        let mut client = ApiClient::connect(&socket).unwrap();
        let response = client
            .request(method, endpoint, body.map(str::as_bytes))
            .unwrap();
        assert_eq!(response.status, 501, "{method} {endpoint}");
        let messages: Vec<String> = serde_json::from_slice(&response.body).unwrap();
        assert!(messages[0].contains("not available"), "{messages:?}");
    }
    // The body is parsed before the backend is asked: a malformed one is still a 400.
    let mut client = ApiClient::connect(&socket).unwrap();
    let response = client
        .request("PUT", "ext/perm.set", Some(br#"{"view":0}"#))
        .unwrap();
    assert_eq!(response.status, 400);
}
