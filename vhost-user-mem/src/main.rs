//! `vhost-user-mem`: the vhost-user balloon daemon, and (`vhost-user-mem serve`) the lazy page
//! server of a restoring VMM.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Parser;
use tracing::error;
use vhost_user_mem::page_server::{self, ServeConfig};
use vhost_user_mem::{BalloonBackend, Daemon, DaemonConfig, Error};

/// A vhost-user virtio-balloon that gives guest memory back to the host.
#[derive(Debug, Parser, PartialEq, Eq)]
#[command(
    version,
    about,
    after_help = "The lazy page server: vhost-user-mem serve --snapshot <FILE> --socket <PATH> \
                  [--prefault] (see vhost-user-mem serve --help)."
)]
struct Args {
    /// Path of the vhost-user socket to listen on (replaced if it exists).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Path of the control API socket (HTTP/JSON, mode 0600, replaced if it exists); without
    /// it there is no control API.
    #[arg(long, value_name = "PATH")]
    api_socket: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
}

impl TryFrom<Args> for DaemonConfig {
    type Error = Error;

    fn try_from(args: Args) -> Result<Self, Error> {
        check_socket_path(&args.socket)?;
        if let Some(api_socket) = &args.api_socket {
            check_socket_path(api_socket)?;
            if *api_socket == args.socket {
                return Err(Error::SameSocketTwice(api_socket.clone()));
            }
        }
        let log_level = parse_log_level(&args.log_level)?;
        Ok(DaemonConfig {
            socket: args.socket,
            api_socket: args.api_socket,
            log_level,
        })
    }
}

/// `vhost-user-mem serve`: serves a restoring VMM's page faults from an ext-snapshot file over
/// the handshake of PAGE_SERVER.md.
#[derive(Debug, Parser, PartialEq, Eq)]
#[command(name = "vhost-user-mem serve", version, about)]
struct ServeArgs {
    /// The ext-snapshot memory file to serve (validated before the socket opens).
    #[arg(long, value_name = "FILE")]
    snapshot: PathBuf,
    /// Path of the socket restoring VMMs connect to (mode 0600, replaced if it exists).
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// Also copy every data page in the background (by default only faulted pages are served).
    #[arg(long)]
    prefault: bool,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    log_level: String,
}

impl ServeArgs {
    fn into_config(self) -> Result<(ServeConfig, tracing::Level), Error> {
        check_socket_path(&self.socket)?;
        let log_level = parse_log_level(&self.log_level)?;
        Ok((
            ServeConfig {
                snapshot: self.snapshot,
                socket: self.socket,
                prefault: self.prefault,
            },
            log_level,
        ))
    }
}

fn parse_log_level(text: &str) -> Result<tracing::Level, Error> {
    match text.to_ascii_lowercase().as_str() {
        "error" => Ok(tracing::Level::ERROR),
        "warn" => Ok(tracing::Level::WARN),
        "info" => Ok(tracing::Level::INFO),
        "debug" => Ok(tracing::Level::DEBUG),
        "trace" => Ok(tracing::Level::TRACE),
        _ => Err(Error::LogLevel(text.to_string())),
    }
}

fn init_logging(level: tracing::Level) {
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// `vhost-user-mem serve ...`.
fn serve_main(args: impl Iterator<Item = std::ffi::OsString>) -> ExitCode {
    let (config, level) = match ServeArgs::parse_from(args).into_config() {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("vhost-user-mem serve: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(level);
    match page_server::run(config) {
        Ok(never) => match never {},
        Err(e) => {
            error!(error = %e, "vhost-user-mem serve stops");
            ExitCode::FAILURE
        }
    }
}

/// A socket path must be non-empty and its directory must exist.
fn check_socket_path(socket: &Path) -> Result<(), Error> {
    if socket.as_os_str().is_empty() {
        return Err(Error::EmptySocketPath);
    }
    let dir = match socket.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.is_dir() {
        return Err(Error::SocketDirectoryMissing(dir.to_path_buf()));
    }
    Ok(())
}

fn main() -> ExitCode {
    let mut argv = std::env::args_os();
    if std::env::args_os().nth(1).is_some_and(|a| a == "serve") {
        let program = argv.next().unwrap_or_default();
        // `serve` goes, the program name stays first for clap.
        return serve_main(std::iter::once(program).chain(argv.skip(1)));
    }
    let config = match DaemonConfig::try_from(Args::parse()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("vhost-user-mem: {e}");
            return ExitCode::from(2);
        }
    };
    init_logging(config.log_level);
    let result = Daemon::bind(&config.socket, BalloonBackend::shared()).and_then(|mut daemon| {
        // Kept for as long as the serve loop runs, which is until the process ends.
        let _api = match &config.api_socket {
            Some(socket) => Some(daemon.start_api(socket)?),
            None => None,
        };
        daemon.run()
    });
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
            api_socket: None,
            log_level: level.to_string(),
        }
    }

    fn with_api(socket: &str, api_socket: &str) -> Args {
        Args {
            api_socket: Some(PathBuf::from(api_socket)),
            ..args(socket, "info")
        }
    }

    #[test]
    fn valid_arguments_make_a_config() {
        let config = DaemonConfig::try_from(args("/tmp/balloon.sock", "Debug")).unwrap();
        assert_eq!(
            config,
            DaemonConfig {
                socket: PathBuf::from("/tmp/balloon.sock"),
                api_socket: None,
                log_level: tracing::Level::DEBUG,
            }
        );
        let config = DaemonConfig::try_from(with_api("/tmp/b.sock", "/tmp/api.sock")).unwrap();
        assert_eq!(config.api_socket, Some(PathBuf::from("/tmp/api.sock")));
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
        assert!(matches!(
            DaemonConfig::try_from(with_api("/tmp/b.sock", "")),
            Err(Error::EmptySocketPath)
        ));
        assert!(matches!(
            DaemonConfig::try_from(with_api("/tmp/b.sock", "/nonexistent-dir-vum/api.sock")),
            Err(Error::SocketDirectoryMissing(_))
        ));
        assert!(matches!(
            DaemonConfig::try_from(with_api("/tmp/b.sock", "/tmp/b.sock")),
            Err(Error::SameSocketTwice(_))
        ));
    }

    #[test]
    fn clap_parses_the_command_line() {
        let parsed = Args::try_parse_from(["vhost-user-mem", "--socket", "/tmp/x.sock"]).unwrap();
        assert_eq!(parsed, args("/tmp/x.sock", "info"));
        let parsed = Args::try_parse_from([
            "vhost-user-mem",
            "--socket",
            "/tmp/x.sock",
            "--api-socket",
            "/tmp/api.sock",
        ])
        .unwrap();
        assert_eq!(parsed, with_api("/tmp/x.sock", "/tmp/api.sock"));
        assert!(Args::try_parse_from(["vhost-user-mem"]).is_err());
        Args::command_for_tests().debug_assert();
    }

    #[test]
    fn serve_arguments_make_a_config() {
        let parsed = ServeArgs::try_parse_from([
            "vhost-user-mem serve",
            "--snapshot",
            "/tmp/mem.ext",
            "--socket",
            "/tmp/ps.sock",
            "--prefault",
        ])
        .unwrap();
        let (config, level) = parsed.into_config().unwrap();
        assert_eq!(config.snapshot, PathBuf::from("/tmp/mem.ext"));
        assert_eq!(config.socket, PathBuf::from("/tmp/ps.sock"));
        assert!(config.prefault);
        assert_eq!(level, tracing::Level::INFO);
        assert!(ServeArgs::try_parse_from(["serve", "--socket", "/tmp/x"]).is_err());
        let bad = ServeArgs::try_parse_from([
            "serve",
            "--snapshot",
            "f",
            "--socket",
            "/nonexistent-dir-vum/s",
        ])
        .unwrap();
        assert!(matches!(
            bad.into_config(),
            Err(Error::SocketDirectoryMissing(_))
        ));
        <ServeArgs as clap::CommandFactory>::command().debug_assert();
    }

    impl Args {
        fn command_for_tests() -> clap::Command {
            <Args as clap::CommandFactory>::command()
        }
    }
}
