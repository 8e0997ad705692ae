//! What a VMM process costs the host in memory, read from `/proc/<pid>/smaps_rollup`.

use std::fs;

/// Memory figures of one process, in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcessMemory {
    /// Resident set.
    pub rss: u64,
    /// Dirty pages mapped by this process alone: a clone's copy-on-write copies and heap, a
    /// booted VM's written guest RAM. Clean page cache of the snapshot file is not in it:
    /// this is what the process costs beyond what it shares.
    pub private_dirty: u64,
    /// Anonymous pages: memory only this process has (a clone's copy-on-write copies, a
    /// booted VM's guest RAM, the VMM's heap); page cache shared with the snapshot file is not
    /// in it.
    pub anonymous: u64,
    /// Proportional set size: shared pages divided among their sharers.
    pub pss: u64,
}

/// The figures of process `pid`; `None` when it is gone or `/proc` is unreadable.
pub fn process_memory(pid: u32) -> Option<ProcessMemory> {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    let field = |name: &str| -> u64 {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.trim().strip_suffix("kB"))
            .and_then(|kb| kb.trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    Some(ProcessMemory {
        rss: field("Rss:"),
        private_dirty: field("Private_Dirty:"),
        anonymous: field("Anonymous:"),
        pss: field("Pss:"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_memory() {
        let me = process_memory(std::process::id()).unwrap();
        assert!(me.rss > 0 && me.anonymous > 0 && me.pss > 0, "{me:?}");
        assert_eq!(process_memory(u32::MAX), None);
    }
}
