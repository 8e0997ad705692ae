//! One behavioural suite, two backends: every scenario runs the same x86-64 machine code on
//! the software model (the oracle) and on a real KVM VM with the memslot backend, and checks
//! guest-visible results (memory, registers, where the vCPU stopped) plus the reports.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Harness, KvmHarness, ModelHarness, Stop};
use ext_perm::api::{AssignViewRequest, CreateViewRequest, SetPermissionsRequest};
use ext_perm::report::ViolationKind;
use ext_perm::{
    AccessKind, GrantMethod, GrantPreference, ManagerConfig, PermissionEvent, Permissions,
    StraddlePolicy, PAGE_SIZE,
};

const CODE: u64 = 0x10000;
const CODE_HLT: u64 = 0x10800;
const DATA: u64 = 0x20000;
const TARGET: u64 = 0x21000;
const PAGE_B: u64 = 0x31000;
const STRADDLE_START: u64 = PAGE_B - 3;
const AFTER_STRADDLE: u64 = STRADDLE_START + 10;
const IMMEDIATE: u64 = 0x1122_3344_5566_7788;

const HLT: u8 = 0xf4;
const NOP: u8 = 0x90;

fn protect(h: &dyn Harness, view: u16, gpa: u64, permissions: &str) {
    h.control()
        .set_permissions(&SetPermissionsRequest {
            view,
            gpa,
            size: PAGE_SIZE,
            permissions: permissions.parse().unwrap(),
        })
        .unwrap();
}

fn events(h: &dyn Harness) -> Vec<PermissionEvent> {
    h.control().events(0).events
}

fn last_violation(h: &dyn Harness) -> ext_perm::ViolationReport {
    events(h)
        .into_iter()
        .rev()
        .find_map(|e| match e {
            PermissionEvent::Violation(v) => Some(v),
            _ => None,
        })
        .expect("a violation was reported")
}

fn grants(h: &dyn Harness) -> Vec<ext_perm::GrantReport> {
    events(h)
        .into_iter()
        .filter_map(|e| match e {
            PermissionEvent::Grant(g) => Some(g),
            _ => None,
        })
        .collect()
}

/// Page A (executable) ends with `nop`s and the first 3 bytes of `mov rax, imm64`; page B
/// holds the other 7 bytes and then `hlt`.
fn place_straddle(h: &dyn Harness) {
    let mut code = vec![NOP; (STRADDLE_START - (PAGE_B - 16)) as usize];
    code.extend_from_slice(&[0x48, 0xb8]);
    code.extend_from_slice(&IMMEDIATE.to_le_bytes());
    code.push(HLT);
    h.write(PAGE_B - 16, &code);
}

fn write_protected_page(h: &mut dyn Harness) {
    h.write(DATA, &0x1111u64.to_le_bytes());
    h.write(CODE, &[0x48, 0x89, 0x03, HLT]); // mov [rbx], rax; hlt
    protect(h, 0, DATA, "r-x");
    let (stop, _) = h.run(0, CODE, 0xdead_beef, DATA, 0);
    assert_eq!(stop, Stop::Denied, "{}", h.name());
    assert_eq!(
        h.read_u64(DATA),
        0x1111,
        "{}: denied write was applied",
        h.name()
    );
    let v = last_violation(h);
    assert_eq!(
        (v.access, v.kind, v.gpa),
        (AccessKind::Write, ViolationKind::Data, DATA)
    );
    assert_eq!(v.permissions, Permissions::READ_EXECUTE);

    // Readable and writable but not executable: on KVM unbacked, the write is emulated.
    protect(h, 0, DATA, "rw-");
    let (stop, _) = h.run(0, CODE, 0xdead_beef, DATA, 0);
    assert_eq!(stop, Stop::Halted, "{}", h.name());
    assert_eq!(h.read_u64(DATA), 0xdead_beef, "{}", h.name());
}

fn read_of_unmapped_page(h: &mut dyn Harness) {
    let value = 0x1234_5678_9abc_def0u64;
    h.write(DATA, &value.to_le_bytes());
    h.write(CODE, &[0x48, 0x8b, 0x03, HLT]); // mov rax, [rbx]; hlt
    protect(h, 0, DATA, "rw-");
    let (stop, regs) = h.run(0, CODE, 7, DATA, 0);
    assert_eq!(stop, Stop::Halted, "{}", h.name());
    assert_eq!(
        regs.gprs[0],
        value,
        "{}: emulated read returned the wrong value",
        h.name()
    );

    protect(h, 0, DATA, "---");
    let (stop, regs) = h.run(0, CODE, 7, DATA, 0);
    assert_eq!(stop, Stop::Denied, "{}", h.name());
    // A refused read retires with all-ones (KVM has decoded the instruction by then).
    assert_eq!(
        regs.gprs[0],
        u64::MAX,
        "{}: denied read reached RAX",
        h.name()
    );
    assert_eq!(regs.rip, CODE + 3, "{}", h.name());
    let v = last_violation(h);
    assert_eq!((v.access, v.gpa), (AccessKind::Read, DATA));
}

fn jump_into_non_executable_page(h: &mut dyn Harness) {
    h.write(TARGET, &[0xb8, 0x77, 0, 0, 0, HLT]); // mov eax, 0x77; hlt
    h.write(CODE, &[0xff, 0xe3]); // jmp rbx
    protect(h, 0, TARGET, "rw-");
    let (stop, regs) = h.run(0, CODE, 5, TARGET, 0);
    assert_eq!(stop, Stop::Denied, "{}", h.name());
    assert_eq!(regs.rip, TARGET, "{}", h.name());
    assert_eq!(
        regs.gprs[0],
        5,
        "{}: code in a non-executable page ran",
        h.name()
    );
    let v = last_violation(h);
    assert_eq!(
        (v.access, v.kind, v.gpa),
        (AccessKind::Execute, ViolationKind::Execute, TARGET)
    );
}

fn straddle_runs_once_under_grant(h: &mut dyn Harness, method: GrantMethod) {
    place_straddle(h);
    protect(h, 0, PAGE_B, "rw-");
    let (stop, regs) = h.run(0, PAGE_B - 16, 0, 0, 0);
    // The straddling mov ran once; the `hlt` right after it, in page B, was refused: the page
    // was non-executable again immediately after the instruction.
    assert_eq!(stop, Stop::Denied, "{}", h.name());
    assert_eq!(
        regs.gprs[0],
        IMMEDIATE,
        "{}: straddling mov did not run",
        h.name()
    );
    assert_eq!(regs.rip, AFTER_STRADDLE, "{}", h.name());
    let g = grants(h);
    assert_eq!(g.len(), 1, "{}: {g:?}", h.name());
    assert!(g[0].straddle && g[0].retired, "{}: {g:?}", h.name());
    assert_eq!(
        (g[0].rip, g[0].length, g[0].method),
        (STRADDLE_START, 10, method)
    );
    assert_eq!(g[0].gfns, vec![PAGE_B / PAGE_SIZE]);
    let v = last_violation(h);
    assert_eq!((v.kind, v.gpa), (ViolationKind::Execute, AFTER_STRADDLE));
    assert_eq!(h.control().events(0).stats.straddle_grants, 1);
}

fn straddle_single_step(h: &mut dyn Harness) {
    straddle_runs_once_under_grant(h, GrantMethod::SingleStep)
}

fn straddle_emulated(h: &mut dyn Harness) {
    straddle_runs_once_under_grant(h, GrantMethod::Emulation)
}

fn denied_straddle_never_executes(h: &mut dyn Harness) {
    place_straddle(h);
    protect(h, 0, PAGE_B, "rw-");
    let (stop, regs) = h.run(0, PAGE_B - 16, 0, 0, 0);
    assert_eq!(stop, Stop::Denied, "{}", h.name());
    assert_eq!(regs.gprs[0], 0, "{}: denied straddle executed", h.name());
    assert_eq!(regs.rip, STRADDLE_START, "{}", h.name());
    let v = last_violation(h);
    assert_eq!((v.kind, v.gpa), (ViolationKind::Straddle, PAGE_B));
    assert!(grants(h).is_empty());
}

fn two_vcpus_in_two_views(h: &mut dyn Harness) {
    let c = h.control();
    c.create_view(&CreateViewRequest {
        view: 1,
        default_permissions: Permissions::ALL,
    })
    .unwrap();
    c.assign_view(&AssignViewRequest { vcpu: 1, view: 1 })
        .unwrap();
    protect(h, 0, DATA, "r-x");
    protect(h, 0, TARGET, "rw-");
    h.write(DATA, &0x1111u64.to_le_bytes());
    h.write(CODE, &[0x48, 0x89, 0x03, HLT]); // mov [rbx], rax; hlt
    h.write(CODE + 0x100, &[0x48, 0x8b, 0x03, HLT]); // mov rax, [rbx]; hlt
    h.write(CODE + 0x200, &[0xff, 0xe3]); // jmp rbx
    h.write(TARGET, &[0xb8, 0x77, 0, 0, 0, 0xff, 0xe1]); // mov eax, 0x77; jmp rcx
    h.write(CODE_HLT, &[HLT]);

    // Same page, same instruction: refused for vCPU 0, performed for vCPU 1.
    let (stop, _) = h.run(0, CODE, 0xaaaa, DATA, 0);
    assert_eq!(stop, Stop::Denied, "{}", h.name());
    assert_eq!(h.read_u64(DATA), 0x1111);
    let (stop, _) = h.run(1, CODE, 0xbbbb, DATA, 0);
    assert_eq!(stop, Stop::Halted, "{}", h.name());
    assert_eq!(
        h.read_u64(DATA),
        0xbbbb,
        "{}: vCPU 1's write was lost",
        h.name()
    );
    let (stop, regs) = h.run(0, CODE + 0x100, 0, DATA, 0);
    assert_eq!((stop, regs.gprs[0]), (Stop::Halted, 0xbbbb), "{}", h.name());

    // Execution: the page is executable only in view 1.
    let (stop, regs) = h.run(0, CODE + 0x200, 5, TARGET, CODE_HLT);
    assert_eq!((stop, regs.gprs[0]), (Stop::Denied, 5), "{}", h.name());
    let (stop, regs) = h.run(1, CODE + 0x200, 5, TARGET, CODE_HLT);
    assert_eq!(stop, Stop::Halted, "{}", h.name());
    assert_eq!(
        regs.gprs[0],
        0x77,
        "{}: vCPU 1 could not execute its page",
        h.name()
    );
    assert_eq!(regs.rip, CODE_HLT + 1, "{}", h.name());
}

fn execute_only_page(h: &mut dyn Harness) {
    h.write(TARGET, &[0xb8, 0x77, 0, 0, 0, 0xff, 0xe1]); // mov eax, 0x77; jmp rcx
    h.write(CODE_HLT, &[HLT]);
    h.write(CODE, &[0xff, 0xe3]); // jmp rbx
    h.write(CODE + 0x100, &[0x48, 0x8b, 0x03, HLT]); // mov rax, [rbx]; hlt
    h.write(CODE + 0x200, &[0x48, 0x89, 0x03, HLT]); // mov [rbx], rax; hlt
    let before = h.read_u64(TARGET);
    protect(h, 0, TARGET, "--x");
    let (stop, regs) = h.run(0, CODE, 5, TARGET, CODE_HLT);
    assert_eq!((stop, regs.gprs[0]), (Stop::Halted, 0x77), "{}", h.name());
    let (stop, regs) = h.run(0, CODE + 0x100, 5, TARGET, 0);
    assert_eq!(
        (stop, regs.gprs[0]),
        (Stop::Denied, u64::MAX),
        "{}: execute-only page was read",
        h.name()
    );
    let v = last_violation(h);
    assert_eq!((v.access, v.gpa), (AccessKind::Read, TARGET));
    let (stop, _) = h.run(0, CODE + 0x200, 5, TARGET, 0);
    assert_eq!(stop, Stop::Denied, "{}", h.name());
    assert_eq!(
        h.read_u64(TARGET),
        before,
        "{}: execute-only page was written",
        h.name()
    );
}

fn straddle_config(preference: GrantPreference) -> ManagerConfig {
    ManagerConfig {
        grant: preference,
        ..Default::default()
    }
}

macro_rules! suite {
    ($($name:ident => $config:expr;)*) => {
        mod software_model {
            use super::*;
            $(
                #[test]
                fn $name() {
                    super::$name(&mut ModelHarness::new(2, $config));
                }
            )*
        }
        mod kvm_memslot {
            use super::*;
            $(
                #[test]
                fn $name() {
                    if let Some(mut h) = KvmHarness::new(stringify!($name), 2, $config) {
                        super::$name(&mut h);
                    }
                }
            )*
        }
    };
}

suite! {
    write_protected_page => ManagerConfig::default();
    read_of_unmapped_page => ManagerConfig::default();
    jump_into_non_executable_page => ManagerConfig::default();
    straddle_single_step => straddle_config(GrantPreference::SingleStep);
    straddle_emulated => straddle_config(GrantPreference::Emulation);
    denied_straddle_never_executes => ManagerConfig {
        straddle: StraddlePolicy::Deny,
        ..Default::default()
    };
    two_vcpus_in_two_views => ManagerConfig::default();
    execute_only_page => ManagerConfig::default();
}
