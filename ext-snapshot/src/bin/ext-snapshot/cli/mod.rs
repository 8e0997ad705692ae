//! Command-line front end of the `ext-snapshot` binary.
//!
//! Every command prints a short result on stdout and exits 0, or prints one line
//! `ext-snapshot: <error>: <cause>...` on stderr and exits 1 (2 for usage errors, from clap).
//! A spinner shows on stderr only when stderr is a terminal.

mod commands;
mod raw;

use std::error::Error as _;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Sparse VM memory snapshots: page types recorded, data stored only for data pages.
#[derive(Parser, Debug)]
#[command(name = "ext-snapshot", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Snapshot a raw memory file (one region at guest address 0).
    Create {
        /// Raw guest memory; holes in it are recorded as never populated without being read.
        #[arg(long)]
        from: PathBuf,
        /// Snapshot file to write.
        #[arg(long)]
        out: PathBuf,
        /// Bitmap of invalid (balloon / free-reported) guest frames: little-endian u64 words,
        /// bit i of word w is gfn 64*w+i.
        #[arg(long)]
        invalid_pages: Option<PathBuf>,
        /// Put every data page at its guest offset in a sparse file (FORMAT.md "Layouts"):
        /// a mapped restore then needs one mapping per region.
        #[arg(long)]
        guest_offset_layout: bool,
        /// fsync the snapshot before returning.
        #[arg(long)]
        fsync: bool,
    },
    /// Restore a snapshot (or a chain: base first, then diffs) into a sparse raw memory file;
    /// file offset = guest physical address, pages without data become holes.
    Restore {
        /// The snapshot, or a base followed by its diffs.
        #[arg(required = true)]
        snapshots: Vec<PathBuf>,
        /// Raw memory file to write (truncated).
        #[arg(long)]
        to: PathBuf,
    },
    /// Show a snapshot's header, regions, page-type histogram and sizes.
    Inspect {
        /// The snapshot file.
        snapshot: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check every structure and every data checksum of a snapshot.
    Verify {
        /// The snapshot file.
        snapshot: PathBuf,
    },
    /// Write a diff snapshot: pages not in the dirty bitmap are recorded as same-as-parent.
    Diff {
        /// The parent snapshot.
        #[arg(long)]
        parent: PathBuf,
        /// The raw memory file now (same size as the parent's memory).
        #[arg(long)]
        from: PathBuf,
        /// Bitmap of dirty guest frames since the parent (same encoding as --invalid-pages).
        #[arg(long)]
        dirty: PathBuf,
        /// Bitmap of invalid guest frames.
        #[arg(long)]
        invalid_pages: Option<PathBuf>,
        /// Diff snapshot file to write.
        #[arg(long)]
        out: PathBuf,
        /// fsync the snapshot before returning.
        #[arg(long)]
        fsync: bool,
    },
    /// Merge a chain (base first, then diffs) into one standalone snapshot.
    Merge {
        /// Base snapshot followed by its diffs, oldest first.
        #[arg(required = true)]
        snapshots: Vec<PathBuf>,
        /// Merged snapshot file to write.
        #[arg(long)]
        out: PathBuf,
        /// fsync the snapshot before returning.
        #[arg(long)]
        fsync: bool,
    },
    /// Import a Cloud Hypervisor snapshot directory (config.json, state.json, memory-ranges).
    /// config.json and state.json are kept in `<out>.ch/` for export-ch.
    ImportCh {
        /// The Cloud Hypervisor snapshot directory.
        dir: PathBuf,
        /// Snapshot file to write.
        #[arg(long)]
        out: PathBuf,
        /// fsync the snapshot before returning.
        #[arg(long)]
        fsync: bool,
    },
    /// Export an imported snapshot back to a Cloud Hypervisor snapshot directory; the
    /// memory-ranges file is byte-identical to the imported one, with holes where it had them.
    ExportCh {
        /// A snapshot written by import-ch (its `<snapshot>.ch/` sidecar must exist).
        snapshot: PathBuf,
        /// Directory to create the snapshot in (its files must not exist yet).
        #[arg(long)]
        to: PathBuf,
    },
    /// Benchmark our writer and restores against a dense dump and a holes-only sparse copy.
    Bench {
        /// Multiply every memory size (1.0 = the 4 GiB / 4 GiB / 1 GiB).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Directory for temporary files (deleted afterwards); not a tmpfs like /dev/shm.
        #[arg(long, default_value = "/tmp")]
        dir: PathBuf,
        /// fsync every output, ours and the baselines alike.
        #[arg(long)]
        fsync: bool,
        /// Threads of our writer.
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
}

/// Shows a spinner on a terminal, nothing otherwise.
pub(crate) struct Progress(Option<indicatif::ProgressBar>);

impl Progress {
    fn new() -> Self {
        if !std::io::stderr().is_terminal() {
            return Progress(None);
        }
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Progress(Some(bar))
    }

    /// Sets the message next to the spinner.
    pub(crate) fn step(&self, message: &str) {
        if let Some(bar) = &self.0 {
            bar.set_message(message.to_string());
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.0 {
            bar.finish_and_clear();
        }
    }
}

/// Parses the command line, runs the command, maps the result to an exit status.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let progress = Progress::new();
    let result = commands::run(cli.command, &progress);
    drop(progress);
    match result {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            let mut line = error.to_string();
            let mut source = error.source();
            while let Some(cause) = source {
                let text = cause.to_string();
                if !line.contains(&text) {
                    line.push_str(": ");
                    line.push_str(&text);
                }
                source = cause.source();
            }
            eprintln!("ext-snapshot: {}", line.replace('\n', " "));
            ExitCode::FAILURE
        }
    }
}
