//! The REST-facing surface: JSON bodies in, reports out, through `PermissionControl`, plus
//! the violation channel and the device-emulation check.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Harness, ModelHarness, Stop};
use ext_perm::api::{AssignViewRequest, CreateViewRequest, SetPermissionsRequest};
use ext_perm::{AccessKind, ManagerConfig, PermissionEvent, Permissions};

#[test]
fn json_requests_drive_the_table_and_reports_come_back() {
    let mut h = ModelHarness::new(2, ManagerConfig::default());
    let control = h.control();
    let create: CreateViewRequest =
        serde_json::from_str(r#"{"view": 3, "default_permissions": "rwx"}"#).unwrap();
    control.create_view(&create).unwrap();
    let set: SetPermissionsRequest =
        serde_json::from_str(r#"{"view": 3, "gpa": 131072, "size": 8192, "permissions": "r-x"}"#)
            .unwrap();
    control.set_permissions(&set).unwrap();
    let assign: AssignViewRequest = serde_json::from_str(r#"{"vcpu": 1, "view": 3}"#).unwrap();
    control.assign_view(&assign).unwrap();

    // Bad requests are refused, not half-applied.
    let unaligned = SetPermissionsRequest {
        gpa: 0x20001,
        ..set.clone()
    };
    assert!(control.set_permissions(&unaligned).is_err());
    assert!(control
        .assign_view(&AssignViewRequest { vcpu: 0, view: 9 })
        .is_err());
    let info = control.backend_info();
    assert_eq!(info.backend, "software-model");
    assert!(info.per_vcpu_views);

    h.write(0x10000, &[0x48, 0x89, 0x03, 0xf4]); // mov [rbx], rax; hlt
    let (stop, _) = h.run(1, 0x10000, 1, 0x21000, 0);
    assert_eq!(stop, Stop::Denied);
    let (stop, _) = h.run(0, 0x10000, 1, 0x21000, 0);
    assert_eq!(
        stop,
        Stop::Halted,
        "vCPU 0 is in view 0, where the page is writable"
    );

    let page = h.control().events(0);
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.next, 1);
    assert!(h.control().events(page.next).events.is_empty());
    let json = serde_json::to_value(&page).unwrap();
    assert_eq!(json["events"][0]["event"], "violation");
    assert_eq!(json["events"][0]["access"], "write");
    assert_eq!(json["events"][0]["gpa"], 0x21000);
    assert_eq!(json["events"][0]["view"], 3);
    assert_eq!(json["events"][0]["permissions"], "r-x");
    assert_eq!(json["stats"]["violations"], 1);
}

#[test]
fn subscribers_receive_every_event_and_devices_can_ask() {
    let mut h = ModelHarness::new(1, ManagerConfig::default());
    let manager = h.manager();
    let events = manager.subscribe();
    manager
        .set_permissions(0, 0x20..0x21, Permissions::READ)
        .unwrap();
    assert!(manager.check_access(0, 0x20000, 8, AccessKind::Read));
    assert!(!manager.check_access(0, 0x20000, 8, AccessKind::Write));
    // A device write that spans into the protected page is refused as a whole.
    assert!(!manager.check_access(0, 0x1fffc, 8, AccessKind::Write));
    assert!(manager.check_access(0, 0x1f000, 8, AccessKind::Write));

    h.write(0x10000, &[0x48, 0x89, 0x03, 0xf4]);
    let (stop, _) = h.run(0, 0x10000, 1, 0x20000, 0);
    assert_eq!(stop, Stop::Denied);
    match events.try_recv() {
        Ok(PermissionEvent::Violation(v)) => {
            assert_eq!((v.vcpu, v.access, v.gpa), (0, AccessKind::Write, 0x20000))
        }
        other => panic!("expected a violation, got {other:?}"),
    }
    assert!(events.try_recv().is_err(), "exactly one event");
}
