//! The VM configuration, from the `ext-vmm` command line (Cloud Hypervisor's option names,
//! parsed by [`super::options`]) or from a `vm.create` body.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use ext_vmm_api::{OutputMode, VmCreateConfig};

use super::error::{Error, Result};
use super::options::Options;
use super::virtio::vhost_user::VhostUserConfig;

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
    /// Devices served by vhost-user backends (`--generic-vhost-user`); absent from configs
    /// written before they existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vhost_user: Vec<VhostUserConfig>,
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
            vhost_user: Vec::new(),
        }
    }

    /// The configuration a `vm.create` asks for (checked by the API crate; sizes and files
    /// checked here as on the command line).
    pub fn from_create(create: &VmCreateConfig) -> Result<Self> {
        check_memory_size(create.memory_size)?;
        let serial = match &create.serial {
            OutputMode::Off => SerialOutput::Off,
            OutputMode::Tty => SerialOutput::Tty,
            OutputMode::File(path) => SerialOutput::File(PathBuf::from(path)),
        };
        let config = VmConfig {
            kernel: PathBuf::from(&create.kernel),
            initramfs: create.initramfs.as_ref().map(PathBuf::from),
            cmdline: create.cmdline.clone().unwrap_or_default(),
            cpus: create.boot_vcpus,
            memory_size: create.memory_size,
            memory_shared: create.memory_shared,
            serial,
            disks: create
                .disks
                .iter()
                .map(|d| DiskConfig {
                    path: PathBuf::from(&d.path),
                    readonly: d.readonly,
                })
                .collect(),
            vhost_user: create
                .generic_vhost_user
                .iter()
                .map(|v| VhostUserConfig {
                    device_type: v.device_type,
                    socket: PathBuf::from(&v.socket),
                    queue_sizes: v.queue_sizes.clone(),
                    control_socket: None,
                })
                .collect(),
        };
        config.validate()?;
        Ok(config)
    }

    /// Checks what the options cannot check one by one.
    pub fn validate(&self) -> Result<()> {
        if !self.vhost_user.is_empty() && !self.memory_shared {
            return Err(Error::InvalidOption(
                "--generic-vhost-user needs --memory shared=on (the backend maps guest memory)"
                    .into(),
            ));
        }
        Ok(())
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
            "generic_vhost_user": self.vhost_user.iter().map(|v| serde_json::json!({
                "socket": v.socket, "queue_sizes": v.queue_sizes, "device_type": v.device_type,
            })).collect::<Vec<_>>(),
        })
    }
}

fn invalid(option: &str, text: &str) -> Error {
    Error::InvalidOption(format!("--{option} {text}"))
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
    let options = Options::parse("cpus", text, &["boot"])?;
    match options.get("boot").map(str::parse::<u8>) {
        None => Ok(1),
        Some(Ok(cpus)) if cpus > 0 => Ok(cpus),
        Some(_) => Err(options.invalid("boot", "must be 1 to 255")),
    }
}

/// Parses `--memory size=<N>[K|M|G],shared=on|off` into (bytes, shared).
pub fn parse_memory(text: &str) -> Result<(u64, bool)> {
    let options = Options::parse("memory", text, &["size", "shared"])?;
    let size = options.get("size").map_or(Ok(512 << 20), parse_size)?;
    check_memory_size(size)?;
    Ok((size, options.on_off("shared", false)?))
}

/// Below 64 MiB the fixed boot layout (kernel at 16 MiB, initramfs above it) does not fit.
fn check_memory_size(size: u64) -> Result<()> {
    if size < (64 << 20) || size % 4096 != 0 {
        return Err(Error::InvalidOption(format!(
            "memory size {size}: must be a multiple of 4 KiB, at least 64 MiB"
        )));
    }
    Ok(())
}

/// Parses `--serial tty|off|file=<path>`.
pub fn parse_serial(text: &str) -> Result<SerialOutput> {
    let options = Options::parse("serial", text, &["tty", "off", "null", "file"])?;
    match (
        options.has("tty"),
        options.has("off") || options.has("null"),
        options.get("file"),
    ) {
        (true, false, None) => Ok(SerialOutput::Tty),
        (false, true, None) => Ok(SerialOutput::Off),
        (false, false, Some(path)) if !path.is_empty() => {
            Ok(SerialOutput::File(PathBuf::from(path)))
        }
        _ => Err(invalid("serial", text)),
    }
}

/// Parses `--disk path=<file>[,readonly=on]`.
pub fn parse_disk(text: &str) -> Result<DiskConfig> {
    let options = Options::parse("disk", text, &["path", "readonly"])?;
    let path = options.required("path")?;
    Ok(DiskConfig {
        path: PathBuf::from(path),
        readonly: options.on_off("readonly", false)?,
    })
}

/// Parses `--api-socket path=<socket>` (a bare path is accepted too, as Cloud Hypervisor does).
pub fn parse_api_socket(text: &str) -> Result<PathBuf> {
    if !text.contains('=') && !text.contains(',') && !text.is_empty() {
        return Ok(PathBuf::from(text));
    }
    let options = Options::parse("api-socket", text, &["path"])?;
    options.required("path").map(PathBuf::from)
}

/// Parses `--generic-vhost-user device_type=<n|name>,socket=<path>,queue_sizes=[<n>,...]`
/// (Cloud Hypervisor's syntax; `id` is accepted and ignored) plus ext-vmm's
/// `control_socket=<path>` (the backend's control API, for snapshots).
pub fn parse_generic_vhost_user(text: &str) -> Result<VhostUserConfig> {
    let options = Options::parse(
        "generic-vhost-user",
        text,
        &[
            "device_type",
            "socket",
            "queue_sizes",
            "id",
            "control_socket",
        ],
    )?;
    let socket = options.required("socket")?;
    let device_type = match options.get("device_type") {
        None => return Err(options.invalid("device_type", "is required")),
        Some(name) => match name {
            "net" => 1,
            "block" => 2,
            "console" => 3,
            "rng" => 4,
            "balloon" => 5,
            "scsi" => 8,
            "9p" => 9,
            "gpu" => 16,
            "input" => 18,
            "vsock" => 19,
            "crypto" => 20,
            "fs" => 26,
            "sound" => 25,
            number => match number.parse::<u32>() {
                Ok(n) if n > 0 && !number.starts_with('0') => n,
                _ => return Err(options.invalid("device_type", "unknown device type")),
            },
        },
    };
    let queue_sizes = options
        .list("queue_sizes")
        .ok_or_else(|| options.invalid("queue_sizes", "is required"))?
        .into_iter()
        .map(|n| match n.parse::<u16>() {
            Ok(size) if size.is_power_of_two() => Ok(size),
            _ => Err(options.invalid("queue_sizes", "must be powers of two up to 32768")),
        })
        .collect::<Result<Vec<u16>>>()?;
    if queue_sizes.is_empty() {
        return Err(options.invalid("queue_sizes", "needs at least one queue"));
    }
    Ok(VhostUserConfig {
        device_type,
        socket: PathBuf::from(socket),
        queue_sizes,
        control_socket: options.get("control_socket").map(PathBuf::from),
    })
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

    #[test]
    fn generic_vhost_user_takes_cloud_hypervisors_syntax() {
        let c = parse_generic_vhost_user(
            "device_type=balloon,socket=/run/b.sock,queue_sizes=[256,256,128],id=b0",
        )
        .unwrap();
        assert_eq!(c.device_type, 5);
        assert_eq!(c.socket, PathBuf::from("/run/b.sock"));
        assert_eq!(c.queue_sizes, vec![256, 256, 128]);
        assert_eq!(c.control_socket, None);
        let c = parse_generic_vhost_user(
            "device_type=5,socket=s,queue_sizes=64,control_socket=/run/api.sock",
        )
        .unwrap();
        assert_eq!(c.queue_sizes, vec![64]);
        assert_eq!(c.control_socket, Some(PathBuf::from("/run/api.sock")));
        for bad in [
            "socket=s,queue_sizes=[1]",
            "device_type=balloon,queue_sizes=[1]",
            "device_type=balloon,socket=s",
            "device_type=balloon,socket=s,queue_sizes=[]",
            "device_type=balloon,socket=s,queue_sizes=[100]",
            "device_type=05,socket=s,queue_sizes=[1]",
            "device_type=toaster,socket=s,queue_sizes=[1]",
            "device_type=balloon,socket=s,queue_sizes=[1],vhost_user=x",
        ] {
            assert!(parse_generic_vhost_user(bad).is_err(), "{bad}");
        }
        let mut config = VmConfig::new(PathBuf::from("k"));
        config.vhost_user.push(c);
        assert!(config.validate().is_err(), "private memory is refused");
        config.memory_shared = true;
        config.validate().unwrap();
    }
}
