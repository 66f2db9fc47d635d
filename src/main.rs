//! `proxy`: the daemon (`proxy run`) and the CLI that drives it, in one binary.
//!
//! - `cli`: the command line (kamal-proxy's commands and flags).
//! - `daemon`: `proxy run`, wiring the data plane, control plane and state.
//! - `config_file`: run options from a TOML file.
//! - `commands`: every other command, a thin client of the control API.
//! - `tls`: wires the certificates crate into the data and control planes.
//! - `metrics_server`: the Prometheus endpoint on `--metrics-port`.
//! - `workers`: the data plane's threads, one single-threaded runtime per core.
//! - `handover`: passing the listeners to a new process (upgrades without a gap).

mod cli;
mod commands;
mod config_file;
mod daemon;
mod handover;
mod log_format;
mod metrics_server;
mod tls;
mod workers;

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::Parser;

use cli::{Cli, Command};

/// mimalloc rather than glibc's allocator: a request allocates a handful of small blocks
/// (its log record, the target's request head, header maps, body boxes) on one worker
/// thread and frees them on it, which mimalloc's per-thread free lists serve in a few
/// dozen instructions where glibc's took about 170 for the larger ones.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => return report_usage_error(error),
    };
    // rustls's process-wide provider, for the libraries that take the default (the Redis
    // client's TLS, the ACME client); the listeners name theirs (`tls::crypto_provider`).
    let _ = berth_proxy::tls::crypto_provider().install_default();
    // The main thread runs the control plane (and every client command); the data plane has
    // threads of its own (`workers`).
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => return fail(anyhow::anyhow!("cannot start the async runtime: {error}")),
    };
    let outcome = match cli.command {
        Command::Run(args) => daemon::RunOptions::resolve(*args).and_then(|options| {
            daemon::init_logging(options.debug);
            for warning in &options.warnings {
                tracing::warn!(warning = %warning, "Environment value ignored");
            }
            runtime.block_on(daemon::run(options))
        }),
        command => runtime.block_on(commands::run(command)),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(error),
    }
}

/// kamal-proxy's convention: `Error: <message>` on stderr, exit 1.
fn fail(error: anyhow::Error) -> ExitCode {
    eprintln!("Error: {error:#}");
    ExitCode::from(1)
}

/// Help and version exit 0; a bad flag or value exits 1 with clap's message, which names it.
fn report_usage_error(error: clap::Error) -> ExitCode {
    match error.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
            let _ = error.print();
            ExitCode::SUCCESS
        }
        _ => {
            let rendered = error.render().to_string();
            let message = rendered.trim_start_matches("error: ");
            eprint!("Error: {message}");
            ExitCode::from(1)
        }
    }
}
