//! The VM configuration and the Cloud-Hypervisor-style `key=value,...` option parsers behind
//! the `ext-vmm` command line.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::error::{Error, Result};

/// Where the 16550 serial port's output goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SerialOutput {
    /// The VMM's stdout (input from stdin).
    Tty,
    /// Serial port present but its output is dropped.
    Off,
    /// Appended to a file.
    File(PathBuf),
}

/// A virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskConfig {
    /// Backing file.
    pub path: PathBuf,
    /// Offer the disk read-only (`VIRTIO_BLK_F_RO`).
    pub readonly: bool,
}

/// Everything needed to build and boot one VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmConfig {
    /// ELF vmlinux with a PVH entry note.
    pub kernel: PathBuf,
    /// Optional initramfs, handed to the kernel as the first PVH module.
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs (1..=255).
    pub cpus: u8,
    /// Guest memory size in bytes.
    pub memory_size: u64,
    /// Back guest memory with a memfd mapped shared (needed by vhost-user).
    pub memory_shared: bool,
    /// Serial console destination.
    pub serial: SerialOutput,
    /// virtio-blk disks.
    pub disks: Vec<DiskConfig>,
}

impl VmConfig {
    /// A configuration with the contract's defaults (1 vCPU, 512 MiB private memory, serial
    /// on the tty) for `kernel`.
    pub fn new(kernel: PathBuf) -> Self {
        VmConfig {
            kernel,
            initramfs: None,
            cmdline: "console=ttyS0".to_string(),
            cpus: 1,
            memory_size: 512 << 20,
            memory_shared: false,
            serial: SerialOutput::Tty,
            disks: Vec::new(),
        }
    }

    /// The configuration in Cloud Hypervisor's `VmConfig` JSON shape, for `vm.info`.
    pub fn to_ch_json(&self) -> serde_json::Value {
        let serial_mode = match &self.serial {
            SerialOutput::Tty => "Tty",
            SerialOutput::Off => "Off",
            SerialOutput::File(_) => "File",
        };
        let serial_file = match &self.serial {
            SerialOutput::File(p) => Some(p.clone()),
            _ => None,
        };
        serde_json::json!({
            "cpus": { "boot_vcpus": self.cpus, "max_vcpus": self.cpus },
            "memory": { "size": self.memory_size, "shared": self.memory_shared },
            "payload": {
                "kernel": self.kernel,
                "initramfs": self.initramfs,
                "cmdline": self.cmdline,
            },
            "serial": { "mode": serial_mode, "file": serial_file },
            "disks": self.disks.iter().map(|d| serde_json::json!({
                "path": d.path, "readonly": d.readonly,
            })).collect::<Vec<_>>(),
        })
    }
}

/// Splits `a=1,b=2` into pairs; a bare word (no `=`) yields an empty value.
fn options(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.split(',')
        .filter(|s| !s.is_empty())
        .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
}

fn invalid(option: &str, text: &str) -> Error {
    Error::InvalidOption(format!("--{option} {text}"))
}

fn parse_on_off(option: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(invalid(option, value)),
    }
}

/// Parses a size such as `512M`, `2G`, `4096K` or a plain byte count.
pub fn parse_size(text: &str) -> Result<u64> {
    let (digits, shift) = match text.as_bytes().last() {
        Some(b'K' | b'k') => (&text[..text.len() - 1], 10),
        Some(b'M' | b'm') => (&text[..text.len() - 1], 20),
        Some(b'G' | b'g') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let value: u64 = digits.parse().map_err(|_| invalid("memory", text))?;
    value
        .checked_mul(1u64 << shift)
        .ok_or_else(|| invalid("memory", text))
}

/// Parses `--cpus boot=<N>`.
pub fn parse_cpus(text: &str) -> Result<u8> {
    let mut cpus = 1u8;
    for (key, value) in options(text) {
        match key {
            "boot" => cpus = value.parse().map_err(|_| invalid("cpus", text))?,
            _ => return Err(invalid("cpus", text)),
        }
    }
    if cpus == 0 {
        return Err(invalid("cpus", text));
    }
    Ok(cpus)
}

/// Parses `--memory size=<N>[K|M|G],shared=on|off` into (bytes, shared).
pub fn parse_memory(text: &str) -> Result<(u64, bool)> {
    let (mut size, mut shared) = (512u64 << 20, false);
    for (key, value) in options(text) {
        match key {
            "size" => size = parse_size(value)?,
            "shared" => shared = parse_on_off("memory", value)?,
            _ => return Err(invalid("memory", text)),
        }
    }
    // Below 64 MiB the fixed boot layout (kernel at 16 MiB, initramfs above it) does not fit.
    if size < (64 << 20) || size % 4096 != 0 {
        return Err(invalid("memory", text));
    }
    Ok((size, shared))
}

/// Parses `--serial tty|off|file=<path>`.
pub fn parse_serial(text: &str) -> Result<SerialOutput> {
    match text {
        "tty" => Ok(SerialOutput::Tty),
        "off" => Ok(SerialOutput::Off),
        _ => match text.strip_prefix("file=") {
            Some(path) if !path.is_empty() => Ok(SerialOutput::File(PathBuf::from(path))),
            _ => Err(invalid("serial", text)),
        },
    }
}

/// Parses `--disk path=<file>[,readonly=on]`.
pub fn parse_disk(text: &str) -> Result<DiskConfig> {
    let mut disk = DiskConfig {
        path: PathBuf::new(),
        readonly: false,
    };
    for (key, value) in options(text) {
        match key {
            "path" => disk.path = PathBuf::from(value),
            "readonly" => disk.readonly = parse_on_off("disk", value)?,
            _ => return Err(invalid("disk", text)),
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err(invalid("disk", text));
    }
    Ok(disk)
}

/// Parses `--api-socket path=<socket>` (a bare path is accepted too, as Cloud Hypervisor does).
pub fn parse_api_socket(text: &str) -> Result<PathBuf> {
    let path = text.strip_prefix("path=").unwrap_or(text);
    if path.is_empty() || path.contains(',') {
        return Err(invalid("api-socket", text));
    }
    Ok(PathBuf::from(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_memory_options() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert!(parse_size("12X").is_err());
        assert_eq!(parse_memory("size=1G,shared=on").unwrap(), (1 << 30, true));
        assert!(parse_memory("size=1M").is_err());
        assert!(parse_memory("size=1G,bogus=1").is_err());
    }

    #[test]
    fn cpus_serial_disk_socket() {
        assert_eq!(parse_cpus("boot=4").unwrap(), 4);
        assert!(parse_cpus("boot=0").is_err());
        assert_eq!(parse_serial("off").unwrap(), SerialOutput::Off);
        assert_eq!(
            parse_serial("file=/tmp/x").unwrap(),
            SerialOutput::File(PathBuf::from("/tmp/x"))
        );
        assert!(parse_serial("file=").is_err());
        let disk = parse_disk("path=/d.img,readonly=on").unwrap();
        assert!(disk.readonly);
        assert!(parse_disk("readonly=on").is_err());
        assert_eq!(
            parse_api_socket("path=/run/a.sock").unwrap(),
            PathBuf::from("/run/a.sock")
        );
    }
}
