//! `vhost-user-mem`: the vhost-user balloon daemon.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use tracing::error;
use vhost_user_mem::{BalloonBackend, Daemon, DaemonConfig, Error};

/// A vhost-user virtio-balloon that gives guest memory back to the host.
#[derive(Debug, Parser, PartialEq, Eq)]
#[command(version, about)]
struct Args {
    /// Path of the vhost-user socket to listen on (replaced if it exists).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
}

impl TryFrom<Args> for DaemonConfig {
    type Error = Error;

    fn try_from(args: Args) -> Result<Self, Error> {
        if args.socket.as_os_str().is_empty() {
            return Err(Error::EmptySocketPath);
        }
        let dir = match args.socket.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.is_dir() {
            return Err(Error::SocketDirectoryMissing(dir));
        }
        let log_level = match args.log_level.to_ascii_lowercase().as_str() {
            "error" => tracing::Level::ERROR,
            "warn" => tracing::Level::WARN,
            "info" => tracing::Level::INFO,
            "debug" => tracing::Level::DEBUG,
            "trace" => tracing::Level::TRACE,
            _ => return Err(Error::LogLevel(args.log_level)),
        };
        Ok(DaemonConfig {
            socket: args.socket,
            log_level,
        })
    }
}

fn main() -> ExitCode {
    let config = match DaemonConfig::try_from(Args::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("vhost-user-mem: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_max_level(config.log_level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let result = Daemon::bind(&config.socket, BalloonBackend::shared()).and_then(|mut d| d.run());
    match result {
        Ok(never) => match never {},
        Err(e) => {
            error!(error = %e, "vhost-user-mem stops");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(socket: &str, level: &str) -> Args {
        Args {
            socket: PathBuf::from(socket),
            log_level: level.to_string(),
        }
    }

    #[test]
    fn valid_arguments_make_a_config() {
        let config = DaemonConfig::try_from(args("/tmp/balloon.sock", "Debug")).unwrap();
        assert_eq!(
            config,
            DaemonConfig {
                socket: PathBuf::from("/tmp/balloon.sock"),
                log_level: tracing::Level::DEBUG,
            }
        );
        // A bare file name lives in the current directory.
        assert!(DaemonConfig::try_from(args("balloon.sock", "info")).is_ok());
    }

    #[test]
    fn bad_arguments_are_refused() {
        assert!(matches!(
            DaemonConfig::try_from(args("", "info")),
            Err(Error::EmptySocketPath)
        ));
        assert!(matches!(
            DaemonConfig::try_from(args("/nonexistent-dir-vum/b.sock", "info")),
            Err(Error::SocketDirectoryMissing(_))
        ));
        assert!(matches!(
            DaemonConfig::try_from(args("/tmp/b.sock", "loud")),
            Err(Error::LogLevel(level)) if level == "loud"
        ));
    }

    #[test]
    fn clap_parses_the_command_line() {
        let parsed = Args::try_parse_from(["vhost-user-mem", "--socket", "/tmp/x.sock"]).unwrap();
        assert_eq!(parsed, args("/tmp/x.sock", "info"));
        assert!(Args::try_parse_from(["vhost-user-mem"]).is_err());
        Args::command_for_tests().debug_assert();
    }

    impl Args {
        fn command_for_tests() -> clap::Command {
            <Args as clap::CommandFactory>::command()
        }
    }
}
