//! Termination signals held back while a clone operation runs.
//!
//! Between `vm.pause` and `vm.resume` of the source, and between a clone's start and its new
//! identity, being killed by SIGINT, SIGTERM or SIGHUP would leave the source paused or a
//! clone half-configured. [`HeldSignals`] blocks those signals in the process's mask; the
//! operation polls [`HeldSignals::pending`] between steps and, when one arrived, undoes what
//! it began (resumes the source, removes unfinished clones) and returns; dropping the guard
//! unblocks the signal, which then ends the process as it would have. VMM processes started
//! meanwhile get an empty mask ([`unblock_all_in_child`]). SIGKILL cannot be held: a source
//! paused when ext-clone is SIGKILLed stays paused (and clones never resumed stay paused,
//! never running with the source's identity).

use std::io;

const HELD: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

fn held_set() -> libc::sigset_t {
    // SAFETY: sigemptyset initialises the zeroed set; sigaddset adds valid signal numbers.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in HELD {
            libc::sigaddset(&mut set, signal);
        }
        set
    }
}

/// SIGINT, SIGTERM and SIGHUP blocked in the calling thread (and threads it starts) until
/// dropped. Create it on the main thread before starting any other.
pub struct HeldSignals {
    previous: libc::sigset_t,
}

impl HeldSignals {
    /// Blocks the termination signals.
    pub fn hold() -> io::Result<Self> {
        let set = held_set();
        // SAFETY: `previous` is a valid out-parameter; `set` a valid initialised set.
        let mut previous: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above; pthread_sigmask only changes this thread's mask.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut previous) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        Ok(HeldSignals { previous })
    }

    /// The first held signal that arrived, if any.
    pub fn pending() -> Option<i32> {
        // SAFETY: `set` is a valid out-parameter for sigpending.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        if unsafe { libc::sigpending(&mut set) } != 0 {
            return None;
        }
        HELD.into_iter()
            // SAFETY: `set` was filled by sigpending; the signal numbers are valid.
            .find(|signal| unsafe { libc::sigismember(&set, *signal) } == 1)
    }
}

impl Drop for HeldSignals {
    fn drop(&mut self) {
        // SAFETY: restores the mask saved by `hold` on this thread.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.previous, std::ptr::null_mut()) };
    }
}

/// For `CommandExt::pre_exec`: the VMM starts with no signal blocked, whatever ext-clone
/// holds. Only async-signal-safe calls.
pub fn unblock_all_in_child() -> io::Result<()> {
    // SAFETY: sigemptyset on a local set and sigprocmask are async-signal-safe, as pre_exec
    // requires.
    let rc = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_signal_waits_and_is_seen() {
        // Runs on its own thread: the mask is per thread, and a pending SIGHUP there is the
        // process's; consume it before unblocking so the test process lives.
        std::thread::spawn(|| {
            let held = HeldSignals::hold().unwrap();
            assert_eq!(HeldSignals::pending(), None);
            // SAFETY: sends SIGHUP to this very thread, where it is blocked.
            unsafe { libc::pthread_kill(libc::pthread_self(), libc::SIGHUP) };
            assert_eq!(HeldSignals::pending(), Some(libc::SIGHUP));
            let set = held_set();
            let mut got = 0;
            // SAFETY: waits for (and so consumes) the pending blocked signal.
            unsafe { libc::sigwait(&set, &mut got) };
            assert_eq!(got, libc::SIGHUP);
            drop(held);
        })
        .join()
        .unwrap();
    }
}
