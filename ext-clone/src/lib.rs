//! Container-aware VM cloning (patent EP3314423).
//!
//! `ext-clone` will clone a running VM whose guest runs containers: pause, take a sparse
//! snapshot with `ext-snapshot`, start clones that share its data copy-on-write, give each clone
//! its own identity, stop chosen containers through an in-guest agent so their memory returns to
//! the host, and migrate a clone to another host as a sparse stream. Its issue comes after the
//! lab, the reference VMM and the snapshot format; this crate holds no code yet.
