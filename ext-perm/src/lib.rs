//! Guest-physical page permissions with per-vCPU views and temporary grants (patent EP2801025).
//!
//! `ext-perm` keeps the authoritative table of read/write/execute permissions per guest frame
//! in each *view*, assigns every vCPU a view, and decides what to do with each permission fault
//! a VMM's vCPU exit loop hands it: allow, deny, emulate a data access, or run an instruction
//! that straddles into a non-executable page once under a grant for that vCPU alone.
//! Enforcement is delegated to a backend (KVM memslots, or a software model used as the oracle).
