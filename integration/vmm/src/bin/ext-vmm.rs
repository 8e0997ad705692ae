//! `ext-vmm`: boot a Linux guest (ELF vmlinux with a PVH note) on KVM, with a Cloud-Hypervisor
//! style command line and, optionally, the REST API on a unix socket.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use ext_vmm::config::{self, VmConfig};
use ext_vmm::error::Error;
use ext_vmm::exit::ExitReason;
use ext_vmm::slot::VmmSlot;
use ext_vmm::snapshot::RestoreConfig;
use ext_vmm::Vmm;
use ext_vmm_api::start_api_server;

/// Boot a Linux guest on KVM.
#[derive(Parser, Debug)]
#[command(name = "ext-vmm", version)]
struct Args {
    /// ELF vmlinux with a PVH entry note (without it and without --restore, the VMM waits
    /// for `vm.create` or `vm.restore` on the API socket).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Restore a snapshot: source_url=file:///dir[,memory_restore_mode=copy|mapped|ondemand]
    /// [,resume=true|false][,page_server=<socket>] (ondemand only: a `vhost-user-mem serve`
    /// process serves the faults). The VM configuration comes from the snapshot.
    #[arg(long, conflicts_with = "kernel")]
    restore: Option<String>,
    /// Initramfs handed to the kernel.
    #[arg(long)]
    initramfs: Option<PathBuf>,
    /// Kernel command line (include console=ttyS0 for a serial console).
    #[arg(long, default_value = "console=ttyS0")]
    cmdline: String,
    /// vCPUs: boot=<N>.
    #[arg(long, default_value = "boot=1")]
    cpus: String,
    /// Memory: size=<N>[K|M|G],shared=on|off.
    #[arg(long, default_value = "size=512M")]
    memory: String,
    /// Serial console: tty | off | file=<path> (default tty; with --restore, default the
    /// snapshot's setting).
    #[arg(long)]
    serial: Option<String>,
    /// virtio-blk disk: path=<file>[,readonly=on] (repeatable).
    #[arg(long)]
    disk: Vec<String>,
    /// A device served by a vhost-user backend:
    /// device_type=<n|name>,socket=<path>,queue_sizes=[<n>,...][,control_socket=<path>]
    /// (repeatable; needs --memory shared=on).
    #[arg(long = "generic-vhost-user")]
    generic_vhost_user: Vec<String>,
    /// Serve the REST API: path=<socket>.
    #[arg(long = "api-socket")]
    api_socket: Option<String>,
    /// error | warn | info | debug | trace (logs go to stderr).
    #[arg(long = "log-level", default_value = "warn")]
    log_level: String,
}

fn build_config(args: &Args, kernel: PathBuf) -> Result<VmConfig, Error> {
    let mut config = VmConfig::new(kernel);
    config.initramfs = args.initramfs.clone();
    config.cmdline = args.cmdline.clone();
    config.cpus = config::parse_cpus(&args.cpus)?;
    (config.memory_size, config.memory_shared) = config::parse_memory(&args.memory)?;
    config.serial = config::parse_serial(args.serial.as_deref().unwrap_or("tty"))?;
    config.disks = args
        .disk
        .iter()
        .map(|d| config::parse_disk(d))
        .collect::<Result<_, _>>()?;
    config.vhost_user = args
        .generic_vhost_user
        .iter()
        .map(|v| config::parse_generic_vhost_user(v))
        .collect::<Result<_, _>>()?;
    config.validate()?;
    Ok(config)
}

/// Where the VM comes from.
enum Source {
    Boot(VmConfig),
    Restore(RestoreConfig),
    /// Nothing yet: wait for `vm.restore` on the API socket.
    Api,
}

fn run(args: Args) -> Result<ExitReason, String> {
    let source = match (&args.kernel, &args.restore) {
        (Some(kernel), _) => {
            Source::Boot(build_config(&args, kernel.clone()).map_err(|e| e.to_string())?)
        }
        (None, Some(restore)) => {
            let mut restore = RestoreConfig::parse(restore).map_err(|e| e.to_string())?;
            restore.serial = args
                .serial
                .as_deref()
                .map(config::parse_serial)
                .transpose()
                .map_err(|e| e.to_string())?;
            Source::Restore(restore)
        }
        (None, None) if args.api_socket.is_some() => Source::Api,
        (None, None) => return Err("--kernel, --restore or --api-socket is required".into()),
    };
    let socket = args
        .api_socket
        .as_deref()
        .map(config::parse_api_socket)
        .transpose()
        .map_err(|e| e.to_string())?;
    let slot = Arc::new(match &source {
        Source::Boot(config) => VmmSlot::with_vmm(Arc::new(
            Vmm::new(config.clone()).map_err(|e| format!("cannot create the VM: {e}"))?,
        )),
        Source::Restore(restore) => VmmSlot::with_vmm(Arc::new(
            Vmm::restore(restore).map_err(|e| format!("cannot restore the VM: {e}"))?,
        )),
        Source::Api => VmmSlot::default(),
    });
    let server = match &socket {
        Some(path) => Some(
            start_api_server(path, slot.clone())
                .map_err(|e| format!("cannot serve the API on {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let boot_first = matches!(source, Source::Boot(_) | Source::Restore(_));
    let reason = slot
        .run(boot_first, server.is_some())
        .map_err(|e| e.to_string());
    if let Some(server) = server {
        server.shutdown();
    }
    reason
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(args) {
        Ok(ExitReason::Error(message)) => {
            eprintln!("ext-vmm: VM failed: {message}");
            ExitCode::FAILURE
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("ext-vmm: {message}");
            ExitCode::FAILURE
        }
    }
}
