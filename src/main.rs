//! `edgenode`: parse the command line, load the config, run the command.

use std::process::ExitCode;

use clap::Parser;
use edgenode::cli::{Cli, Command};
use edgenode::config::{Config, FileSource, Overrides};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = match &cli.command {
        Command::Serve { addr } => Overrides { addr: *addr },
        Command::Models { .. } => Overrides::default(),
    };
    let file = match &cli.config {
        Some(p) => FileSource::Explicit(p.clone()),
        None => FileSource::Implicit,
    };
    let config = match Config::load(&file, &overrides) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("edgenode: {e}");
            return ExitCode::from(2);
        }
    };
    // Before any thread exists: thread counts are read from the environment by rayon.
    edgenode::runtime::apply_threads(&config);
    edgenode::telemetry::init_logging(&config.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgenode: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(edgenode::commands::run(cli.command, config));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("edgenode: {e:#}");
            ExitCode::FAILURE
        }
    }
}
