//! `ext-remote`: a `ch-remote`-style client for the ext-vmm API socket.
//!
//! Prints the response body (if any) and exits 0 on a 2xx answer; otherwise prints the
//! server's error messages to stderr and exits 1 (the VMM refused) or 2 (no answer at all).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ext_vmm_api::{
    ApiClient, ClientResponse, PermAssign, PermCreateView, PermSet, VmRestoreConfig,
    VmSnapshotConfig,
};

/// Exit status when the VMM answered with an error.
const EXIT_REFUSED: u8 = 1;
/// Exit status when the VMM could not be reached or answered nonsense.
const EXIT_NO_ANSWER: u8 = 2;

/// Command-line interface.
#[derive(Parser, Debug)]
#[command(
    name = "ext-remote",
    version,
    about = "Drive an ext-vmm through its API socket"
)]
struct Cli {
    /// Path of the VMM's API socket.
    #[arg(long, value_name = "PATH")]
    api_socket: PathBuf,
    /// What to ask the VMM.
    #[command(subcommand)]
    command: Command,
}

/// The requests `ext-remote` can send.
#[derive(Subcommand, Debug, Clone)]
enum Command {
    /// Check that the VMM answers; prints its version and pid.
    Ping,
    /// Create the VM from a Cloud Hypervisor VmConfig JSON file (vm.create).
    Create {
        /// The VmConfig JSON file (`-` for standard input).
        config: PathBuf,
    },
    /// Boot the created VM.
    Boot,
    /// Stop the VM if it runs and delete it (the VMM keeps serving).
    Delete,
    /// Reboot the VM: a fresh VM from the same configuration.
    Reboot,
    /// Press the VM's ACPI power button.
    PowerButton,
    /// Print the VM's configuration, state and memory size.
    Info,
    /// Pause the VM's vCPUs.
    Pause,
    /// Resume a paused VM.
    Resume,
    /// Shut the VM down (the VMM keeps serving the API).
    Shutdown,
    /// Shut the VMM itself down.
    ShutdownVmm,
    /// Print the VM's device counters.
    Counters,
    /// Write a snapshot of the paused VM (vm.snapshot).
    Snapshot {
        /// Snapshot directory, e.g. `file:///var/snap/vm1`.
        #[arg(long)]
        destination_url: String,
        /// Write only pages dirtied since this earlier snapshot of the same VM (ext-vmm).
        #[arg(long)]
        parent: Option<String>,
    },
    /// Create the VM from a snapshot (vm.restore; the VMM must have no VM yet).
    Restore {
        /// Snapshot directory, e.g. `file:///var/snap/vm1`.
        #[arg(long)]
        source_url: String,
        /// copy, mapped or ondemand.
        #[arg(long)]
        memory_restore_mode: Option<String>,
        /// Resume the VM once restored.
        #[arg(long)]
        resume: bool,
        /// With ondemand: the socket of a `vhost-user-mem serve` page server (ext-vmm).
        #[arg(long)]
        page_server: Option<String>,
    },
    /// Create a page-permission view (ext-perm).
    PermCreateView {
        /// New view id (view 0 always exists).
        #[arg(long)]
        view: u16,
        /// Permissions of every page not set explicitly, e.g. `rwx`.
        #[arg(long, default_value = "rwx")]
        default_permissions: String,
    },
    /// Set permissions on a guest-physical range of a view (ext-perm).
    PermSet {
        /// The view to change.
        #[arg(long, default_value_t = 0)]
        view: u16,
        /// Page-aligned guest-physical address (decimal or 0x-prefixed hex).
        #[arg(long, value_parser = parse_u64)]
        gpa: u64,
        /// Page-aligned size in bytes (decimal or 0x-prefixed hex).
        #[arg(long, value_parser = parse_u64, default_value = "4096")]
        size: u64,
        /// Permissions, e.g. `r-x`.
        #[arg(long)]
        permissions: String,
    },
    /// Put a vCPU in a view (ext-perm).
    PermAssign {
        /// vCPU index.
        #[arg(long)]
        vcpu: u32,
        /// View id.
        #[arg(long)]
        view: u16,
    },
    /// Print the permission violation and grant reports with the counters (ext-perm).
    PermViolations,
    /// Print how the VM enforces page permissions (ext-perm).
    PermCapabilities,
}

/// Parses a decimal or `0x`-prefixed hexadecimal number.
fn parse_u64(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => text.parse(),
    };
    parsed.map_err(|e| format!("{text:?} is not a number: {e}"))
}

impl Command {
    /// HTTP method and endpoint, as in Cloud Hypervisor's API.
    fn endpoint(&self) -> (&'static str, &'static str) {
        match self {
            Command::Ping => ("GET", "vmm.ping"),
            Command::Create { .. } => ("PUT", "vm.create"),
            Command::Boot => ("PUT", "vm.boot"),
            Command::Delete => ("PUT", "vm.delete"),
            Command::Reboot => ("PUT", "vm.reboot"),
            Command::PowerButton => ("PUT", "vm.power-button"),
            Command::Info => ("GET", "vm.info"),
            Command::Pause => ("PUT", "vm.pause"),
            Command::Resume => ("PUT", "vm.resume"),
            Command::Shutdown => ("PUT", "vm.shutdown"),
            Command::ShutdownVmm => ("PUT", "vmm.shutdown"),
            Command::Counters => ("GET", "vm.counters"),
            Command::Snapshot { .. } => ("PUT", "vm.snapshot"),
            Command::Restore { .. } => ("PUT", "vm.restore"),
            Command::PermCreateView { .. } => ("PUT", "ext/perm.create-view"),
            Command::PermSet { .. } => ("PUT", "ext/perm.set"),
            Command::PermAssign { .. } => ("PUT", "ext/perm.assign"),
            Command::PermViolations => ("GET", "ext/perm.violations"),
            Command::PermCapabilities => ("GET", "ext/perm.capabilities"),
        }
    }

    /// The JSON request body, for the endpoints that take one.
    fn body(&self) -> Result<Option<Vec<u8>>, String> {
        if let Command::Create { config } = self {
            let text = if config.as_os_str() == "-" {
                let mut text = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut text)
                    .map_err(|e| format!("reading standard input: {e}"))?;
                text
            } else {
                std::fs::read(config).map_err(|e| format!("reading {}: {e}", config.display()))?
            };
            return Ok(Some(text));
        }
        self.json_body().map_err(|e| e.to_string())
    }

    fn json_body(&self) -> Result<Option<Vec<u8>>, serde_json::Error> {
        match self {
            Command::PermCreateView {
                view,
                default_permissions,
            } => serde_json::to_vec(&PermCreateView {
                view: *view,
                default_permissions: default_permissions.clone(),
            })
            .map(Some),
            Command::PermSet {
                view,
                gpa,
                size,
                permissions,
            } => serde_json::to_vec(&PermSet {
                view: *view,
                gpa: *gpa,
                size: *size,
                permissions: permissions.clone(),
            })
            .map(Some),
            Command::PermAssign { vcpu, view } => serde_json::to_vec(&PermAssign {
                vcpu: *vcpu,
                view: *view,
            })
            .map(Some),
            Command::Snapshot {
                destination_url,
                parent,
            } => serde_json::to_vec(&VmSnapshotConfig {
                destination_url: destination_url.clone(),
                parent: parent.clone(),
            })
            .map(Some),
            Command::Restore {
                source_url,
                memory_restore_mode,
                resume,
                page_server,
            } => serde_json::to_vec(&VmRestoreConfig {
                source_url: source_url.clone(),
                memory_restore_mode: memory_restore_mode.clone(),
                resume: Some(*resume),
                page_server: page_server.clone(),
            })
            .map(Some),
            _ => Ok(None),
        }
    }
}

fn report_refusal(method: &str, endpoint: &str, response: &ClientResponse) {
    eprintln!(
        "ext-remote: {method} {endpoint} failed: HTTP {} {}",
        response.status, response.reason
    );
    for message in response.error_messages() {
        eprintln!("  {message}");
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (method, endpoint) = cli.command.endpoint();
    let body = match cli.command.body() {
        Ok(body) => body,
        Err(err) => {
            eprintln!("ext-remote: cannot encode the {endpoint} request: {err}");
            return ExitCode::from(EXIT_NO_ANSWER);
        }
    };
    let response = ApiClient::connect(&cli.api_socket)
        .and_then(|mut client| client.request(method, endpoint, body.as_deref()));
    match response {
        Ok(response) if response.is_success() => {
            if !response.body.is_empty() {
                println!("{}", response.body_text());
            }
            ExitCode::SUCCESS
        }
        Ok(response) => {
            report_refusal(method, endpoint, &response);
            ExitCode::from(EXIT_REFUSED)
        }
        Err(err) => {
            eprintln!("ext-remote: {method} {endpoint}: {err}");
            ExitCode::from(EXIT_NO_ANSWER)
        }
    }
}
