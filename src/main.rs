//! `edgenode`: parse the command line, load the config, run the command.

use std::process::ExitCode;

use clap::Parser;
use edgenode::cli::{Cli, Command};
use edgenode::config::{Config, FileSource, Overrides};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = match &cli.command {
        Command::Serve { addr } => Overrides { addr: *addr },
        Command::Models { .. } | Command::Kernels { .. } => Overrides::default(),
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
    // Before the async runtime: the span exporter's HTTP client is a blocking one.
    let telemetry = edgenode::telemetry::init(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("edgenode: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(edgenode::commands::run(cli.command, config));
    // Work still running after a drain's grace period is abandoned, not waited for.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    telemetry.shutdown();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("edgenode: {e:#}");
            ExitCode::FAILURE
        }
    }
}
