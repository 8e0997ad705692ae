//! The API's one error type and the one table that maps what went wrong to an HTTP status.

use std::fmt;

/// What kind of failure an [`ApiError`] reports; [`ErrorKind::status`] is the only place
/// where kinds become HTTP statuses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or names something invalid (bad JSON, unsupported field,
    /// corrupt snapshot).
    BadRequest,
    /// The request needs a VM and this VMM has none (Cloud Hypervisor's "VM is not created").
    NoVm,
    /// The VM's state forbids the action (pause a paused VM, snapshot a running one, create
    /// a second VM).
    InvalidState,
    /// The endpoint exists but this VMM cannot do it (e.g. page permissions unavailable).
    NotImplemented,
    /// The VMM failed while doing something it should be able to do.
    Internal,
}

impl ErrorKind {
    /// The HTTP status of this kind of error.
    pub fn status(self) -> u16 {
        match self {
            ErrorKind::BadRequest => 400,
            ErrorKind::NoVm => 404,
            ErrorKind::InvalidState => 405,
            ErrorKind::NotImplemented => 501,
            ErrorKind::Internal => 500,
        }
    }
}

/// An error the VMM answers a request with: its kind and human-readable messages,
/// outermost first. The server writes it as the status of its kind and a JSON array of
/// strings, as Cloud Hypervisor does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiError {
    /// What went wrong, which decides the status.
    pub kind: ErrorKind,
    /// Messages, outermost first.
    pub messages: Vec<String>,
}

impl ApiError {
    /// An error of `kind` with one message.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        ApiError {
            kind,
            messages: vec![message.into()],
        }
    }

    /// A 400 with one message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    /// A 400 with a message and its cause.
    pub fn bad_request_with(message: impl Into<String>, cause: impl Into<String>) -> Self {
        ApiError {
            kind: ErrorKind::BadRequest,
            messages: vec![message.into(), cause.into()],
        }
    }

    /// A request that needs a VM when none exists.
    pub fn no_vm() -> Self {
        Self::new(ErrorKind::NoVm, "VM is not created")
    }

    /// The VM is in a state that forbids `action`; `state` is said in the message.
    pub fn invalid_state(action: &str, state: impl fmt::Debug) -> Self {
        Self::new(
            ErrorKind::InvalidState,
            format!("cannot {action}: VM is {state:?}"),
        )
    }

    /// The endpoint exists but this VMM does not offer it.
    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotImplemented, message)
    }

    /// A failure inside the VMM.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, message)
    }

    /// The HTTP status this error is answered with.
    pub fn status(&self) -> u16 {
        self.kind.status()
    }
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.messages.join(": "))
    }
}

impl std::error::Error for ApiError {}
