//! The snapshot directory of `vm.snapshot` / `vm.restore`, as Cloud Hypervisor lays it out:
//! `config.json` (the [`VmConfig`]), `state.json` (vCPUs, VM, devices; versioned and
//! checksummed) and the guest memory as an ext-snapshot file (`memory.ext-snapshot`).
//!
//! Everything is read and validated by [`SnapshotDir::load`] before a VM exists, so a corrupt,
//! truncated or foreign snapshot is refused without side effects.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use ext_snapshot::RestoreMode;

use super::config::{SerialOutput, VmConfig};
use super::devices::persist::SerialSnapshot;
use super::error::{Error, Result};
use super::memory::ram_ranges;
use super::options::Options;
use super::persist::{MachineState, VcpuState};
use super::virtio::persist::TransportSnapshot;

/// Version of `state.json`; restore refuses any other.
pub const STATE_VERSION: u32 = 1;
/// The VM configuration.
pub const CONFIG_FILE: &str = "config.json";
/// vCPU, VM and device state.
pub const STATE_FILE: &str = "state.json";
/// Guest memory, ext-snapshot file encoding.
pub const MEMORY_FILE: &str = "memory.ext-snapshot";

/// A virtio device's saved state under its counter name (`virtio-blk0`...).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedTransport {
    /// Device name, in DSDT order.
    pub name: String,
    /// Transport and device state.
    pub state: TransportSnapshot,
}

/// How the memory file relates to other snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRef {
    /// The snapshot directory this one's memory is a diff against (`None`: standalone).
    pub parent: Option<PathBuf>,
}

/// Everything of a paused VM except its memory and configuration.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmSnapshotState {
    /// Every vCPU, by index.
    pub vcpus: Vec<VcpuState>,
    /// irqchip, PIT, clock.
    pub machine: MachineState,
    /// COM1.
    pub serial: SerialSnapshot,
    /// virtio transports and devices, in DSDT order.
    pub virtio: Vec<NamedTransport>,
    /// Where the memory's parent is, for diff snapshots.
    pub memory: MemoryRef,
}

/// `state.json` on disk: the version first (so a reader can refuse before parsing the rest),
/// then a CRC-32C of the state's bytes exactly as they stand in the file, then the state. The
/// state is kept raw until its checksum matched, so any damage to it is reported as such and
/// not as whatever typed-parsing error the damaged bytes happen to cause.
#[derive(Deserialize)]
struct StateFile<'a> {
    crc32c: u32,
    #[serde(borrow)]
    state: &'a serde_json::value::RawValue,
}

#[derive(Deserialize)]
struct VersionOnly {
    version: u32,
}

/// Decodes a `state.json`: version, then checksum over the raw state bytes, then the state.
fn decode_state(bytes: &[u8]) -> Result<VmSnapshotState> {
    let version: VersionOnly = serde_json::from_slice(bytes)
        .map_err(|e| Error::Snapshot(format!("{STATE_FILE} is corrupt or truncated: {e}")))?;
    if version.version != STATE_VERSION {
        return Err(Error::Snapshot(format!(
            "{STATE_FILE} has version {}, this ext-vmm reads version {STATE_VERSION}",
            version.version
        )));
    }
    let file: StateFile = serde_json::from_slice(bytes)
        .map_err(|e| Error::Snapshot(format!("{STATE_FILE} is corrupt or truncated: {e}")))?;
    let crc = crc32c::crc32c(file.state.get().as_bytes());
    if crc != file.crc32c {
        return Err(Error::Snapshot(format!(
            "{STATE_FILE} is corrupt: checksum {crc:#x}, recorded {:#x}",
            file.crc32c
        )));
    }
    serde_json::from_str(file.state.get()).map_err(|e| {
        Error::Snapshot(format!(
            "{STATE_FILE} passed its checksum but is not a VM state of this version: {e}"
        ))
    })
}

/// A snapshot directory named by a `file://` URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotDir {
    path: PathBuf,
}

/// A loaded, validated snapshot (memory file opened and its structure checked).
pub struct LoadedSnapshot {
    /// The directory.
    pub dir: SnapshotDir,
    /// The VM configuration.
    pub config: VmConfig,
    /// vCPU, VM and device state.
    pub state: VmSnapshotState,
    /// The memory file and its ancestors (oldest first) when it is a diff.
    pub memory_chain: Vec<PathBuf>,
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|source| Error::File {
        path: path.display().to_string(),
        source,
    })
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).map_err(|e| Error::Snapshot(format!("{}: {e}", path.display())))
}

fn state_crc(state: &VmSnapshotState) -> Result<(Vec<u8>, u32)> {
    let bytes = serde_json::to_vec(state)
        .map_err(|e| Error::Snapshot(format!("serializing the VM state: {e}")))?;
    let crc = crc32c::crc32c(&bytes);
    Ok((bytes, crc))
}

impl SnapshotDir {
    /// Parses `file:///dir` (the only scheme supported, as in Cloud Hypervisor).
    pub fn from_url(url: &str) -> Result<Self> {
        let path = url
            .strip_prefix("file://")
            .filter(|p| p.starts_with('/'))
            .ok_or_else(|| {
                Error::Snapshot(format!(
                    "unsupported snapshot URL {url:?}: expected file:///<absolute directory>"
                ))
            })?;
        Ok(SnapshotDir {
            path: PathBuf::from(path),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Path of the memory file.
    pub fn memory_path(&self) -> PathBuf {
        self.path.join(MEMORY_FILE)
    }

    /// Creates the directory (and parents) for a new snapshot.
    pub fn create(&self) -> Result<()> {
        fs::create_dir_all(&self.path)
            .map_err(|e| Error::Snapshot(format!("creating {}: {e}", self.path.display())))
    }

    /// Writes `config.json` and `state.json` (the memory file is written separately by
    /// ext-snapshot). `state.json` goes through a temporary file and a rename, so a reader
    /// never sees half of it.
    pub fn write_state(&self, config: &VmConfig, state: &VmSnapshotState) -> Result<()> {
        let config_json = serde_json::to_vec_pretty(config)
            .map_err(|e| Error::Snapshot(format!("serializing the VM config: {e}")))?;
        write_file(&self.path.join(CONFIG_FILE), &config_json)?;
        let (state_json, crc) = state_crc(state)?;
        let mut out =
            format!("{{\"version\":{STATE_VERSION},\"crc32c\":{crc},\"state\":").into_bytes();
        out.extend_from_slice(&state_json);
        out.extend_from_slice(b"}\n");
        let tmp = self.path.join(format!("{STATE_FILE}.tmp"));
        write_file(&tmp, &out)?;
        fs::rename(&tmp, self.path.join(STATE_FILE))
            .map_err(|e| Error::Snapshot(format!("renaming {}: {e}", tmp.display())))
    }

    /// Reads and validates the whole snapshot: config, state (version, checksum, coherence
    /// with the config) and the memory file's structure and layout, following diff parents.
    pub fn load(&self) -> Result<LoadedSnapshot> {
        let config_bytes = read_file(&self.path.join(CONFIG_FILE))?;
        let config: VmConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| Error::Snapshot(format!("{CONFIG_FILE} is not a VM config: {e}")))?;
        let state = decode_state(&read_file(&self.path.join(STATE_FILE))?)?;
        if state.vcpus.len() != usize::from(config.cpus)
            || state
                .vcpus
                .iter()
                .enumerate()
                .any(|(i, v)| usize::from(v.id) != i)
        {
            return Err(Error::Snapshot(format!(
                "{STATE_FILE} holds {} vCPU(s), {CONFIG_FILE} says {}",
                state.vcpus.len(),
                config.cpus
            )));
        }
        let memory_chain = self.memory_chain(&state)?;
        let expected: Vec<(u64, u64)> = ram_ranges(config.memory_size)
            .into_iter()
            .map(|(a, s)| (a.0, s))
            .collect();
        for path in &memory_chain {
            let memory = ext_snapshot::SnapshotFile::open(path).map_err(Error::SnapshotMemory)?;
            if memory.layout() != expected {
                return Err(Error::Snapshot(format!(
                    "{} describes memory {:x?}, the config needs {expected:x?}",
                    path.display(),
                    memory.layout()
                )));
            }
        }
        Ok(LoadedSnapshot {
            dir: self.clone(),
            config,
            state,
            memory_chain,
        })
    }

    /// The memory files to restore, oldest first: the parents' (recursively) then ours.
    fn memory_chain(&self, state: &VmSnapshotState) -> Result<Vec<PathBuf>> {
        let mut chain = vec![self.memory_path()];
        let mut parent = state.memory.parent.clone();
        while let Some(dir) = parent {
            if chain.len() > 64 {
                return Err(Error::Snapshot(
                    "diff chain longer than 64 snapshots".into(),
                ));
            }
            let dir = SnapshotDir { path: dir };
            let bytes = read_file(&dir.path.join(STATE_FILE))?;
            let state = decode_state(&bytes)
                .map_err(|e| Error::Snapshot(format!("parent {}: {e}", dir.path.display())))?;
            chain.push(dir.memory_path());
            parent = state.memory.parent;
        }
        chain.reverse();
        Ok(chain)
    }
}

/// Reads Cloud Hypervisor's `memory_restore_mode` names into ext-snapshot's one restore-mode
/// type: `copy` is the eager restore, `ondemand` the lazy (userfaultfd) one, plus ext-vmm's
/// `mapped`.
pub fn parse_restore_mode(text: &str) -> Option<RestoreMode> {
    match text {
        "copy" | "Copy" => Some(RestoreMode::Eager),
        "mapped" | "Mapped" => Some(RestoreMode::Mapped),
        "ondemand" | "OnDemand" | "on_demand" => Some(RestoreMode::Lazy),
        _ => None,
    }
}

/// `--restore source_url=file:///dir[,memory_restore_mode=copy|mapped|ondemand][,resume=..]
/// [,page_server=<socket>]`, or a `vm.restore` body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreConfig {
    /// Snapshot directory URL.
    pub source_url: String,
    /// Memory restore mode (default `copy`, the eager restore).
    pub memory_restore_mode: RestoreMode,
    /// Resume the VM once restored (default false: it stays paused, as in Cloud Hypervisor).
    pub resume: bool,
    /// With `ondemand`: the socket of a `vhost-user-mem serve` page server that serves the
    /// faults instead of a handler thread in this process.
    pub page_server: Option<PathBuf>,
    /// Where the restored VM's serial console goes instead of the snapshot's setting
    /// (`--serial` given with `--restore`): a clone must not write into its source's log.
    pub serial: Option<SerialOutput>,
}

impl RestoreConfig {
    /// Parses the `--restore` option.
    pub fn parse(text: &str) -> Result<Self> {
        let options = Options::parse(
            "restore",
            text,
            &[
                "source_url",
                "memory_restore_mode",
                "resume",
                "prefault",
                "page_server",
            ],
        )?;
        let source_url = options.required("source_url")?;
        let memory_restore_mode = match options.get("memory_restore_mode") {
            None => RestoreMode::Eager,
            Some(mode) => parse_restore_mode(mode).ok_or_else(|| {
                options.invalid("memory_restore_mode", "must be copy, mapped or ondemand")
            })?,
        };
        if options.on_off("prefault", false)? {
            return Err(options.invalid(
                "prefault",
                "is not supported: restores never prefault pages without data",
            ));
        }
        let page_server = options.get("page_server").map(PathBuf::from);
        check_page_server(memory_restore_mode, page_server.as_deref())
            .map_err(|reason| options.invalid("page_server", reason))?;
        Ok(RestoreConfig {
            source_url: source_url.to_string(),
            memory_restore_mode,
            resume: options.on_off("resume", false)?,
            page_server,
            serial: None,
        })
    }
}

/// `Err` with the reason when `page_server` cannot go with `mode`: only an on-demand restore
/// has faults to serve, and the socket path must not be empty.
pub fn check_page_server(
    mode: RestoreMode,
    page_server: Option<&Path>,
) -> std::result::Result<(), &'static str> {
    match page_server {
        None => Ok(()),
        Some(path) if path.as_os_str().is_empty() => Err("must name a socket"),
        Some(_) if mode != RestoreMode::Lazy => {
            Err("needs memory_restore_mode=ondemand (only on-demand restores serve faults)")
        }
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restore_option_and_urls() {
        let c =
            RestoreConfig::parse("source_url=file:///s,memory_restore_mode=ondemand,resume=true")
                .unwrap();
        assert_eq!(c.memory_restore_mode, RestoreMode::Lazy);
        assert!(c.resume);
        assert!(RestoreConfig::parse("memory_restore_mode=copy").is_err());
        assert!(RestoreConfig::parse("source_url=file:///s,memory_restore_mode=lazy").is_err());
        assert_eq!(c.page_server, None);
        let served = RestoreConfig::parse(
            "source_url=file:///s,memory_restore_mode=ondemand,page_server=/run/pages.sock",
        )
        .unwrap();
        assert_eq!(served.page_server, Some(PathBuf::from("/run/pages.sock")));
        let copy = RestoreConfig::parse("source_url=file:///s,page_server=/run/pages.sock");
        assert!(copy.unwrap_err().to_string().contains("ondemand"));
        assert!(RestoreConfig::parse(
            "source_url=file:///s,memory_restore_mode=mapped,page_server=/p"
        )
        .is_err());
        assert!(RestoreConfig::parse(
            "source_url=file:///s,memory_restore_mode=ondemand,page_server="
        )
        .is_err());
        assert_eq!(
            SnapshotDir::from_url("file:///tmp/x").unwrap().path(),
            Path::new("/tmp/x")
        );
        assert!(SnapshotDir::from_url("http://x/y").is_err());
        assert!(SnapshotDir::from_url("file://relative").is_err());
    }
}
