//! Holding the other vCPUs of a VM out of guest mode while one vCPU runs under a grant.
//!
//! KVM memslots are VM-wide: a page made executable for one vCPU's single step is executable
//! for every vCPU in guest mode at that moment. [`RunGate`] is the barrier that prevents it.
//! Every vCPU thread calls [`RunGate::enter`] before `KVM_RUN` and [`RunGate::leave`] after
//! it returns. [`RunGate::hold_others`] marks the VM as held by one vCPU, kicks every other
//! vCPU still in guest mode with a signal (so `KVM_RUN` returns `EINTR`) and waits until none
//! is; held vCPUs wait in `enter` until [`RunGate::release`]. The control thread holds the
//! VM the same way (as [`crate::manager::CONTROL_THREAD`]) while it reshapes memslots.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// How long to wait for a kicked vCPU before kicking again. A signal that lands between
/// `enter` and the `KVM_RUN` ioctl is lost (the ioctl starts after it); kicking again covers
/// that window without `immediate_exit` plumbing.
const REKICK_INTERVAL: Duration = Duration::from_millis(1);

#[derive(Default)]
struct GateState {
    holder: Option<u32>,
    in_guest: BTreeMap<u32, libc::pthread_t>,
}

/// The per-VM barrier between vCPU threads.
pub struct RunGate {
    state: Mutex<GateState>,
    changed: Condvar,
    kick_signal: Option<libc::c_int>,
}

impl RunGate {
    /// A gate that kicks vCPU threads with `kick_signal` (the VMM installs a handler for it
    /// without `SA_RESTART`, as Cloud Hypervisor does for its vCPU kick signal). With `None`,
    /// `hold_others` waits for vCPUs to exit on their own (single-vCPU VMs, tests).
    pub fn new(kick_signal: Option<libc::c_int>) -> Self {
        Self {
            state: Mutex::new(GateState::default()),
            changed: Condvar::new(),
            kick_signal,
        }
    }

    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks the gate once no vCPU other than `vcpu` holds the VM.
    fn wait_until_not_held_by_others(&self, vcpu: u32) -> MutexGuard<'_, GateState> {
        let mut state = self.lock();
        while state.holder.is_some_and(|h| h != vcpu) {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        state
    }

    /// Called by vCPU `vcpu`'s thread right before `KVM_RUN`; blocks while another vCPU
    /// holds the VM.
    pub fn enter(&self, vcpu: u32) {
        let mut state = self.wait_until_not_held_by_others(vcpu);
        // SAFETY: pthread_self has no preconditions and always succeeds.
        let thread = unsafe { libc::pthread_self() };
        state.in_guest.insert(vcpu, thread);
    }

    /// Called by vCPU `vcpu`'s thread right after `KVM_RUN` returns.
    pub fn leave(&self, vcpu: u32) {
        self.lock().in_guest.remove(&vcpu);
        self.changed.notify_all();
    }

    /// Returns once `vcpu` holds the VM and no other vCPU is in guest mode.
    pub fn hold_others(&self, vcpu: u32) {
        let mut state = self.wait_until_not_held_by_others(vcpu);
        state.holder = Some(vcpu);
        loop {
            let others: Vec<libc::pthread_t> = state
                .in_guest
                .iter()
                .filter(|(&id, _)| id != vcpu)
                .map(|(_, &thread)| thread)
                .collect();
            if others.is_empty() {
                return;
            }
            if let Some(signal) = self.kick_signal {
                for thread in others {
                    // SAFETY: `thread` was recorded by `enter` on a vCPU thread that has not
                    // called `leave` yet, so it is alive; the VMM installed a handler for
                    // `signal`, so delivery only interrupts KVM_RUN.
                    unsafe { libc::pthread_kill(thread, signal) };
                }
            }
            state = self
                .changed
                .wait_timeout(state, REKICK_INTERVAL)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Lets the other vCPUs run again.
    pub fn release(&self, vcpu: u32) {
        let mut state = self.lock();
        if state.holder == Some(vcpu) {
            state.holder = None;
        }
        drop(state);
        self.changed.notify_all();
    }

    /// vCPUs between `enter` and `leave` right now.
    pub fn vcpus_in_guest(&self) -> Vec<u32> {
        self.lock().in_guest.keys().copied().collect()
    }

    /// The vCPU currently holding the VM, if any.
    pub fn holder(&self) -> Option<u32> {
        self.lock().holder
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn held_vcpu_waits_until_release() {
        let gate = Arc::new(RunGate::new(None));
        gate.hold_others(0);
        let entered = Arc::new(AtomicBool::new(false));
        let (g, e) = (gate.clone(), entered.clone());
        let other = std::thread::spawn(move || {
            g.enter(1);
            e.store(true, Ordering::SeqCst);
            g.leave(1);
        });
        // The holder itself may keep running.
        gate.enter(0);
        gate.leave(0);
        std::thread::sleep(Duration::from_millis(20));
        assert!(!entered.load(Ordering::SeqCst), "vCPU 1 entered while held");
        gate.release(0);
        other.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
    }

    #[test]
    fn hold_waits_for_vcpu_in_guest() {
        let gate = Arc::new(RunGate::new(None));
        gate.enter(1);
        let left = Arc::new(AtomicBool::new(false));
        let (g, l) = (gate.clone(), left.clone());
        let other = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            l.store(true, Ordering::SeqCst);
            g.leave(1);
        });
        gate.hold_others(0);
        assert!(
            left.load(Ordering::SeqCst),
            "hold returned while vCPU 1 was in guest"
        );
        gate.release(0);
        other.join().unwrap();
    }
}
