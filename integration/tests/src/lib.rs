//! What ext-vmm's end-to-end tests and `ext-vmm-bench` share: tiny PVH guest kernels built
//! from raw x86-64 code ([`test_kernel`]), the snapshot tests' counting guest
//! ([`counting_guest`]), and the environment checks and waits of the host tests ([`common`]).
//! Test tooling only: nothing here is part of the VMM.

pub mod cloud_hypervisor;
pub mod common;
pub mod counting_guest;
pub mod daemon;
pub mod test_kernel;
