//! `PUT vm.create`'s body: Cloud Hypervisor's `VmConfig` JSON, checked field by field.
//!
//! A client written for Cloud Hypervisor (its `ch-remote create`, or a config copied from its
//! `vm.info`) sends the whole `VmConfig`, most of it defaults. We accept every field we
//! implement, and every other field only while it holds Cloud Hypervisor's "nothing" value
//! (`null`, `false`, `[]`, `{}`, or the listed default). Anything else is refused with a 400
//! that names the field: silently ignoring, say, `memory.hugepages: true` or a `net` device
//! would boot a VM other than the one asked for.

use serde_json::{Map, Value};

use crate::error::ApiError;

/// Where a serial port's output goes (Cloud Hypervisor's `ConsoleConfig.mode`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputMode {
    /// No device output (`Off` or `Null`).
    Off,
    /// The VMM's stdout (`Tty`).
    Tty,
    /// Appended to a file (`File` with `file`).
    File(String),
}

/// One virtio-blk disk (`DiskConfig`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// Image path on the host.
    pub path: String,
    /// Read-only for the guest.
    pub readonly: bool,
}

/// One device served by a vhost-user backend (`GenericVhostUserConfig`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VhostUserSpec {
    /// The backend's unix socket.
    pub socket: String,
    /// Size of each queue; the length is the number of queues.
    pub queue_sizes: Vec<u16>,
    /// Virtio device type (5 = balloon).
    pub device_type: u32,
}

/// The VM a `vm.create` asks for, in the terms ext-vmm implements.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmCreateConfig {
    /// `payload.kernel`: ELF vmlinux with a PVH note.
    pub kernel: String,
    /// `payload.initramfs`.
    pub initramfs: Option<String>,
    /// `payload.cmdline`.
    pub cmdline: Option<String>,
    /// `cpus.boot_vcpus` (default 1).
    pub boot_vcpus: u8,
    /// `memory.size` in bytes (default 512 MiB, as Cloud Hypervisor).
    pub memory_size: u64,
    /// `memory.shared`: memfd-backed guest RAM.
    pub memory_shared: bool,
    /// `serial.mode` (default `Null` in Cloud Hypervisor: off).
    pub serial: OutputMode,
    /// `console.mode`: where the virtio-console's output goes (default `Tty`).
    pub console: OutputMode,
    /// `disks`.
    pub disks: Vec<DiskSpec>,
    /// `generic_vhost_user`.
    pub generic_vhost_user: Vec<VhostUserSpec>,
}

/// Cloud Hypervisor's default memory size (`DEFAULT_MEMORY_MB`).
const DEFAULT_MEMORY: u64 = 512 << 20;

impl VmCreateConfig {
    /// Parses and checks a `VmConfig` body; the error names the first offending field.
    pub fn from_json(body: &[u8]) -> Result<Self, ApiError> {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request_with("invalid JSON request body", e.to_string()))?;
        let Value::Object(top) = value else {
            return Err(ApiError::bad_request(
                "vm.create: the body must be a JSON object",
            ));
        };
        let mut fields = Fields::new(top, "");
        let mut payload = fields
            .object("payload")?
            .ok_or_else(|| ApiError::bad_request("vm.create: payload.kernel is required"))?;
        let kernel = payload
            .string("kernel")?
            .ok_or_else(|| ApiError::bad_request("vm.create: payload.kernel is required"))?;
        let initramfs = payload.string("initramfs")?;
        let cmdline = payload.string("cmdline")?;
        payload.finish()?;

        let mut boot_vcpus = 1;
        if let Some(mut cpus) = fields.object("cpus")? {
            let boot = cpus.integer("boot_vcpus")?.unwrap_or(1);
            boot_vcpus = u8::try_from(boot)
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| cpus.invalid("boot_vcpus", "must be 1 to 255"))?;
            if let Some(max) = cpus.integer("max_vcpus")? {
                if max != boot {
                    return Err(cpus.invalid(
                        "max_vcpus",
                        "must equal boot_vcpus: ext-vmm has no CPU hotplug",
                    ));
                }
            }
            // Cloud Hypervisor's defaults, which change nothing here.
            cpus.allow_value("max_phys_bits", &Value::from(46));
            cpus.finish()?;
        }

        let mut memory_size = DEFAULT_MEMORY;
        let mut memory_shared = false;
        if let Some(mut memory) = fields.object("memory")? {
            memory_size = memory.integer("size")?.unwrap_or(DEFAULT_MEMORY);
            if memory_size == 0 || memory_size % 4096 != 0 {
                return Err(memory.invalid("size", "must be a non-zero multiple of 4096"));
            }
            memory_shared = memory.boolean("shared")?.unwrap_or(false);
            // THP is the host's allocation policy, invisible to the guest; ACPI is the
            // default hotplug method and means nothing without hotplug_size.
            memory.allow_any("thp");
            memory.allow_value("hotplug_method", &Value::from("Acpi"));
            memory.finish()?;
        }

        let serial = match fields.object("serial")? {
            Some(serial) => output_mode(serial)?,
            None => OutputMode::Off,
        };
        let console = match fields.object("console")? {
            Some(console) => output_mode(console)?,
            None => OutputMode::Tty,
        };

        let mut disks = Vec::new();
        if let Some(list) = fields.array("disks")? {
            for (index, disk) in list.into_iter().enumerate() {
                let path = format!("disks[{index}]");
                let Value::Object(disk) = disk else {
                    return Err(ApiError::bad_request(format!(
                        "vm.create: {path} must be an object"
                    )));
                };
                let mut disk = Fields::new(disk, &path);
                let image = disk
                    .string("path")?
                    .ok_or_else(|| disk.invalid("path", "is required"))?;
                let readonly = disk.boolean("readonly")?.unwrap_or(false);
                disk.allow_value("num_queues", &Value::from(1));
                disk.allow_any("queue_size");
                disk.allow_any("id");
                disk.finish()?;
                disks.push(DiskSpec {
                    path: image,
                    readonly,
                });
            }
        }
        let mut generic_vhost_user = Vec::new();
        if let Some(list) = fields.array("generic_vhost_user")? {
            for (index, device) in list.into_iter().enumerate() {
                let path = format!("generic_vhost_user[{index}]");
                let Value::Object(device) = device else {
                    return Err(ApiError::bad_request(format!(
                        "vm.create: {path} must be an object"
                    )));
                };
                generic_vhost_user.push(vhost_user_spec(Fields::new(device, &path))?);
            }
        }
        fields.finish()?;
        Ok(VmCreateConfig {
            kernel,
            initramfs,
            cmdline,
            boot_vcpus,
            memory_size,
            memory_shared,
            serial,
            console,
            disks,
            generic_vhost_user,
        })
    }
}

fn vhost_user_spec(mut device: Fields) -> Result<VhostUserSpec, ApiError> {
    let socket = device
        .string("socket")?
        .ok_or_else(|| device.invalid("socket", "is required"))?;
    let device_type = device
        .integer("device_type")?
        .and_then(|t| u32::try_from(t).ok())
        .filter(|t| *t > 0)
        .ok_or_else(|| device.invalid("device_type", "is required (a virtio device ID)"))?;
    let sizes = device
        .array("queue_sizes")?
        .ok_or_else(|| device.invalid("queue_sizes", "is required"))?;
    let queue_sizes = sizes
        .iter()
        .map(|size| {
            size.as_u64()
                .and_then(|s| u16::try_from(s).ok())
                .filter(|s| s.is_power_of_two())
        })
        .collect::<Option<Vec<u16>>>()
        .filter(|sizes| !sizes.is_empty())
        .ok_or_else(|| device.invalid("queue_sizes", "must be powers of two up to 32768"))?;
    device.allow_any("id");
    device.allow_value("pci_segment", &Value::from(0));
    device.finish()?;
    Ok(VhostUserSpec {
        socket,
        queue_sizes,
        device_type,
    })
}

fn output_mode(mut config: Fields) -> Result<OutputMode, ApiError> {
    let mode = config.string("mode")?.unwrap_or_else(|| "Null".into());
    let file = config.string("file")?;
    let result = match (mode.as_str(), file) {
        ("Off" | "Null", None) => OutputMode::Off,
        ("Tty", None) => OutputMode::Tty,
        ("File", Some(file)) => OutputMode::File(file),
        ("File", None) => return Err(config.invalid("file", "is required with mode File")),
        (_, Some(_)) => return Err(config.invalid("file", "is only used with mode File")),
        (other, None) => {
            return Err(config.invalid(
                "mode",
                &format!("{other:?} is not supported (Off, Null, Tty or File)"),
            ))
        }
    };
    config.finish()?;
    Ok(result)
}

/// The fields of one JSON object, taken one by one; [`Fields::finish`] refuses what is left
/// unless it is a "nothing" value.
struct Fields {
    map: Map<String, Value>,
    prefix: String,
}

impl Fields {
    fn new(map: Map<String, Value>, prefix: &str) -> Self {
        Fields {
            map,
            prefix: prefix.to_string(),
        }
    }

    fn name(&self, key: &str) -> String {
        if self.prefix.is_empty() {
            key.to_string()
        } else {
            format!("{}.{key}", self.prefix)
        }
    }

    fn invalid(&self, key: &str, why: &str) -> ApiError {
        ApiError::bad_request(format!("vm.create: {} {why}", self.name(key)))
    }

    /// Removes `key`; `None` when absent or `null`.
    fn take(&mut self, key: &str) -> Option<Value> {
        self.map.remove(key).filter(|v| !v.is_null())
    }

    fn object(&mut self, key: &str) -> Result<Option<Fields>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Fields::new(map, &self.name(key)))),
            Some(_) => Err(self.invalid(key, "must be an object")),
        }
    }

    fn array(&mut self, key: &str) -> Result<Option<Vec<Value>>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Array(list)) => Ok(Some(list)),
            Some(_) => Err(self.invalid(key, "must be an array")),
        }
    }

    fn string(&mut self, key: &str) -> Result<Option<String>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(self.invalid(key, "must be a string")),
        }
    }

    fn integer(&mut self, key: &str) -> Result<Option<u64>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(value) => value
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.invalid(key, "must be a non-negative integer")),
        }
    }

    fn boolean(&mut self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.take(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(self.invalid(key, "must be true or false")),
        }
    }

    /// Drops `key` when it holds exactly `default` (left for [`Fields::finish`] otherwise).
    fn allow_value(&mut self, key: &str, default: &Value) {
        if self.map.get(key) == Some(default) {
            self.map.remove(key);
        }
    }

    /// Drops `key` whatever it holds: a setting that does not change the VM.
    fn allow_any(&mut self, key: &str) {
        self.map.remove(key);
    }

    /// Refuses the first remaining field that holds more than "nothing".
    fn finish(self) -> Result<(), ApiError> {
        for (key, value) in &self.map {
            let nothing = match value {
                Value::Null | Value::Bool(false) => true,
                Value::Array(list) => list.is_empty(),
                Value::Object(map) => map.is_empty(),
                _ => false,
            };
            if !nothing {
                return Err(ApiError::bad_request(format!(
                    "vm.create: field {} is not supported by ext-vmm (value {value})",
                    self.name(key)
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<VmCreateConfig, ApiError> {
        VmCreateConfig::from_json(json.as_bytes())
    }

    #[test]
    fn generic_vhost_user_devices_are_taken() {
        let config = parse(
            r#"{"payload":{"kernel":"/k"},"memory":{"size":1073741824,"shared":true},
                "generic_vhost_user":[{"socket":"/run/b.sock","queue_sizes":[256,256,128],
                "device_type":5,"id":"b0","pci_segment":0}]}"#,
        )
        .unwrap();
        assert_eq!(
            config.generic_vhost_user,
            vec![VhostUserSpec {
                socket: "/run/b.sock".into(),
                queue_sizes: vec![256, 256, 128],
                device_type: 5,
            }]
        );
        for (bad, field) in [
            (r#"[{"queue_sizes":[1],"device_type":5}]"#, "socket"),
            (
                r#"[{"socket":"s","queue_sizes":[3],"device_type":5}]"#,
                "queue_sizes",
            ),
            (
                r#"[{"socket":"s","queue_sizes":[],"device_type":5}]"#,
                "queue_sizes",
            ),
            (r#"[{"socket":"s","queue_sizes":[1]}]"#, "device_type"),
            (
                r#"[{"socket":"s","queue_sizes":[1],"device_type":5,"pci_segment":1}]"#,
                "pci_segment",
            ),
            (
                r#"[{"socket":"s","queue_sizes":[1],"device_type":5,"extra":true}]"#,
                "extra",
            ),
        ] {
            let body = format!(r#"{{"payload":{{"kernel":"/k"}},"generic_vhost_user":{bad}}}"#);
            let error = parse(&body).unwrap_err();
            assert!(
                error.messages.iter().any(|m| m.contains(field)),
                "{bad}: {:?}",
                error.messages
            );
        }
    }

    #[test]
    fn a_minimal_config_takes_cloud_hypervisor_defaults() {
        let config = parse(r#"{"payload":{"kernel":"/k"}}"#).unwrap();
        assert_eq!(config.kernel, "/k");
        assert_eq!(config.boot_vcpus, 1);
        assert_eq!(config.memory_size, 512 << 20);
        assert!(!config.memory_shared);
        assert_eq!(config.serial, OutputMode::Off);
        assert_eq!(config.console, OutputMode::Tty);
    }

    #[test]
    fn the_supported_fields_are_read() {
        let config = parse(
            r#"{"payload":{"kernel":"/k","initramfs":"/i","cmdline":"console=ttyS0"},
                "cpus":{"boot_vcpus":2,"max_vcpus":2,"topology":null,"kvm_hyperv":false,
                        "max_phys_bits":46,"affinity":null,"features":{}},
                "memory":{"size":1073741824,"shared":true,"mergeable":false,"hugepages":false,
                          "thp":true,"hotplug_method":"Acpi","zones":null},
                "serial":{"mode":"Tty","file":null,"socket":null,"iommu":false},
                "console":{"mode":"Off"},
                "disks":[{"path":"/d","readonly":true,"direct":false,"num_queues":1,"id":null}],
                "net":null,"iommu":false,"watchdog":false,"devices":[],"platform":null}"#,
        )
        .unwrap();
        assert_eq!(config.boot_vcpus, 2);
        assert_eq!(config.memory_size, 1 << 30);
        assert!(config.memory_shared);
        assert_eq!(config.serial, OutputMode::Tty);
        assert_eq!(config.console, OutputMode::Off);
        assert_eq!(
            config.disks,
            vec![DiskSpec {
                path: "/d".into(),
                readonly: true
            }]
        );
    }

    #[test]
    fn unsupported_settings_are_refused_by_name() {
        for (json, field) in [
            (
                r#"{"payload":{"kernel":"/k"},"memory":{"hugepages":true}}"#,
                "memory.hugepages",
            ),
            (
                r#"{"payload":{"kernel":"/k","firmware":"/f"}}"#,
                "payload.firmware",
            ),
            (r#"{"payload":{"kernel":"/k"},"net":[{"tap":"t0"}]}"#, "net"),
            (
                r#"{"payload":{"kernel":"/k"},"rng":{"src":"/dev/urandom"}}"#,
                "rng",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"cpus":{"boot_vcpus":1,"max_vcpus":2}}"#,
                "cpus.max_vcpus",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"serial":{"mode":"Pty"}}"#,
                "serial.mode",
            ),
            (
                r#"{"payload":{"kernel":"/k"},"disks":[{"path":"/d","direct":true}]}"#,
                "disks[0].direct",
            ),
            (r#"{"payload":{}}"#, "payload.kernel"),
            (
                r#"{"payload":{"kernel":"/k"},"memory":{"size":12}}"#,
                "memory.size",
            ),
        ] {
            let error = parse(json).unwrap_err();
            assert_eq!(error.status(), 400, "{json}");
            assert!(
                error.messages[0].contains(field),
                "{json}: {:?}",
                error.messages
            );
        }
    }

    #[test]
    fn malformed_bodies_are_bad_requests() {
        for json in [
            "",
            "[]",
            "{",
            r#"{"payload":"k"}"#,
            r#"{"payload":{"kernel":1}}"#,
        ] {
            assert_eq!(parse(json).unwrap_err().status(), 400, "{json}");
        }
    }
}
