//! What this process last did with guest memory snapshots, for the patched binary's
//! `GET /api/v1/ext/vm.snapshot-figures` (Cloud Hypervisor's own API reports none of it).

use std::sync::{Mutex, PoisonError};

use serde::Serialize;

use crate::SnapshotFigures;

/// The last snapshot written and the last restore made by this process.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Figures {
    /// The last `vm.snapshot`'s memory file, if any.
    pub snapshot: Option<Record>,
    /// The last restore's memory file, if any.
    pub restore: Option<Record>,
}

/// One memory file and what it holds.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// The file.
    pub path: String,
    /// `snapshot`, or the restore mode (`copy`, `ondemand`).
    pub mode: &'static str,
    /// Pages by type, file size, and the write's seconds (a snapshot) or the copy's seconds
    /// (a copy restore; 0 for ondemand, which copies as the guest faults).
    pub figures: SnapshotFigures,
    /// Data pages written into memory by a copy restore.
    pub pages_copied: Option<u64>,
}

static LAST: Mutex<Figures> = Mutex::new(Figures {
    snapshot: None,
    restore: None,
});

pub(crate) fn record_snapshot(record: Record) {
    LAST.lock().unwrap_or_else(PoisonError::into_inner).snapshot = Some(record);
}

pub(crate) fn record_restore(record: Record) {
    LAST.lock().unwrap_or_else(PoisonError::into_inner).restore = Some(record);
}

/// The figures now.
pub fn last() -> Figures {
    LAST.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// [`last`] as the endpoint's JSON body.
pub fn json() -> String {
    serde_json::to_string(&last()).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
}
