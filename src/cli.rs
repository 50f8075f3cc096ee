//! The command line: `serve` and `models {fetch, verify, list}`.
//!
//! Each flag's doc comment is its `--help` text; `--config` is also `EDGENODE_CONFIG`.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// An inference daemon for one machine in an edge region.
#[derive(Debug, Parser)]
#[command(name = "edgenode", version, about)]
pub struct Cli {
    /// Config file (TOML). Default: ./edgenode.toml if it exists, else the built-in defaults.
    #[arg(long, global = true, env = "EDGENODE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

/// What to do.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the configured models over HTTP (fetches missing model files first).
    Serve {
        /// Address to listen on (overrides `server.addr`).
        #[arg(long, value_name = "HOST:PORT")]
        addr: Option<SocketAddr>,
    },
    /// Manage the pinned model store.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

/// `edgenode models ...`
#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Download and verify model files (all configured models when no NAME is given).
    Fetch {
        /// Manifest entries to fetch.
        names: Vec<String>,
    },
    /// Hash every model file in the store and compare with the manifest; exits 1 on any mismatch.
    Verify {
        /// Manifest to check against (default: `store.manifest`, else the built-in one).
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// Also compare the verified digests with a central manifest (a file or an http(s)
        /// URL): each model in_sync, stale, missing or extra; exits 1 on drift, 2 when the
        /// manifest cannot be read.
        #[arg(long, value_name = "FILE|URL")]
        against: Option<String>,
        /// Entries to verify (default: every entry of the manifest that the config serves).
        names: Vec<String>,
    },
    /// List the manifest's models, their versions, digests and whether their files are present.
    List,
}
