//! Policy: what a refusal does, whether straddles are granted, and how grants run.

/// What a denied access does to the vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DenyAction {
    /// Queue an exception (for example #GP(0): vector 13, error code 0) and resume.
    ///
    /// On mainline KVM the data-access exits are delivered after KVM decoded the instruction;
    /// a refused write is dropped and a refused read returns all-ones, and the exception is
    /// delivered at the next instruction boundary, not as a restartable fault.
    InjectException {
        /// Exception vector.
        vector: u8,
        /// Error code pushed with it, if the vector has one.
        error_code: Option<u32>,
    },
    /// Tell the VMM to stop the vCPU (RIP stays at the fetch for execute violations).
    Stop,
}

/// Whether straddling instructions run under a grant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StraddlePolicy {
    /// Run them once under a temporary grant (the patent's behaviour).
    Grant,
    /// Refuse them as violations.
    Deny,
}

/// How a grant runs its one instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantPreference {
    /// Single-step where the backend supports it for the vCPU's CPL, else emulate.
    Auto,
    /// Always single-step (refuse when not supported).
    SingleStep,
    /// Emulate, falling back to single-step for instructions the emulator lacks.
    Emulation,
}

/// Manager policy.
#[derive(Clone, Copy, Debug)]
pub struct ManagerConfig {
    /// What a denied access does.
    pub deny_action: DenyAction,
    /// Whether straddles are granted.
    pub straddle: StraddlePolicy,
    /// How grants run.
    pub grant: GrantPreference,
    /// How many recent events [`PermissionManager::events_since`] keeps.
    pub event_capacity: usize,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        Self {
            deny_action: DenyAction::Stop,
            straddle: StraddlePolicy::Grant,
            grant: GrantPreference::Auto,
            event_capacity: 4096,
        }
    }
}
