//! What the manager tells its subscribers and the REST layer: violations, grants, counters.

use serde::{Deserialize, Serialize};

use crate::permissions::{AccessKind, Permissions};
use crate::table::ViewId;

/// Why an access was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ViolationKind {
    /// A data read or write the view forbids.
    Data,
    /// An instruction fetch that starts in a non-executable page.
    Execute,
    /// An instruction that starts in an executable page and continues into a
    /// non-executable one, refused by policy.
    Straddle,
    /// The instruction needed a grant the backend could not run (no single-step for this
    /// CPL and the emulator does not implement it).
    Unsupported,
}

/// What was done about a denied access.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DenyOutcome {
    /// An exception was queued for the guest.
    FaultInjected,
    /// The VMM was told to stop the vCPU.
    Stopped,
}

/// One refused access.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ViolationReport {
    /// Position in the manager's event sequence.
    pub sequence: u64,
    /// Faulting vCPU.
    pub vcpu: u32,
    /// Its view.
    pub view: ViewId,
    /// The kind of access.
    pub access: AccessKind,
    /// Why it was refused.
    pub kind: ViolationKind,
    /// Guest-physical address that was refused.
    pub gpa: u64,
    /// Permissions of that page in the view.
    pub permissions: Permissions,
    /// Guest RIP at the exit.
    pub rip: u64,
    /// The instruction, when it was decoded (`"mov rax,1122334455667788h"`).
    pub instruction: Option<String>,
    /// What was done about it.
    pub outcome: DenyOutcome,
}

/// How a temporary grant ran its one instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantMethod {
    /// The page was mapped for the vCPU, other vCPUs held, one single-step, then unmapped.
    SingleStep,
    /// The instruction was executed by the software emulator; nothing was mapped.
    Emulation,
}

/// One temporary grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantReport {
    /// Position in the manager's event sequence.
    pub sequence: u64,
    /// The vCPU that ran under the grant.
    pub vcpu: u32,
    /// Its view.
    pub view: ViewId,
    /// RIP of the instruction.
    pub rip: u64,
    /// The instruction.
    pub instruction: String,
    /// Its length in bytes.
    pub length: usize,
    /// Guest frames that were granted execute.
    pub gfns: Vec<u64>,
    /// Whether it was a straddle (started in an executable page).
    pub straddle: bool,
    /// How it ran.
    pub method: GrantMethod,
    /// Whether the instruction retired (RIP moved) under the grant.
    pub retired: bool,
}

/// An event delivered to subscribers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "event")]
pub enum PermissionEvent {
    /// An access was refused.
    Violation(ViolationReport),
    /// An instruction ran under a temporary grant.
    Grant(GrantReport),
}

impl PermissionEvent {
    /// Position in the manager's event sequence.
    pub fn sequence(&self) -> u64 {
        match self {
            PermissionEvent::Violation(v) => v.sequence,
            PermissionEvent::Grant(g) => g.sequence,
        }
    }
}

/// Counters since the manager was created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PermissionStats {
    /// Exits handed to `handle_exit` that were permission exits.
    pub exits: u64,
    /// Data reads completed from backing memory.
    pub emulated_reads: u64,
    /// Data writes applied to backing memory.
    pub emulated_writes: u64,
    /// Refused accesses.
    pub violations: u64,
    /// Grants run with single-step.
    pub single_step_grants: u64,
    /// Grants run with the emulator.
    pub emulated_grants: u64,
    /// Of all grants, those for straddling instructions.
    pub straddle_grants: u64,
}
