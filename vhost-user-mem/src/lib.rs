//! Out-of-process guest memory backend speaking vhost-user.
//!
//! `vhost-user-mem` will be a daemon that receives the guest memory table from a vhost-user
//! frontend (Cloud Hypervisor or `ext-vmm`), runs a virtio-balloon device with free page
//! reporting, keeps the invalid-page map, punches holes for reported pages, writes sparse
//! snapshots and serves lazy restores with userfaultfd, so the VMM process does none of that work.
//! Its issue comes after the lab and the snapshot format; this crate holds no code yet.
