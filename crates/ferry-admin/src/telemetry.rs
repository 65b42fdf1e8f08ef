//! OpenTelemetry traces, opt-in through `[telemetry] otlp_endpoint`: the
//! pipeline's spans (target [`PIPELINE_TARGET`]: one `batch` span per flushed
//! batch, with `resolve`, `build` and `flush` children) exported as OTLP/HTTP
//! protobuf by a batching processor on its own thread.

use std::time::Duration;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_subscriber::filter::filter_fn;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The `tracing` target of the spans exported; nothing else is.
pub const PIPELINE_TARGET: &str = "ferry::pipeline";

/// How long one export request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// The running exporter; [`Telemetry::shutdown`] sends what is still buffered.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

/// The exporter could not be set up (the message names the cause).
#[derive(Debug, thiserror::Error)]
#[error("telemetry.otlp_endpoint: cannot start the OTLP exporter for {url}: {reason}")]
pub struct TelemetryError {
    url: String,
    reason: String,
}

impl Telemetry {
    /// Starts exporting to `traces_url` (an OTLP/HTTP `…/v1/traces` URL)
    /// as `service_name`; returns the layer to add to the subscriber.
    /// Must be called outside an async runtime (the HTTP client is blocking).
    pub fn start<S>(
        traces_url: &str,
        service_name: &str,
    ) -> Result<(Telemetry, impl Layer<S> + Send + Sync), TelemetryError>
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
    {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_url)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| TelemetryError {
                url: traces_url.to_string(),
                reason: e.to_string(),
            })?;
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(
                Resource::builder()
                    .with_service_name(service_name.to_string())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("ferry");
        let layer = tracing_opentelemetry::layer()
            .with_tracer(tracer)
            // Only what ferry records: no source locations, thread ids or busy/idle times.
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(filter_fn(|m| m.target() == PIPELINE_TARGET));
        Ok((Telemetry { provider }, layer))
    }

    /// Exports the spans still buffered and stops the exporter.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::warn!(error = %e, "could not export the last trace spans");
        }
    }
}
