//! `ext-snapshot`: create, restore, inspect, verify, diff, merge and convert sparse VM memory
//! snapshots, and benchmark them against full dumps. See the crate README for every command.
//!
//! Built only with the `cli` feature: the command line (`cli`) and the benchmark with its
//! baselines (`bench`) are this binary's modules and use only the library's public API, so a
//! VMM linking the library gets neither.

mod bench;
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
