//! Logs, traces and metrics.
//!
//! Logs go to stderr (pretty or JSON lines). Spans go to an OTLP collector over
//! HTTP/protobuf when an endpoint is configured (`telemetry.otlp_endpoint` or the standard
//! `OTEL_EXPORTER_OTLP_*` variables); with none, no exporter exists at all, so nothing is
//! sent and nothing is logged about it. Metrics live in [`metrics`]; the latency profile
//! `/stats` reports lives in [`stats`].

pub mod metrics;
pub mod stats;
pub mod trace;

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, EnvFilter, Layer};

use crate::config::{Config, LogFormat};

/// Keeps the span exporter alive; `shutdown` flushes what is still buffered.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Flushes buffered spans to the collector and stops the exporter. Blocking: call it
    /// outside the async runtime (the exporter's HTTP client is a blocking one).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.shutdown() {
                eprintln!("edgenode: flushing spans at shutdown failed: {e}");
            }
        }
    }

    /// True when spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }
}

/// The OTLP traces endpoint this config exports to, if any: `telemetry.otlp_endpoint`
/// (with `/v1/traces` appended), else whatever the standard variables say (the exporter
/// reads them itself).
fn otlp_target(config: &Config) -> Option<Option<String>> {
    let configured = config.telemetry.otlp_endpoint.trim();
    if !configured.is_empty() {
        let base = configured.trim_end_matches('/');
        let url = if base.ends_with("/v1/traces") { base.to_string() } else { format!("{base}/v1/traces") };
        return Some(Some(url));
    }
    let set = |k: &str| std::env::var(k).map(|v| !v.trim().is_empty()).unwrap_or(false);
    (set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") || set("OTEL_EXPORTER_OTLP_ENDPOINT")).then_some(None)
}

/// Builds the span exporter and provider. Call before the async runtime starts: the
/// exporter's blocking HTTP client must not be created inside it.
fn tracer_provider(config: &Config) -> Option<SdkTracerProvider> {
    let target = otlp_target(config)?;
    use opentelemetry_otlp::{Protocol, WithExportConfig};
    let mut builder = opentelemetry_otlp::SpanExporter::builder().with_http().with_protocol(Protocol::HttpBinary);
    if let Some(url) = &target {
        builder = builder.with_endpoint(url.clone());
    }
    let exporter = match builder.build() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("edgenode: OTLP export is off: cannot build the exporter: {e}");
            return None;
        }
    };
    // `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES` are read by the resource builder;
    // the config's name applies only when the variable does not set one.
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var("OTEL_SERVICE_NAME").map(|v| v.is_empty()).unwrap_or(true) {
        resource = resource.with_service_name(config.telemetry.service_name.clone());
    }
    let resource = resource.with_attribute(opentelemetry::KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))).build();
    // The sampler comes from `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (the SDK's
    // default config reads them); parent-based always-on otherwise.
    Some(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build())
}

/// Installs logging and (when configured) span export. `RUST_LOG`, when set, overrides
/// `log.level` for logs; spans of edgenode's own request stages are exported regardless of
/// the log level. Logs go to stderr; stdout is for command output.
pub fn init(config: &Config) -> Telemetry {
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&config.log.level)).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = match config.log.format {
        LogFormat::Pretty => {
            fmt::layer().with_writer(std::io::stderr).with_target(false).with_ansi(std::io::stderr().is_terminal()).with_filter(filter).boxed()
        }
        LogFormat::Json => fmt::layer().json().flatten_event(true).with_current_span(false).with_writer(std::io::stderr).with_filter(filter).boxed(),
    };
    let provider = tracer_provider(config);
    let spans = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("edgenode")).with_filter(Targets::new().with_target("edgenode", Level::DEBUG)));
    if let Err(e) = tracing_subscriber::registry().with(logs).with(spans).try_init() {
        eprintln!("edgenode: logging was already initialised: {e}");
    }
    Telemetry { provider }
}
