//! What the last snapshot or restore of a VM did (pages by type, bytes, seconds), kept by
//! [`crate::Vmm`] for `vm.info` and `vm.counters`; filled by `checkpoint.rs` (snapshots) and
//! `restored_memory.rs` (restores).

/// What the last snapshot or restore of this VMM did, for `vm.info` and `vm.counters`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SnapshotFigures {
    /// Pages by type (`unpopulated`, `invalid`, `zero`, `data`, `same_as_parent`).
    pub pages: [u64; 5],
    /// Bytes of the memory file (snapshot) or of data copied/mapped (restore).
    pub bytes: u64,
    /// Bytes the filesystem allocated for the memory file (snapshot only).
    pub allocated_bytes: u64,
    /// Seconds ext-snapshot spent on the memory file (typing and writing, or restoring).
    pub memory_seconds: f64,
    /// Wall-clock seconds of the whole operation (vCPU and device state included).
    pub seconds: f64,
}

impl SnapshotFigures {
    /// Name/value pairs for `vm.counters` (seconds in microseconds, counters are integers).
    pub fn counters(&self) -> Vec<(String, u64)> {
        let mut out: Vec<(String, u64)> = PAGE_TYPE_NAMES
            .iter()
            .zip(self.pages)
            .map(|(name, pages)| (format!("{name}_pages"), pages))
            .collect();
        out.push(("bytes".into(), self.bytes));
        out.push(("allocated_bytes".into(), self.allocated_bytes));
        out.push(("memory_micros".into(), (self.memory_seconds * 1e6) as u64));
        out.push(("micros".into(), (self.seconds * 1e6) as u64));
        out
    }

    /// The figures as JSON for `vm.info`.
    pub fn to_json(&self) -> serde_json::Value {
        let pages: serde_json::Map<String, serde_json::Value> = PAGE_TYPE_NAMES
            .iter()
            .zip(self.pages)
            .map(|(name, pages)| (name.to_string(), pages.into()))
            .collect();
        serde_json::json!({
            "pages": pages,
            "bytes": self.bytes,
            "allocated_bytes": self.allocated_bytes,
            "memory_seconds": self.memory_seconds,
            "seconds": self.seconds,
        })
    }
}

/// Page type names in `PageType as usize` order.
const PAGE_TYPE_NAMES: [&str; 5] = ["unpopulated", "invalid", "zero", "data", "same_as_parent"];
