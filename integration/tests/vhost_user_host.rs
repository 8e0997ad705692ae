//! ext-vmm's vhost-user frontend (`--generic-vhost-user`) against the real `vhost-user-mem`
//! daemon process, over its real unix socket, on shared memfd guest memory. The test plays the
//! guest driver on virtio-queue's mock split queues (no KVM needed): it negotiates the balloon
//! features the daemon offers through the frontend, inflates pages, has the daemon resize the
//! balloon (the config-change message must reach the frontend as a config interrupt), kills the
//! daemon (the device stops, the disconnect is counted), starts it again (the frontend
//! reconnects and the queue goes on from the used index in guest memory).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ext_vmm::memory::{create_guest_memory, GuestRam};
use ext_vmm::virtio::vhost_user::{VhostUserConfig, VhostUserDevice};
use ext_vmm::virtio::{ActivateContext, VirtioDevice, VirtioInterrupt};
use ext_vmm_api::ApiClient;
use ext_vmm_tests::common::{skip, wait_for};
use ext_vmm_tests::daemon::{daemon_binary, Daemon};
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const STATS_VQ: u64 = 1 << 1;
const DEFLATE_ON_OOM: u64 = 1 << 2;
const REPORTING: u64 = 1 << 5;
const VERSION_1: u64 = 1 << 32;
const LIMIT: Duration = Duration::from_secs(20);

fn counter(device: &VhostUserDevice, name: &str) -> u64 {
    device
        .counters()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
        .unwrap()
}

fn readable(addr: u64, len: u32) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, 0, 0))
}

/// Puts an inflate request for `pfns` at descriptor `slot`, with its PFN array at `buffer`.
fn inflate(mem: &GuestRam, vq: &MockSplitQueue<GuestRam>, slot: u16, buffer: u64, pfns: &[u32]) {
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(buffer)).unwrap();
    vq.add_desc_chains(&[readable(buffer, bytes.len() as u32)], slot)
        .unwrap();
}

fn api_put(api: &Path, endpoint: &str, body: &str) {
    let mut client = ApiClient::connect(api).unwrap();
    let response = client
        .request("PUT", endpoint, Some(body.as_bytes()))
        .unwrap();
    assert!(
        response.is_success(),
        "{endpoint}: {}",
        response.body_text()
    );
}

#[test]
fn frontend_negotiates_relays_and_reconnects() {
    let Some(binary) = daemon_binary() else {
        if skip(
            "frontend_negotiates_relays_and_reconnects",
            "the vhost-user-mem binary (cargo build -p vhost-user-mem)",
        ) {
            return;
        }
        panic!("no vhost-user-mem binary next to the test");
    };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("vu.sock");
    let api = dir.path().join("api.sock");
    let mut daemon = Daemon::start(&binary, &socket, &api);

    let mem = create_guest_memory(64 << 20, true).unwrap();
    let config = VhostUserConfig {
        device_type: 5,
        socket: socket.clone(),
        queue_sizes: vec![256, 256, 256, 256],
        control_socket: Some(api.clone()),
    };
    let mut device = VhostUserDevice::new(&config).unwrap();
    let offered = device.features();
    for (bit, name) in [
        (STATS_VQ, "STATS_VQ"),
        (DEFLATE_ON_OOM, "DEFLATE_ON_OOM"),
        (REPORTING, "REPORTING"),
        (VERSION_1, "VERSION_1"),
    ] {
        assert_ne!(offered & bit, 0, "{name} is not offered to the guest");
    }
    assert_eq!(
        offered & (1 << 30),
        0,
        "the vhost-user bit leaked to the guest"
    );
    let mut config_bytes = [0xffu8; 8];
    device.read_config(0, &mut config_bytes);
    assert_eq!(config_bytes, [0; 8], "num_pages and actual start at 0");

    // The guest takes DEFLATE_ON_OOM and REPORTING, not stats: queues inflate 0, deflate 1,
    // reporting 2; queue 3 stays unused.
    let vqs: Vec<MockSplitQueue<GuestRam>> = (0..3u64)
        .map(|i| MockSplitQueue::create(&mem, GuestAddress(0x10_0000 + i * 0x1_0000), 256))
        .collect();
    let mut queues: Vec<Queue> = vqs.iter().map(|vq| vq.create_queue().unwrap()).collect();
    queues.push(Queue::new(256).unwrap());
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
    device
        .activate(ActivateContext {
            memory: mem.clone(),
            queues,
            interrupt: interrupt.clone(),
            acked_features: VERSION_1 | DEFLATE_ON_OOM | REPORTING,
        })
        .unwrap();

    // Inflate 64 pages the guest wrote.
    let first_pfn = 0x1000u32; // 16 MiB
    mem.write_slice(
        &[0xa5u8; 64 * 4096],
        GuestAddress(u64::from(first_pfn) << 12),
    )
    .unwrap();
    let pfns: Vec<u32> = (first_pfn..first_pfn + 64).collect();
    inflate(&mem, &vqs[0], 0, 0x80_0000, &pfns);
    device.queue_notify(0);
    assert!(
        wait_for(LIMIT, || vqs[0].used().idx().load() == 1),
        "the daemon did not use the inflate request"
    );
    assert!(
        wait_for(LIMIT, || interrupt.status() & VIRTIO_MMIO_INT_VRING != 0),
        "no used-ring interrupt relayed"
    );
    let invalid = ext_vmm::invalid_pages::fetch(std::slice::from_ref(&config)).unwrap();
    for pfn in &pfns {
        let pfn = u64::from(*pfn);
        assert!(invalid.contains(pfn), "gfn {pfn} not invalid");
    }
    interrupt.ack(u32::MAX);

    // The daemon's resize reaches the guest as a config interrupt.
    api_put(&api, "resize", r#"{"target_bytes": 1048576}"#);
    assert!(
        wait_for(LIMIT, || interrupt.status() & VIRTIO_MMIO_INT_CONFIG != 0),
        "the config change did not reach the frontend"
    );
    assert_eq!(counter(&device, "config_changes"), 1);
    device.read_config(0, &mut config_bytes[..4]);
    assert_eq!(
        u32::from_le_bytes(config_bytes[..4].try_into().unwrap()),
        256
    );

    // The daemon dies: the device stops, the VM would go on.
    daemon.kill();
    assert!(
        wait_for(LIMIT, || counter(&device, "disconnects") == 1),
        "the disconnect was not noticed"
    );
    assert_eq!(counter(&device, "connected"), 0);
    let mut cached = [0u8; 4];
    device.read_config(0, &mut cached);
    assert_eq!(
        u32::from_le_bytes(cached),
        256,
        "config reads fall back to the last value"
    );
    // A kick while nobody listens is kept.
    inflate(
        &mem,
        &vqs[0],
        1,
        0x80_1000,
        &[first_pfn + 100, first_pfn + 101],
    );
    device.queue_notify(0);

    // It comes back: the frontend reconnects and the queue goes on from the used index.
    let _daemon = Daemon::start(&binary, &socket, &api);
    assert!(
        wait_for(LIMIT, || counter(&device, "reconnects") == 1),
        "the frontend did not reconnect"
    );
    assert_eq!(counter(&device, "connected"), 1);
    assert!(
        wait_for(LIMIT, || vqs[0].used().idx().load() == 2),
        "the request queued while the daemon was away was not served after the reconnect"
    );
    let states = device.queue_states();
    assert_eq!(states.len(), 4);
    assert_eq!((states[0].next_avail, states[0].next_used), (2, 2));
    assert!(!states[3].ready);
    let saved = device.save_state().unwrap();
    device.restore_state(Some(&saved)).unwrap();
    device.reset();
}
