//! The `lifeboat` binary: parses the command line, sets up logging, calls the library once,
//! prints the report or the error chain, and turns the outcome into a stable exit code.

use std::process::ExitCode;

use lifeboat::Error;

mod cli;

fn main() -> ExitCode {
    let matches = <cli::args::Cli as clap::CommandFactory>::command().get_matches();
    let command_name = matches.subcommand_name().unwrap_or("lifeboat").to_string();
    let cli = match <cli::args::Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    cli::logging::init(&cli);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            return cli::render::report_error(
                &Error::new(lifeboat::ErrorKind::Source, "unable to start the runtime")
                    .with_source(e),
            );
        }
    };
    let outcome = runtime.block_on(async {
        // Before any work: a run stopped at any moment cleans up after itself.
        lifeboat::interrupt::install(command_name);
        cli::run(cli).await
    });
    lifeboat::interrupt::exit_if_interrupted();
    match outcome {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => cli::render::report_error(&e),
    }
}
