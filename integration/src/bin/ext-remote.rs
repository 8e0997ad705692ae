//! `ext-remote`: a `ch-remote`-style client for the ext-vmm API socket.
//!
//! Prints the response body (if any) and exits 0 on a 2xx answer; otherwise prints the
//! server's error messages to stderr and exits 1 (the VMM refused) or 2 (no answer at all).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use integration::api::{ApiClient, ApiResponse};

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
#[derive(Subcommand, Debug, Clone, Copy)]
enum Command {
    /// Check that the VMM answers; prints its version and pid.
    Ping,
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
}

impl Command {
    /// HTTP method and endpoint, as in Cloud Hypervisor's API.
    fn endpoint(self) -> (&'static str, &'static str) {
        match self {
            Command::Ping => ("GET", "vmm.ping"),
            Command::Info => ("GET", "vm.info"),
            Command::Pause => ("PUT", "vm.pause"),
            Command::Resume => ("PUT", "vm.resume"),
            Command::Shutdown => ("PUT", "vm.shutdown"),
            Command::ShutdownVmm => ("PUT", "vmm.shutdown"),
            Command::Counters => ("GET", "vm.counters"),
        }
    }
}

fn report_refusal(method: &str, endpoint: &str, response: &ApiResponse) {
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
    let response = ApiClient::connect(&cli.api_socket)
        .and_then(|mut client| client.request(method, endpoint, None));
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
