//! Saved state of a virtio-mmio transport and its device: negotiated features, status,
//! register selectors, pending interrupt bits, and every queue's addresses and ring indices
//! (so the driver and device continue on the same descriptors after a restore).

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

/// One virtqueue: virtio-queue's `QueueState`, made serializable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size the device offers.
    pub max_size: u16,
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` in use.
    pub event_idx_enabled: bool,
    /// Size the driver chose.
    pub size: u16,
    /// The driver marked the queue ready.
    pub ready: bool,
    /// Guest-physical address of the descriptor table.
    pub desc_table: u64,
    /// Guest-physical address of the available ring.
    pub avail_ring: u64,
    /// Guest-physical address of the used ring.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        QueueSnapshot {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<&QueueSnapshot> for QueueState {
    fn from(q: &QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio-mmio transport and the state of the device behind it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    /// Virtio device type (checked against the device the restored VM builds).
    pub device_type: u32,
    /// Device status register.
    pub status: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// `DeviceFeaturesSel`.
    pub device_features_select: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_select: u32,
    /// `QueueSel`.
    pub queue_select: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// `InterruptStatus` bits the driver has not acknowledged yet.
    pub interrupt_status: u32,
    /// The device was activated (`DRIVER_OK`) and owns the queues.
    pub activated: bool,
    /// Every queue in device order (held by the transport before activation, by the device
    /// after).
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state ([`super::VirtioDevice::save_state`]), absent in snapshots of
    /// devices without any (and in snapshots written before the field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<serde_json::Value>,
}
