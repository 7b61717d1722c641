//! The binary's side: the command line, logging, rendering, and one small adapter per
//! command that turns parsed arguments into the library's options, calls it once, and
//! renders what it returns. The library never imports from here.

#[macro_use]
pub mod render;
pub mod args;
mod commands;
pub mod logging;
mod record;
mod terminal;

use lifeboat::config::Config;
use lifeboat::error::exit_code;
use lifeboat::{Result, metrics, status};

use args::{Cli, Command};
use render::print_error;

/// Runs the command; the exit code it should end with, or the error that decides it.
pub async fn run(cli: Cli) -> Result<i32> {
    if let Some(code) = commands::without_config(&cli)? {
        return Ok(code);
    }
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(e) => return unloaded(&cli, e),
    };
    commands::dispatch(&config, cli.command).await
}

/// A config that does not load: each command fails in the terms of whoever runs it.
fn unloaded(cli: &Cli, error: lifeboat::Error) -> Result<i32> {
    match &cli.command {
        // PostgreSQL must not read a broken config as "the archive ends here".
        Command::WalFetch { .. } => {
            print_error(&error);
            Ok(exit_code::STOP_RECOVERY)
        }
        // Every segment fails from now on: the archiving alert must hear of it.
        Command::WalPush { job, .. } => {
            metrics::record_wal_push_unloaded(&cli.config, job.as_deref(), chrono::Utc::now());
            Err(error)
        }
        // A monitoring system reads 2 as CRITICAL; a status that cannot even be read is UNKNOWN.
        Command::Status { .. } => {
            print_error(&error);
            Ok(status::State::Unknown.exit_code())
        }
        _ => Err(error),
    }
}
