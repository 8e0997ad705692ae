//! The layout of a Cloud Hypervisor snapshot directory, read from its `state.json`.
//!
//! Cloud Hypervisor (`vm.snapshot` + `vm.restore`) writes three files into a directory:
//! `config.json` (the `VmConfig`), `state.json` (a tree of component snapshots whose payloads
//! are JSON documents embedded as strings) and `memory-ranges` (guest memory). The memory
//! manager's payload, under the `memory-manager` key, carries `memory_ranges`: the guest
//! physical ranges whose bytes were saved, concatenated in table order into `memory-ranges`,
//! and `guest_ram_mappings`: the guest RAM regions. Only those two fields matter here; every
//! other byte of both JSON files is kept verbatim so an export can give them back unchanged.

use serde::Deserialize;

use super::ChError;

/// Key of the memory manager in Cloud Hypervisor's snapshot tree.
pub const MEMORY_MANAGER_ID: &str = "memory-manager";
/// Name of the VM configuration file in a snapshot directory.
pub const CONFIG_FILE: &str = "config.json";
/// Name of the component state file in a snapshot directory.
pub const STATE_FILE: &str = "state.json";
/// Name of the guest memory file in a snapshot directory.
pub const MEMORY_RANGES_FILE: &str = "memory-ranges";

/// A guest physical range, as Cloud Hypervisor's `MemoryRange` serializes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct MemoryRange {
    /// Guest physical address of the first byte.
    pub gpa: u64,
    /// Length in bytes.
    pub length: u64,
}

/// A guest RAM region: what the memory manager mapped into the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamRegion {
    /// Guest physical address of the region.
    pub gpa: u64,
    /// Size of the region in bytes.
    pub size: u64,
}

/// What a snapshot directory says about guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    /// Guest RAM regions, sorted by address, non-overlapping.
    pub regions: Vec<RamRegion>,
    /// Saved ranges in the order their bytes follow each other in `memory-ranges`.
    pub ranges: Vec<MemoryRange>,
}

impl MemoryLayout {
    /// Total bytes the ranges occupy in `memory-ranges` (its expected length).
    pub fn saved_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.length).sum()
    }

    /// Offset of each range in `memory-ranges`, in table order.
    pub fn file_offsets(&self) -> Vec<u64> {
        let mut offset = 0;
        self.ranges
            .iter()
            .map(|r| {
                let start = offset;
                offset += r.length;
                start
            })
            .collect()
    }
}

#[derive(Deserialize)]
struct SnapshotNode {
    #[serde(default)]
    snapshots: std::collections::BTreeMap<String, SnapshotNode>,
    #[serde(default)]
    snapshot_data: Option<SnapshotPayload>,
}

#[derive(Deserialize)]
struct SnapshotPayload {
    state: String,
}

#[derive(Deserialize)]
struct MemoryManagerState {
    memory_ranges: RangeTable,
    #[serde(default)]
    guest_ram_mappings: Vec<GuestRamMapping>,
}

#[derive(Deserialize)]
struct RangeTable {
    data: Vec<MemoryRange>,
}

#[derive(Deserialize)]
struct GuestRamMapping {
    gpa: u64,
    size: u64,
}

/// Reads the memory layout out of a `state.json` document.
///
/// Fails when the memory manager is missing, its payload is not the JSON Cloud Hypervisor
/// writes, or the ranges and regions are inconsistent (overlapping regions, a range outside
/// every region, a range or region that is empty, unaligned to `page_size` or overflows).
/// Without `guest_ram_mappings` (an older writer) the regions are the saved ranges merged.
pub fn parse_state(state_json: &[u8], page_size: u64) -> Result<MemoryLayout, ChError> {
    let root: SnapshotNode = serde_json::from_slice(state_json).map_err(ChError::StateJson)?;
    let payload = root
        .snapshots
        .get(MEMORY_MANAGER_ID)
        .and_then(|node| node.snapshot_data.as_ref())
        .ok_or(ChError::NoMemoryManager)?;
    let state: MemoryManagerState =
        serde_json::from_str(&payload.state).map_err(ChError::StateJson)?;

    let ranges = state.memory_ranges.data;
    for range in &ranges {
        check_extent(range.gpa, range.length, page_size)?;
    }
    let mut regions: Vec<RamRegion> = if state.guest_ram_mappings.is_empty() {
        merged_ranges(&ranges)
    } else {
        state
            .guest_ram_mappings
            .iter()
            .map(|m| RamRegion {
                gpa: m.gpa,
                size: m.size,
            })
            .collect()
    };
    regions.sort_by_key(|r| r.gpa);
    for region in &regions {
        check_extent(region.gpa, region.size, page_size)?;
    }
    for pair in regions.windows(2) {
        if pair[0].gpa + pair[0].size > pair[1].gpa {
            return Err(ChError::Inconsistent(format!(
                "guest RAM regions at {:#x} and {:#x} overlap",
                pair[0].gpa, pair[1].gpa
            )));
        }
    }
    for range in &ranges {
        let inside = regions
            .iter()
            .any(|r| range.gpa >= r.gpa && range.gpa + range.length <= r.gpa + r.size);
        if !inside {
            return Err(ChError::Inconsistent(format!(
                "saved range {:#x}+{:#x} lies outside guest RAM",
                range.gpa, range.length
            )));
        }
    }
    Ok(MemoryLayout { regions, ranges })
}

fn check_extent(gpa: u64, length: u64, page_size: u64) -> Result<(), ChError> {
    if length == 0 || gpa % page_size != 0 || length % page_size != 0 {
        return Err(ChError::Inconsistent(format!(
            "range {gpa:#x}+{length:#x} is empty or not aligned to {page_size:#x}"
        )));
    }
    if gpa.checked_add(length).is_none() {
        return Err(ChError::Inconsistent(format!(
            "range {gpa:#x}+{length:#x} overflows"
        )));
    }
    Ok(())
}

fn merged_ranges(ranges: &[MemoryRange]) -> Vec<RamRegion> {
    let mut sorted: Vec<MemoryRange> = ranges.to_vec();
    sorted.sort_by_key(|r| r.gpa);
    let mut regions: Vec<RamRegion> = Vec::new();
    for range in sorted {
        match regions.last_mut() {
            Some(last) if range.gpa <= last.gpa + last.size => {
                let end = (range.gpa + range.length).max(last.gpa + last.size);
                last.size = end - last.gpa;
            }
            _ => regions.push(RamRegion {
                gpa: range.gpa,
                size: range.length,
            }),
        }
    }
    regions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(ranges: &str, mappings: &str) -> Vec<u8> {
        let inner = format!(
            r#"{{"memory_ranges":{{"data":{ranges}}},"guest_ram_mappings":{mappings},"boot_ram":0}}"#
        );
        serde_json::to_vec(&serde_json::json!({
            "snapshots": {
                "memory-manager": {"snapshots": {}, "snapshot_data": {"state": inner}},
                "cpu-manager": {"snapshots": {}, "snapshot_data": {"state": "{}"}}
            },
            "snapshot_data": {"state": "{}"}
        }))
        .unwrap()
    }

    #[test]
    fn parses_ranges_in_table_order() {
        let json = state(
            r#"[{"gpa":8192,"length":4096},{"gpa":0,"length":4096}]"#,
            r#"[{"slot":0,"gpa":0,"size":16384,"zone_id":"mem0","virtio_mem":false,"file_offset":0}]"#,
        );
        let layout = parse_state(&json, 4096).unwrap();
        assert_eq!(layout.ranges[0].gpa, 8192);
        assert_eq!(layout.file_offsets(), vec![0, 4096]);
        assert_eq!(
            layout.regions,
            vec![RamRegion {
                gpa: 0,
                size: 16384
            }]
        );
    }

    #[test]
    fn rejects_range_outside_ram() {
        let json = state(
            r#"[{"gpa":16384,"length":4096}]"#,
            r#"[{"slot":0,"gpa":0,"size":16384,"zone_id":"mem0","virtio_mem":false,"file_offset":0}]"#,
        );
        assert!(matches!(
            parse_state(&json, 4096),
            Err(ChError::Inconsistent(_))
        ));
    }

    #[test]
    fn rejects_unaligned_and_missing_manager() {
        let json = state(r#"[{"gpa":1,"length":4096}]"#, "[]");
        assert!(parse_state(&json, 4096).is_err());
        assert!(matches!(
            parse_state(br#"{"snapshots":{}}"#, 4096),
            Err(ChError::NoMemoryManager)
        ));
    }

    #[test]
    fn regions_fall_back_to_merged_ranges() {
        let json = state(
            r#"[{"gpa":4096,"length":4096},{"gpa":0,"length":4096},{"gpa":65536,"length":4096}]"#,
            "[]",
        );
        let layout = parse_state(&json, 4096).unwrap();
        assert_eq!(
            layout.regions,
            vec![
                RamRegion { gpa: 0, size: 8192 },
                RamRegion {
                    gpa: 65536,
                    size: 4096
                }
            ]
        );
    }
}
