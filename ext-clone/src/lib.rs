//! Container-aware VM cloning (patent EP3314423), through the VMM's REST API.
//!
//! `ext-clone` clones a running VM: it pauses the source, takes one sparse snapshot
//! (ext-snapshot's format, written by the VMM), resumes the source, and starts N VMM
//! processes that restore that snapshot copy-on-write (`mapped`) or on demand, each given a
//! new VM generation ID before its vCPUs run ([`clone::clone_vm`]). It drives VMMs only through
//! their APIs ([`api::VmmApi`]), so the same code clones ext-vmm and Cloud Hypervisor VMs.
//!
//! Modules: [`api`] (the REST calls, each bounded by a timeout), [`process`] (a clone's VMM
//! process, cleaned up on failure), [`clone`] (the orchestration), [`signals`] (termination
//! signals held while the source is paused), [`memory`] (a process's private and shared
//! memory, from `/proc`).

pub mod api;
pub mod clone;
pub mod error;
pub mod memory;
pub mod process;
pub mod signals;

pub use api::VmmApi;
pub use clone::{clone_vm, destroy_clones, list_clones, CloneOptions, CloneRecord, CloneReport};
pub use error::{CloneError, Result};
pub use process::{VmmCommand, VmmKind};
