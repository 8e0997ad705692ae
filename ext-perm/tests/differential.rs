//! Differential test: random permission layouts in two views, random guest accesses, run on
//! the software model (the oracle) and on `/dev/kvm`; the guest-visible outcome (how the
//! vCPU stopped, RAX, RIP, the data words) must be identical.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::guest::kvm_available;
use common::{Harness, KvmHarness, ModelHarness, Stop};
use ext_perm::api::{AssignViewRequest, CreateViewRequest, SetPermissionsRequest};
use ext_perm::{GrantPreference, ManagerConfig, Permissions, PAGE_SIZE};
use proptest::prelude::*;

const CODE: u64 = 0x10000;
const CODE_HLT: u64 = 0x10800;
/// Three consecutive pages whose permissions the test draws.
const PAGES: [u64; 3] = [0x20000, 0x21000, 0x22000];
const IMMEDIATE: u64 = 0x0102_0304_0506_0708;

#[derive(Clone, Copy, Debug)]
enum Access {
    Read(usize),
    Write(usize),
    Jump(usize),
    /// The straddling `mov rax, imm64` that starts 3 bytes before page `i` (i = 1 or 2).
    Straddle(usize),
}

fn permissions(bits: u8) -> Permissions {
    Permissions::new(bits & 1 != 0, bits & 2 != 0, bits & 4 != 0)
}

fn setup(h: &mut dyn Harness, view0: [u8; 3], view1: [u8; 3]) {
    h.write(CODE, &[0x48, 0x8b, 0x03, 0xf4]); // mov rax, [rbx]; hlt
    h.write(CODE + 0x10, &[0x48, 0x89, 0x03, 0xf4]); // mov [rbx], rax; hlt
    h.write(CODE + 0x20, &[0xff, 0xe3]); // jmp rbx
    h.write(CODE_HLT, &[0xf4]);
    for (i, &page) in PAGES.iter().enumerate() {
        h.write(page + 0x100, &[0xb8, 0x77, 0, 0, 0, 0xff, 0xe1]); // mov eax, 0x77; jmp rcx
        h.write(page + 0x800, &(0x1000 + i as u64).to_le_bytes());
        if i > 0 {
            let mut straddle = vec![0x48, 0xb8];
            straddle.extend_from_slice(&IMMEDIATE.to_le_bytes());
            straddle.extend_from_slice(&[0xff, 0xe1]); // jmp rcx, at page + 7
            h.write(page - 3, &straddle);
        }
    }
    let c = h.control();
    c.create_view(&CreateViewRequest {
        view: 1,
        default_permissions: Permissions::ALL,
    })
    .unwrap();
    c.assign_view(&AssignViewRequest { vcpu: 1, view: 1 })
        .unwrap();
    for (view, bits) in [(0u16, view0), (1, view1)] {
        for (i, &page) in PAGES.iter().enumerate() {
            c.set_permissions(&SetPermissionsRequest {
                view,
                gpa: page,
                size: PAGE_SIZE,
                permissions: permissions(bits[i]),
            })
            .unwrap();
        }
    }
}

type Outcome = (Stop, u64, u64, [u64; 3]);

fn run(h: &mut dyn Harness, vcpu: u32, access: Access) -> Outcome {
    let (rip, rbx) = match access {
        Access::Read(i) => (CODE, PAGES[i] + 0x800),
        Access::Write(i) => (CODE + 0x10, PAGES[i] + 0x800),
        Access::Jump(i) => (CODE + 0x20, PAGES[i] + 0x100),
        Access::Straddle(i) => (PAGES[i] - 3, 0),
    };
    let (stop, regs) = h.run(vcpu, rip, 0x5555, rbx, CODE_HLT);
    let words = PAGES.map(|p| h.read_u64(p + 0x800));
    (stop, regs.gprs[0], regs.rip, words)
}

fn access() -> impl Strategy<Value = Access> {
    prop_oneof![
        (0usize..3).prop_map(Access::Read),
        (0usize..3).prop_map(Access::Write),
        (0usize..3).prop_map(Access::Jump),
        (1usize..3).prop_map(Access::Straddle),
    ]
}

#[test]
fn model_and_kvm_agree_on_random_layouts() {
    if !kvm_available() {
        // .ci/run sets EXT_REQUIRE_ALL=1: there a missing environment is a failure.
        assert!(
            std::env::var("EXT_REQUIRE_ALL").as_deref() != Ok("1"),
            "EXT_REQUIRE_ALL=1, but this test would be skipped: {}",
            format_args!("SKIPPED: model_and_kvm_agree_on_random_layouts: /dev/kvm not available")
        );
        println!("SKIPPED: model_and_kvm_agree_on_random_layouts: /dev/kvm not available");
        return;
    }
    let strategy = (
        [0u8..8, 0u8..8, 0u8..8],
        [0u8..8, 0u8..8, 0u8..8],
        0u32..2,
        access(),
        any::<bool>(),
    );
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig::with_cases(64));
    runner
        .run(&strategy, |(view0, view1, vcpu, access, emulate)| {
            let config = ManagerConfig {
                grant: if emulate {
                    GrantPreference::Emulation
                } else {
                    GrantPreference::SingleStep
                },
                ..Default::default()
            };
            let mut model = ModelHarness::new(2, config);
            setup(&mut model, view0, view1);
            let expected = run(&mut model, vcpu, access);
            let mut kvm = KvmHarness::new("model_and_kvm_agree_on_random_layouts", 2, config)
                .expect("/dev/kvm checked above");
            setup(&mut kvm, view0, view1);
            let actual = run(&mut kvm, vcpu, access);
            prop_assert_eq!(
                &actual,
                &expected,
                "view0 {:?} view1 {:?} vcpu {} {:?}",
                view0.map(permissions),
                view1.map(permissions),
                vcpu,
                access
            );
            Ok(())
        })
        .unwrap();
}
