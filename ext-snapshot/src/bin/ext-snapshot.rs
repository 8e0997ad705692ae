//! `ext-snapshot`: create, restore, inspect, verify, diff, merge and convert sparse VM memory
//! snapshots, and benchmark them against full dumps. See the crate README for every command.

#[path = "../cli/mod.rs"]
mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
