//! The commands, each returning the text to print on success.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::path::Path;

use ext_snapshot::cloud_hypervisor::{self, ChError};
use ext_snapshot::{
    restore_to_raw_file, FileLayout, GfnBitmap, PageSet, PageType, RawLayout, SnapshotChain,
    SnapshotFile, SnapshotReport, SnapshotWriter, WriteOptions, PAGE_SIZE,
};

use super::raw::{map_raw_memory, read_bitmap};
use super::{Command, Progress};
use crate::bench::error::BenchError;
use crate::bench::{self, BenchOptions};

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The snapshot library failed.
    #[error(transparent)]
    Snapshot(#[from] ext_snapshot::Error),
    /// The benchmark failed.
    #[error(transparent)]
    Bench(#[from] BenchError),
    /// The Cloud Hypervisor import or export failed.
    #[error(transparent)]
    CloudHypervisor(#[from] ChError),
    /// A file of the command line could not be used.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The inputs do not fit together.
    #[error("{0}")]
    Usage(String),
}

impl CliError {
    pub(crate) fn io(context: String, error: std::io::Error) -> Self {
        CliError::Io(context, error)
    }
}

fn write_options(fsync: bool) -> WriteOptions {
    WriteOptions {
        fsync,
        ..WriteOptions::default()
    }
}

/// Runs `command`.
pub(crate) fn run(command: Command, progress: &Progress) -> Result<String, CliError> {
    match command {
        Command::Create {
            from,
            out,
            invalid_pages,
            guest_offset_layout,
            fsync,
        } => {
            progress.step("snapshotting");
            let memory = map_raw_memory(&from)?;
            let invalid = invalid_pages.as_deref().map(read_bitmap).transpose()?;
            let invalid_set = invalid.as_deref().map(GfnBitmap::new);
            let layout = if guest_offset_layout {
                FileLayout::GuestOffset
            } else {
                FileLayout::Packed
            };
            let mut writer = SnapshotWriter::new(write_options(fsync)).file_layout(layout);
            if let Some(set) = &invalid_set {
                writer = writer.invalid_pages(set as &dyn PageSet);
            }
            let report = writer.write_file(&memory, &out)?;
            Ok(describe_write(&out, &report))
        }
        Command::Restore { snapshots, to } => {
            progress.step("restoring");
            let out = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&to)
                .map_err(|e| CliError::io(format!("creating {}", to.display()), e))?;
            let report = if snapshots.len() == 1 {
                let snapshot = SnapshotFile::open(&snapshots[0])?;
                restore_to_raw_file(&snapshot, &out, RawLayout::GuestPhysical)?
            } else {
                SnapshotChain::open(&snapshots)?
                    .restore_to_raw_file(&out, RawLayout::GuestPhysical)?
            };
            Ok(format!(
                "restored {} data pages ({} bytes) into {}\n",
                report.data_pages,
                report.data_pages * PAGE_SIZE,
                to.display()
            ))
        }
        Command::Inspect { snapshot, json } => inspect(&snapshot, json),
        Command::Verify { snapshot } => {
            progress.step("verifying");
            let file = SnapshotFile::open(&snapshot)?;
            file.verify_data()?;
            Ok(format!(
                "{}: ok ({} data bytes verified)\n",
                snapshot.display(),
                file.data_bytes()
            ))
        }
        Command::Diff {
            parent,
            from,
            dirty,
            invalid_pages,
            out,
            fsync,
        } => {
            progress.step("writing diff");
            let parent = SnapshotFile::open(&parent)?;
            let memory = map_raw_memory(&from)?;
            let dirty = read_bitmap(&dirty)?;
            let dirty_set = GfnBitmap::new(&dirty);
            let invalid = invalid_pages.as_deref().map(read_bitmap).transpose()?;
            let invalid_set = invalid.as_deref().map(GfnBitmap::new);
            let mut writer =
                SnapshotWriter::new(write_options(fsync)).diff_against(&parent, &dirty_set);
            if let Some(set) = &invalid_set {
                writer = writer.invalid_pages(set as &dyn PageSet);
            }
            let report = writer.write_file(&memory, &out)?;
            Ok(describe_write(&out, &report))
        }
        Command::Merge {
            snapshots,
            out,
            fsync,
        } => {
            progress.step("merging");
            let report = SnapshotChain::open(&snapshots)?.merge(&out, write_options(fsync))?;
            Ok(describe_write(&out, &report))
        }
        Command::ImportCh { dir, out, fsync } => {
            progress.step("importing");
            let report = cloud_hypervisor::import(&dir, &out, write_options(fsync))?;
            let mut text = describe_write(&out, &report.snapshot);
            let _ = writeln!(
                text,
                "memory-ranges: {} bytes described, {} bytes of data extents; sidecar {}",
                report.saved_bytes,
                report.copied_bytes,
                cloud_hypervisor::sidecar_dir(&out).display()
            );
            Ok(text)
        }
        Command::ExportCh { snapshot, to } => {
            progress.step("exporting");
            let written = cloud_hypervisor::export(&snapshot, &to)?;
            Ok(format!(
                "exported to {} ({written} bytes of memory written, the rest left as holes)\n",
                to.display()
            ))
        }
        Command::Bench {
            scale,
            dir,
            fsync,
            threads,
        } => {
            if !(scale > 0.0 && scale <= 4.0) {
                return Err(CliError::Usage(format!(
                    "--scale {scale}: must be in (0, 4]"
                )));
            }
            let options = BenchOptions {
                scale,
                dir: dir.join(format!("ext-snapshot-bench-{}", std::process::id())),
                fsync,
                threads,
            };
            let result = bench::run(&options, &mut |step| progress.step(step));
            let _ = std::fs::remove_dir_all(&options.dir);
            Ok(result?.render())
        }
    }
}

fn describe_write(out: &Path, report: &SnapshotReport) -> String {
    let mut text = format!(
        "wrote {} ({} bytes) in {:.3} s (typing {:.3} s, writing {:.3} s)\n",
        out.display(),
        report.output_bytes,
        report.scan_seconds + report.write_seconds,
        report.scan_seconds,
        report.write_seconds
    );
    for page_type in PageType::ALL {
        let pages = report.pages(page_type);
        if pages > 0 {
            let _ = writeln!(text, "  {:<15} {pages:>12} pages", page_type.name());
        }
    }
    text
}

fn inspect(path: &Path, json: bool) -> Result<String, CliError> {
    let snapshot = SnapshotFile::open(path)?;
    let header = snapshot.header();
    let pages = snapshot.pages_by_type();
    let guest_bytes: u64 = snapshot.regions().iter().map(|r| r.size).sum();
    let runs: usize = snapshot.regions().iter().map(|r| r.runs.len()).sum();
    let extents: usize = snapshot
        .regions()
        .iter()
        .map(|r| r.runs.iter().filter(|run| run.extent.is_some()).count())
        .sum();
    let file_len = snapshot.file_len()?;
    let layout = match snapshot.file_layout() {
        FileLayout::Packed => "packed",
        FileLayout::GuestOffset => "guest-offset",
    };
    if json {
        let histogram: serde_json::Map<String, serde_json::Value> = PageType::ALL
            .iter()
            .map(|t| (t.name().to_string(), pages[*t as usize].into()))
            .collect();
        let regions: Vec<serde_json::Value> = snapshot
            .regions()
            .iter()
            .map(|r| {
                serde_json::json!({
                    "guest_addr": r.guest_addr,
                    "size": r.size,
                    "runs": r.runs.len(),
                })
            })
            .collect();
        let value = serde_json::json!({
            "path": path.display().to_string(),
            "version": header.version,
            "page_size": header.page_size,
            "id": header.id.to_string(),
            "parent": header.parent.map(|p| serde_json::json!({
                "id": p.id.to_string(),
                "digest": p.digest,
            })),
            "digest": header.digest,
            "layout": layout,
            "file_bytes": file_len,
            "data_bytes": snapshot.data_bytes(),
            "guest_bytes": guest_bytes,
            "runs": runs,
            "extents": extents,
            "pages": histogram,
            "regions": regions,
        });
        return Ok(format!("{value:#}\n"));
    }
    let mut text = String::new();
    let _ = writeln!(text, "snapshot   {}", path.display());
    let _ = writeln!(
        text,
        "format     version {}, page size {}, {layout} layout",
        header.version, header.page_size
    );
    let _ = writeln!(
        text,
        "id         {} (digest {:#010x})",
        header.id, header.digest
    );
    match header.parent {
        Some(parent) => {
            let _ = writeln!(
                text,
                "parent     {} (digest {:#010x})",
                parent.id, parent.digest
            );
        }
        None => {
            let _ = writeln!(text, "parent     none (standalone)");
        }
    }
    let _ = writeln!(
        text,
        "sizes      file {file_len} bytes, data {} bytes, guest memory {guest_bytes} bytes",
        snapshot.data_bytes()
    );
    let _ = writeln!(text, "index      {runs} runs, {extents} data extents");
    let total: u64 = pages.iter().sum();
    let _ = writeln!(text, "pages");
    for page_type in PageType::ALL {
        let count = pages[page_type as usize];
        let share = if total == 0 {
            0.0
        } else {
            100.0 * count as f64 / total as f64
        };
        let _ = writeln!(text, "  {:<15} {count:>12} {share:>6.2}%", page_type.name());
    }
    let _ = writeln!(text, "regions");
    for region in snapshot.regions() {
        let _ = writeln!(
            text,
            "  {:#014x} size {:#x} ({} runs)",
            region.guest_addr,
            region.size,
            region.runs.len()
        );
    }
    Ok(text)
}
