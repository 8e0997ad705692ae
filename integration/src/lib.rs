//! The reference VMM `ext-vmm` and the project's end-to-end tests.
//!
//! `ext-vmm` is a thin composition of rust-vmm crates (kvm-ioctls, vm-memory, linux-loader,
//! vm-superio, event-manager, virtio-queue) and this project's extension crates. It boots a
//! Linux guest on KVM and serves a Cloud-Hypervisor-compatible REST API on a unix socket, so
//! the extensions can be driven exactly as an operator drives Cloud Hypervisor.
pub mod api;
pub mod bench;
pub mod test_kernel;
pub mod vmm;
