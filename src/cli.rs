//! The command line: `serve`, `models {fetch, verify, list, pin}` and `kernels verify`.
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
    /// Check our CUDA kernels on this machine's GPU.
    Kernels {
        #[command(subcommand)]
        command: KernelsCommand,
    },
}

/// `edgenode kernels ...`
#[derive(Debug, Subcommand)]
pub enum KernelsCommand {
    /// Run every CUDA kernel on seeded random inputs and compare it with its Rust twin; exits
    /// 1 on a disagreement, 2 when there is no CUDA device (or the binary has no CUDA).
    Verify {
        /// The GPU to run on.
        #[arg(long, default_value = "cuda:0", value_name = "cuda:N")]
        device: String,
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
    /// Switch a running node's model back to the version it served before its last switch
    /// (kept on disk: no download), and hold it there until the central manifest names
    /// another version. Needs `sync.apply` on the node. Exits 1 when there is nothing to roll
    /// back to.
    Rollback {
        /// The served model (its `[[models]]` name).
        name: String,
        /// The running node.
        #[arg(long, default_value = "http://127.0.0.1:8080", value_name = "URL")]
        url: String,
    },
    /// Write a probe (what a new version must answer before model sync lets it serve) from
    /// the version a running node serves now: for an embed model the vectors it gives for
    /// the inputs, for a generate model its greedy completion of the prompt. Prints the
    /// `[models.probe]` table, or sets it on the model's entry in `--manifest` (the file is
    /// rewritten: its comments are not kept).
    Probe {
        /// The served model (its `[[models]]` name).
        name: String,
        /// The running node.
        #[arg(long, default_value = "http://127.0.0.1:8080", value_name = "URL")]
        url: String,
        /// The manifest whose entry for the model gets the probe.
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// Embed models: an input to probe with (repeatable; default: three sentences).
        #[arg(long = "input", value_name = "TEXT")]
        inputs: Vec<String>,
        /// Embed models: the least cosine each new vector must reach.
        #[arg(long, default_value_t = crate::models::probe::DEFAULT_MIN_COSINE)]
        min_cosine: f32,
        /// Generate models: the raw prompt to complete.
        #[arg(long, default_value = "The capital of France is")]
        prompt: String,
        /// Generate models: how many tokens of greedy completion to expect.
        #[arg(long, default_value_t = 8)]
        tokens: u32,
        /// Generate models: the least share of those tokens a new version must reproduce.
        #[arg(long, default_value_t = 1.0)]
        min_match: f32,
    },
    /// Print a manifest entry (TOML) for model files — the ones you already have under
    /// `--dir`, or a Hugging Face Hub repository's with `--hf` — each with its sha256, or add
    /// it to a manifest file with `--manifest`. Point `store.manifest` at that file and add a
    /// `[[models]]` table to serve it.
    Pin {
        /// The entry's name (what `[[models]]` tables refer to as `manifest`).
        name: String,
        /// `embed`, `classify` or `generate`.
        #[arg(long)]
        kind: String,
        /// The version you give these files (shown in `/info` and the `x-edgenode-model` header).
        #[arg(long)]
        version: String,
        /// The folder that holds the files; written as the entry's `source.dir`.
        #[arg(long, value_name = "DIR", required_unless_present = "hf", conflicts_with = "hf")]
        dir: Option<PathBuf>,
        /// A Hub repository, at a branch, tag or commit (default `main`): the revision is
        /// resolved to its commit, large files' sha256 are read from the Hub's listing
        /// without downloading them, small ones are downloaded and hashed. Honours
        /// `HF_ENDPOINT`, `HF_TOKEN`.
        #[arg(long, value_name = "ORG/REPO[@REVISION]")]
        hf: Option<String>,
        /// One line on what the model is.
        #[arg(long, default_value = "")]
        description: String,
        /// Add the entry to this manifest file instead of printing it; a file that does not
        /// exist yet starts as a copy of the built-in manifest (the default models).
        #[arg(long, value_name = "FILE")]
        manifest: Option<PathBuf>,
        /// Files to pin, relative to DIR or the repository. Default with `--dir`: every file
        /// under it; with `--hf`: what the loader reads for `--kind` (an encoder's config,
        /// weights, tokenizer and sentence-transformers files; a generate model's one GGUF
        /// file, which must be named when the repository has several).
        files: Vec<String>,
    },
}
