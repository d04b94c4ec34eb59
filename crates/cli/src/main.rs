//! The `cutover` command: parses arguments, runs `sync`, `serve`, `plan` or `volume`, maps outcomes to exit codes.

mod endpoint;
mod manual;
mod names;
mod output;
mod plan;
mod print;
mod rsync;
mod security;
mod sync;
mod volume;
mod volume_pass;
mod volume_watch;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use print::{errln, outln};
use std::path::PathBuf;
use std::process::ExitCode;

/// Threads for blocking file I/O (reads, writes, hashing) in one process.
const BLOCKING_THREADS: usize = 16;

/// Exit codes (also documented in docs/sync.md).
pub mod exit {
    pub const OK: u8 = 0;
    pub const FATAL: u8 = 1;
    /// clap's own code for bad usage.
    pub const USAGE: u8 = 2;
    pub const PARTIAL: u8 = 3;
    pub const INCONSISTENT: u8 = 4;
    pub const DELETE_LIMIT: u8 = 5;
    pub const INTERRUPTED: u8 = 130;
}

#[derive(Parser)]
#[command(
    name = "cutover",
    version,
    about = "Move live data between data centers: parallel, delta, resumable"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Synchronise SRC to DST: local paths, [user@]host:PATH (ssh) or cutover://host[:port]/module/path.
    // `-h` is rsync's --human-readable here (alone it still prints help: see rsync::precheck).
    #[command(disable_help_flag = true, args_override_self = true)]
    Sync(Box<sync::SyncArgs>),
    /// Run the daemon that serves modules to `cutover sync` and hosts block volumes.
    #[command(
        override_usage = "cutover serve --config FILE [--listen ADDR] [--port-file FILE]\n       cutover serve --stdio\n       cutover serve --peer-relay [--config FILE]"
    )]
    Serve {
        /// Configuration file (TOML) with `listen`, `[[module]]` and `[[volume]]` entries. Required, unless --stdio or --peer-relay.
        #[arg(long, value_name = "FILE", required_unless_present_any = ["stdio", "peer_relay"])]
        config: Option<PathBuf>,
        /// Serve one connection on stdin/stdout (what `cutover sync` starts over ssh).
        #[arg(long, conflicts_with_all = ["config", "listen", "port_file"])]
        stdio: bool,
        /// Join stdin/stdout to the running daemon's peer socket (what a replication peer starts over ssh); --config names that daemon's config.
        #[arg(long, conflicts_with_all = ["stdio", "listen", "port_file"])]
        peer_relay: bool,
        /// Listen address, overriding the file's `listen` (port 0 picks a free one).
        #[arg(long)]
        listen: Option<String>,
        /// Write the port actually listened on to this file.
        #[arg(long)]
        port_file: Option<PathBuf>,
    },
    /// Migration plans: check, dry-run, presync, cut over, status and rerun a plan file (TOML).
    Plan {
        #[command(subcommand)]
        command: plan::PlanCommand,
    },
    /// Block volumes of the local `cutover serve`: create-md, status, mark (see docs/volumes.md).
    Volume {
        #[command(subcommand)]
        command: volume::VolumeCommand,
    },
    /// Show this client's certificate fingerprint (making the certificate on first use), for a daemon's client_fingerprint grant.
    Identity {
        /// Identity file (default: identity.pem in $XDG_CONFIG_HOME/cutover or ~/.config/cutover).
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Print a shell completion script, e.g. `cutover completions bash > /etc/bash_completion.d/cutover`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print a man page (roff): cutover(1), or cutover-COMMAND(1), e.g. `cutover man sync | man -l -`.
    Man {
        /// A command (sync, serve, plan, volume, identity, completions); none for cutover(1).
        command: Option<String>,
    },
}

fn main() -> ExitCode {
    let matches = match parse_args() {
        Ok(m) => m,
        Err(code) => return ExitCode::from(code),
    };
    let mut cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    if let (Command::Sync(args), Some(("sync", m))) = (&mut cli.command, matches.subcommand()) {
        match sync::ordered_filters(m) {
            Ok(f) => args.filters = f,
            Err(e) => {
                errln!("cutover: {e}");
                return ExitCode::from(exit::USAGE);
            }
        }
    }
    // A daemon's log is its record of sessions and refused clients; a client only warns.
    let default_level = match cli.command {
        // Over ssh, stderr goes back to the client: only what it should see.
        Command::Serve { stdio: true, .. }
        | Command::Serve {
            peer_relay: true, ..
        } => "warn",
        Command::Serve { .. } => "info",
        _ => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CUTOVER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(print::err_writer)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        // Blocking file I/O needs few threads on few cores; tokio's default of 512 lets a
        // burst of small-file work spawn hundreds, each with its own malloc arena and buffers.
        .max_blocking_threads(BLOCKING_THREADS)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            errln!("cutover: cannot start: {e}");
            return ExitCode::from(exit::FATAL);
        }
    };
    let code = runtime.block_on(async {
        match cli.command {
            Command::Sync(args) => sync::run(*args).await,
            Command::Serve { stdio: true, .. } => match daemon::stdio::serve_stdio().await {
                Ok(()) => exit::OK,
                Err(e) => {
                    errln!("cutover serve --stdio: {e}");
                    exit::FATAL
                }
            },
            Command::Serve {
                peer_relay: true,
                config,
                ..
            } => match daemon::peer_ssh::relay(config.as_deref()).await {
                Ok(()) => exit::OK,
                Err(e) => {
                    errln!("cutover serve --peer-relay: {e}");
                    exit::FATAL
                }
            },
            Command::Serve {
                config: Some(config),
                listen,
                port_file,
                ..
            } => serve(config, listen, port_file).await,
            Command::Serve { config: None, .. } => {
                errln!("cutover serve: --config FILE is required (or --stdio)");
                exit::USAGE
            }
            Command::Identity { file } => identity(file),
            Command::Completions { shell } => manual::completions(Cli::command(), shell),
            Command::Man { command } => manual::man(Cli::command(), command.as_deref()),
            Command::Plan { command } => plan::run(command).await,
            Command::Volume { command } => volume::run(command).await,
        }
    });
    // Do not wait for blocking tasks of an interrupted session.
    runtime.shutdown_background();
    ExitCode::from(code)
}

/// Parse the command line: rsync's flags first (`rsync::precheck`), then clap, whose
/// unknown-argument errors become one line without its hints (`use '-- -a'`, "a similar
/// argument exists"), which are wrong for rsync users' flags.
fn parse_args() -> Result<clap::ArgMatches, u8> {
    let mut argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let mut cmd = Cli::command();
    let takes_value = |name: &str| {
        cmd.find_subcommand("sync").is_some_and(|sync| {
            sync.get_arguments().any(|a| {
                !a.is_positional()
                    && a.get_action().takes_values()
                    && (a.get_long() == Some(name)
                        || a.get_short().is_some_and(|c| name.chars().eq([c])))
            })
        })
    };
    match rsync::precheck(&argv, &takes_value) {
        rsync::Precheck::Parse => {}
        rsync::Precheck::Help => argv[2] = "--help".into(),
        rsync::Precheck::Refused(line) => {
            errln!("{line}");
            return Err(exit::USAGE);
        }
    }
    match cmd.try_get_matches_from_mut(&argv) {
        Ok(m) => Ok(m),
        Err(e) if e.kind() == clap::error::ErrorKind::UnknownArgument => {
            let sub = argv
                .get(1)
                .and_then(|a| a.to_str())
                .filter(|a| cmd.find_subcommand(a).is_some())
                .map(|a| format!(" {a}"))
                .unwrap_or_default();
            let arg = match e.get(clap::error::ContextKind::InvalidArg) {
                Some(clap::error::ContextValue::String(a)) => a.clone(),
                _ => String::new(),
            };
            if arg.starts_with('-') {
                errln!("cutover{sub}: unknown option '{arg}' ('cutover{sub} --help' lists the options)");
            } else {
                errln!("cutover{sub}: unexpected argument '{arg}' ('cutover{sub} --help' shows the usage)");
            }
            Err(exit::USAGE)
        }
        Err(e) => e.exit(),
    }
}

async fn serve(config: PathBuf, listen: Option<String>, port_file: Option<PathBuf>) -> u8 {
    let cfg = match daemon::Config::load(&config) {
        Ok(c) => c,
        Err(e) => {
            errln!("cutover serve: {e}");
            return exit::FATAL;
        }
    };
    // Refuse a port file that could not be written before anything is made or bound.
    if let Some(Err(e)) = port_file
        .as_deref()
        .map(cofs::safe_write::check_replaceable)
    {
        errln!("cutover serve: --port-file {e}");
        return exit::FATAL;
    }
    let Some(state_dir) = cfg.state_dir() else {
        errln!(
            "cutover serve: {}: set state_dir (no HOME to keep the key in)",
            config.display()
        );
        return exit::FATAL;
    };
    let (identity, made) =
        match net::tls::Identity::load_or_create(&state_dir.join(net::tls::IDENTITY_FILE)) {
            Ok(i) => i,
            Err(e) => {
                errln!("cutover serve: {e}");
                return exit::FATAL;
            }
        };
    let tls = match net::tls::server_config(&identity) {
        Ok(t) => t,
        Err(e) => {
            errln!("cutover serve: {e}");
            return exit::FATAL;
        }
    };
    errln!(
        "cutover serve: certificate {} ({} {})",
        identity.fingerprint,
        if made { "made now in" } else { "from" },
        state_dir.join(net::tls::IDENTITY_FILE).display()
    );
    // Volumes first: a volume that cannot start stops the daemon before it listens (and
    // the port file, a test's "ready", then means every volume is exported).
    let identity = std::sync::Arc::new(identity);
    let mut volumes = match daemon::Volumes::start(&cfg, &config).await {
        Ok(v) => v,
        Err(e) => {
            errln!("cutover serve: {e}");
            return exit::FATAL;
        }
    };
    let peers = volumes.start_peers(identity.clone());
    let counters = std::sync::Arc::new(daemon::metrics::DaemonCounters::default());
    // Returns in this block end the listening, not the function: the volumes close below.
    let code = async {
        // Before the port file: a test that reads it finds the metrics address logged.
        let _metrics =
            match daemon::metrics::start(&cfg, &identity, &volumes, counters.clone()).await {
                Ok(Some(m)) => {
                    errln!("cutover serve: metrics on {}", m.url());
                    Some(m)
                }
                Ok(None) => None,
                Err(e) => {
                    errln!("cutover serve: {e}");
                    return exit::FATAL;
                }
            };
        let addr = listen.unwrap_or_else(|| cfg.listen.clone());
        let listener = match daemon::bind(&addr, cfg.insecure_plaintext).await {
            Ok(l) => l,
            Err(e) => {
                errln!("cutover serve: {e}");
                return exit::FATAL;
            }
        };
        let local = listener.local_addr().map(|a| a.to_string()).unwrap_or(addr);
        if let Some(pf) = port_file {
            let port = local.rsplit(':').next().unwrap_or("").to_string();
            if let Err(e) = cofs::safe_write::replace(&pf, format!("{port}\n").as_bytes(), 0o644) {
                errln!("cutover serve: --port-file {e}");
                return exit::FATAL;
            }
        }
        errln!("cutover serve: listening on {local}");
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = tokio::signal::ctrl_c() => "SIGINT",
            }
        };
        daemon::serve_with_peers(listener, cfg, tls, peers, counters, shutdown).await;
        exit::OK
    }
    .await;
    if !volumes.shutdown().await {
        return exit::FATAL;
    }
    code
}

/// `cutover identity`: make (once) and print the client certificate's fingerprint.
fn identity(file: Option<PathBuf>) -> u8 {
    let Some(path) =
        file.or_else(|| security::config_dir().map(|d| d.join(net::tls::IDENTITY_FILE)))
    else {
        errln!("cutover identity: no HOME to keep the identity in; pass --file");
        return exit::FATAL;
    };
    match net::tls::Identity::load_or_create(&path) {
        Ok((id, made)) => {
            outln!("{}", id.fingerprint);
            if made {
                errln!("cutover identity: made {}", path.display());
            }
            exit::OK
        }
        Err(e) => {
            errln!("cutover identity: {e}");
            exit::FATAL
        }
    }
}
