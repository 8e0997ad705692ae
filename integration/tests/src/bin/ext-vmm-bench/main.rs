//! `ext-vmm-bench`: what a guest exit and a pause/resume cost in `ext-vmm` on this host's
//! `/dev/kvm`, and (with `--lab`) the L2 boot time under ext-vmm against QEMU in one lab run.
//!
//! Prints figures, asserts none (issue 2: lab timings are emulated, host timings are noisy).
//! Without `/dev/kvm` the host part prints a `SKIPPED:` line and the command exits 0.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::SystemTime;

use clap::Parser;
mod bench;
use bench::{ExitBenchParams, PauseResumeCost, Summary};

/// Measure ext-vmm's exit and pause/resume costs on /dev/kvm (and optionally the lab boot).
#[derive(Parser, Debug)]
#[command(name = "ext-vmm-bench")]
struct Args {
    /// Guest exits per repetition of each exit kind.
    #[arg(long, default_value_t = 10_000)]
    iterations: u32,
    /// Repetitions per exit kind (after one discarded warm-up loop).
    #[arg(long, default_value_t = 5)]
    repetitions: u32,
    /// Pause/resume rounds of the running vCPU.
    #[arg(long = "pause-rounds", default_value_t = 200)]
    pause_rounds: u32,
    /// Also run `ci/lab run l2-qemu` and summarise its EXT-METRIC lines.
    #[arg(long)]
    lab: bool,
    /// Summarise this existing l2-qemu lab log instead of running the lab.
    #[arg(long = "lab-log", conflicts_with = "lab")]
    lab_log: Option<PathBuf>,
    /// Repository root holding ci/lab (default: the one this binary was built from).
    #[arg(long)]
    repo: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let mut ok = true;
    if bench::kvm_available() {
        if let Err(e) = host_benchmarks(&args) {
            eprintln!("ext-vmm-bench: {e}");
            ok = false;
        }
    } else {
        println!("SKIPPED: ext-vmm-bench: /dev/kvm not available");
    }
    let repo = args
        .repo
        .clone()
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    let lab = match (&args.lab_log, args.lab) {
        (Some(log), _) => Some(summarise_lab_log(log)),
        (None, true) => Some(run_lab(&repo)),
        (None, false) => None,
    };
    if let Some(Err(e)) = lab {
        eprintln!("ext-vmm-bench: lab: {e}");
        ok = false;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn host_benchmarks(args: &Args) -> bench::Result<()> {
    let params = ExitBenchParams {
        iterations: args.iterations,
        repetitions: args.repetitions,
    };
    let (exits, tsc_khz) = bench::measure_exits(params)?;
    let pause = bench::measure_pause_resume(args.pause_rounds)?;
    println!(
        "ext-vmm-bench on /dev/kvm: {} exits x {} repetitions per kind, guest TSC {:.1} MHz, {} pause/resume rounds",
        args.iterations,
        args.repetitions,
        f64::from(tsc_khz) / 1000.0,
        args.pause_rounds
    );
    let baseline = exits
        .first()
        .map(|e| e.per_exit.median_us)
        .filter(|m| *m > 0.0)
        .unwrap_or(f64::NAN);
    println!(
        "{:<20} {:>8} {:>11} {:>10} {:>14} {:>7}",
        "row", "samples", "median µs", "p99 µs", "host µs/iter", "ratio"
    );
    for exit in &exits {
        print_row(
            exit.kind.name(),
            &exit.per_exit,
            &format!("{:.2}", exit.host_per_iteration_us),
            baseline,
        );
    }
    let PauseResumeCost {
        pause,
        resume_to_running,
        round_trip,
        separate_cpus,
    } = pause;
    print_row("pause", &pause, "-", baseline);
    print_row("resume-to-running", &resume_to_running, "-", baseline);
    print_row("pause+resume", &round_trip, "-", baseline);
    println!("ratio: median / median of pio-noop. Rows:");
    for exit in &exits {
        println!("  {:<18} {}", exit.kind.name(), exit.kind.description());
    }
    println!(
        "  {:<18} Vmm::pause (vm.pause) of a vCPU busy in an exit loop",
        "pause"
    );
    println!(
        "  {:<18} Vmm::resume (vm.resume) until the guest's next exit is counted",
        "resume-to-running"
    );
    println!("  {:<18} the two above, per round", "pause+resume");
    if separate_cpus {
        println!("Pause rows: vCPU thread and measuring thread pinned to different CPUs.");
    } else {
        println!("Pause rows: one CPU only, resume is polled every ~70 µs.");
    }
    println!(
        "Exit rows: guest TSC between two rdtsc around each exit, so they include the bracket \
         (no-exit-floor); host µs/iter: wall time of a whole loop / iterations."
    );
    Ok(())
}

fn print_row(name: &str, summary: &Summary, host: &str, baseline: f64) {
    println!(
        "{:<20} {:>8} {:>11.2} {:>10.2} {:>14} {:>7.2}",
        name,
        summary.samples,
        summary.median_us,
        summary.p99_us,
        host,
        summary.median_us / baseline
    );
}

/// Runs the lab scenario (its console streams to the terminal), then summarises the log it
/// wrote. The scenario's own verdict decides success.
fn run_lab(repo: &Path) -> Result<(), String> {
    let lab = repo.join("ci/lab");
    let started = SystemTime::now();
    println!("ext-vmm-bench: running {} run l2-qemu", lab.display());
    let status = Command::new(&lab)
        .args(["run", "l2-qemu"])
        .current_dir(repo)
        .status()
        .map_err(|e| format!("cannot run {}: {e}", lab.display()))?;
    let cache = std::env::var_os("EXT_LAB_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo.join(".cache"));
    let log = cache.join("lab-logs/l2-qemu-latest.log");
    let fresh = std::fs::metadata(&log)
        .and_then(|m| m.modified())
        .is_ok_and(|modified| modified >= started);
    if !fresh {
        return Err(format!(
            "ci/lab ended ({status}) without writing a new {}",
            log.display()
        ));
    }
    summarise_lab_log(&log)?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("ci/lab run l2-qemu failed ({status})"))
    }
}

/// The figures of one l2-qemu lab run, from its console log.
#[derive(Debug, Default, PartialEq)]
struct LabRun {
    /// L1 uptime when KVM was ready.
    l1_ready_s: Option<f64>,
    /// L2 start-to-init times under QEMU, in round order.
    qemu_boots: Vec<f64>,
    /// L2 start-to-init times under ext-vmm, in round order.
    ext_vmm_boots: Vec<f64>,
    /// The ratio the scenario itself printed.
    reported_ratio: Option<f64>,
    /// `PASS` or `FAIL ...` from `EXT-SCENARIO-RESULT:`.
    result: Option<String>,
}

fn field<'a>(words: &[&'a str], key: &str) -> Option<&'a str> {
    words.iter().find_map(|w| w.strip_prefix(key))
}

fn parse_lab_log(text: &str) -> LabRun {
    let mut run = LabRun::default();
    for line in text.lines() {
        if let Some(at) = line.find("EXT-L1-READY") {
            let words: Vec<&str> = line[at..].split_whitespace().collect();
            run.l1_ready_s = field(&words, "uptime=").and_then(|v| v.parse().ok());
        }
        if let Some(at) = line.find("EXT-SCENARIO-RESULT:") {
            run.result = Some(line[at + "EXT-SCENARIO-RESULT:".len()..].trim().to_string());
        }
        let Some(at) = line.find("EXT-METRIC ") else {
            continue;
        };
        let words: Vec<&str> = line[at..].split_whitespace().collect();
        if let Some(seconds) = field(&words, "l2_boot_s=").and_then(|v| v.parse().ok()) {
            match field(&words, "vmm=") {
                Some("qemu") => run.qemu_boots.push(seconds),
                Some("ext-vmm") => run.ext_vmm_boots.push(seconds),
                _ => {}
            }
        }
        if let Some(ratio) = field(&words, "l2_boot_ratio=").and_then(|v| v.parse().ok()) {
            run.reported_ratio = Some(ratio);
        }
    }
    run
}

fn mean(values: &[f64]) -> Option<f64> {
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

fn summarise_lab_log(log: &Path) -> Result<(), String> {
    // The runner's `*-latest.log` is a symlink: name the run's own log, which stays.
    let log = &std::fs::canonicalize(log).unwrap_or_else(|_| log.to_path_buf());
    let text = std::fs::read_to_string(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let run = parse_lab_log(&text);
    let (Some(qemu), Some(ext_vmm)) = (mean(&run.qemu_boots), mean(&run.ext_vmm_boots)) else {
        return Err(format!("no l2_boot_s metrics in {}", log.display()));
    };
    let list = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "lab l2-qemu ({}), L1 clock (emulated: compare ratios only)",
        log.display()
    );
    if let Some(ready) = run.l1_ready_s {
        println!("  L1 ready (kvm loaded) at L1 uptime {ready:.2} s");
    }
    println!(
        "  {:<8} {:>8}  boots (s, start to EXT-L2-INIT)",
        "vmm", "mean s"
    );
    println!("  {:<8} {:>8.2}  {}", "qemu", qemu, list(&run.qemu_boots));
    println!(
        "  {:<8} {:>8.2}  {}",
        "ext-vmm",
        ext_vmm,
        list(&run.ext_vmm_boots)
    );
    let reported = run
        .reported_ratio
        .map_or_else(|| "none".to_string(), |r| format!("{r:.2}"));
    println!(
        "  L2 boot ratio ext-vmm / qemu: {:.2} (scenario reported {reported})",
        ext_vmm / qemu
    );
    println!(
        "  scenario result: {}",
        run.result.as_deref().unwrap_or("missing")
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_log_metrics_are_read_despite_console_noise() {
        let log = "Booting from ROM..EXT-L1-READY uptime=4.66 kvm=ok\n\
            EXT-METRIC l2_boot_s=11.68 vmm=qemu round=1 (start to EXT-L2-INIT, L1 clock)\n\
            ext-vmm| EXT-L2-INIT uptime=5.82\n\
            EXT-METRIC l2_boot_s=7.87 vmm=ext-vmm round=2 (start to EXT-L2-INIT, L1 clock)\n\
            EXT-METRIC l2_boot_s=7.62 vmm=ext-vmm round=3 (start to EXT-L2-INIT, L1 clock)\n\
            EXT-METRIC l2_boot_s=9.62 vmm=qemu round=4 (start to EXT-L2-INIT, L1 clock)\n\
            EXT-METRIC l2_boot_mean_s qemu=10.65 ext-vmm=7.75\n\
            EXT-METRIC l2_boot_ratio=0.73 (ext-vmm / qemu)\n\
            EXT-SCENARIO-RESULT: PASS\n";
        let run = parse_lab_log(log);
        assert_eq!(run.l1_ready_s, Some(4.66));
        assert_eq!(run.qemu_boots, vec![11.68, 9.62]);
        assert_eq!(run.ext_vmm_boots, vec![7.87, 7.62]);
        assert_eq!(run.reported_ratio, Some(0.73));
        assert_eq!(run.result.as_deref(), Some("PASS"));
        assert_eq!(parse_lab_log("no metrics here\n"), LabRun::default());
    }
}
