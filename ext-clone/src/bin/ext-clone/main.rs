//! `ext-clone`: clone a running VM through its VMM's REST API, list and destroy the clones,
//! and (with the `bench` feature) measure clone latency and memory on this host's KVM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use ext_clone::{clone_vm, destroy_clones, list_clones, CloneOptions, VmmCommand};

#[cfg(feature = "bench")]
mod bench;

/// Clone VMs (ext-vmm or Cloud Hypervisor) through their REST API.
#[derive(Parser, Debug)]
#[command(name = "ext-clone", version)]
struct Args {
    /// error | warn | info | debug (logs go to stderr).
    #[arg(long = "log-level", default_value = "warn", global = true)]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pause the source, snapshot it, resume it, and start N clones of that snapshot, each
    /// with a new VM generation ID before it runs.
    Clone {
        /// The source VMM's API socket.
        #[arg(long)]
        source: PathBuf,
        /// Number of clones.
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// Directory for the snapshot (`snapshot-<n>`) and the clones (`clone-<n>`).
        #[arg(long)]
        out: PathBuf,
        /// Restore mode of the clones: mapped (copy-on-write over the snapshot's page cache)
        /// or ondemand (userfaultfd).
        #[arg(long, default_value = "mapped")]
        mode: String,
        /// The VMM binary the clones run in (ext-vmm, or cloud-hypervisor); default: the
        /// `ext-vmm` beside this binary, else on PATH.
        #[arg(long)]
        vmm: Option<PathBuf>,
        /// Bound of every API call and of each clone's start, seconds.
        #[arg(long, default_value_t = 30.0)]
        timeout: f64,
        /// Clone even if the VMM cannot give clones a new VM generation ID.
        #[arg(long)]
        allow_shared_identity: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the clones under a directory.
    List {
        /// The `--out` directory of `clone`.
        #[arg(long)]
        out: PathBuf,
    },
    /// Shut down every clone under a directory and remove it and its snapshots.
    Destroy {
        /// The `--out` directory of `clone`.
        #[arg(long)]
        out: PathBuf,
        /// How long each clone may take to shut down before it is killed, seconds.
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Clone latency and memory on this host's /dev/kvm with a tiny guest.
    #[cfg(feature = "bench")]
    Bench(bench::BenchArgs),
}

/// The `ext-vmm` next to this binary (the build's), else the one on PATH.
fn default_vmm() -> PathBuf {
    std::env::current_exe()
        .ok()
        .map(|exe| exe.with_file_name("ext-vmm"))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("ext-vmm"))
}

fn seconds(value: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value).map_err(|e| format!("timeout {value}: {e}"))
}

fn run(command: Command) -> Result<bool, String> {
    match command {
        Command::Clone {
            source,
            count,
            out,
            mode,
            vmm,
            timeout,
            allow_shared_identity,
            json,
        } => {
            let options = CloneOptions {
                source,
                count,
                out,
                mode,
                vmm: VmmCommand::guess(vmm.unwrap_or_else(default_vmm)),
                timeout: seconds(timeout)?,
                allow_shared_identity,
            };
            let report = clone_vm(&options).map_err(|e| e.to_string())?;
            if json {
                let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
                println!("{text}");
            } else {
                println!(
                    "snapshot {} in {:.1} ms; source paused {:.1} ms; source vmgenid {}",
                    report.snapshot.display(),
                    report.snapshot_ms,
                    report.source_paused_ms,
                    report.source_vmgenid.as_deref().unwrap_or("none")
                );
                for clone in &report.clones {
                    println!(
                        "clone {} pid {} api {} vmgenid {} started {:.1} ms, running {:.1} ms after the request",
                        clone.index,
                        clone.pid,
                        clone.api_socket.display(),
                        clone.vmgenid.as_deref().unwrap_or("none"),
                        clone.start_ms,
                        clone.latency_ms
                    );
                }
                for failure in &report.failures {
                    eprintln!("ext-clone: {failure}");
                }
            }
            Ok(report.failures.is_empty())
        }
        Command::List { out } => {
            for clone in list_clones(&out).map_err(|e| e.to_string())? {
                let alive = std::path::Path::new(&format!("/proc/{}", clone.pid)).exists();
                println!(
                    "clone {} pid {} {} api {} vmgenid {}",
                    clone.index,
                    clone.pid,
                    if alive { "running" } else { "gone" },
                    clone.api_socket.display(),
                    clone.vmgenid.as_deref().unwrap_or("none")
                );
            }
            Ok(true)
        }
        Command::Destroy { out, timeout } => {
            let ended = destroy_clones(&out, seconds(timeout)?).map_err(|e| e.to_string())?;
            println!("ended {} clone(s)", ended.len());
            Ok(true)
        }
        #[cfg(feature = "bench")]
        Command::Bench(args) => bench::run(&args, default_vmm()).map(|()| true),
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    match run(args.command) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(message) => {
            eprintln!("ext-clone: {message}");
            ExitCode::FAILURE
        }
    }
}
