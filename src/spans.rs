//! OpenTelemetry export (cargo feature `otlp`): one span per request, with child spans for the
//! time it waited on the store and on the upstream, batched by the SDK's background thread and
//! sent as OTLP/HTTP JSON to `[log] otlp_endpoint`. The span ids are the request's W3C ids, so a
//! collector joins them to the client's and the upstream's spans.

use crate::trace_context::TraceContext;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState, Tracer,
    TracerProvider,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{BatchConfigBuilder, BatchSpanProcessor, SdkTracerProvider};
use std::time::{Duration, SystemTime};

/// An HTTP client for the exporter: ureq, on the SDK's export thread.
#[derive(Debug)]
struct Ureq(ureq::Agent);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Ureq {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let mut call = self
            .0
            .request(parts.method.as_str(), &parts.uri.to_string());
        for (name, value) in &parts.headers {
            if let Ok(v) = value.to_str() {
                call = call.set(name.as_str(), v);
            }
        }
        let (status, text) = match call.send_bytes(&body) {
            Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
            Err(e) => return Err(Box::new(e)),
        };
        Ok(http::Response::builder()
            .status(status)
            .body(bytes::Bytes::from(text))?)
    }
}

/// What the export needs of one finished request.
#[derive(Debug)]
pub(crate) struct RequestSpan<'a> {
    pub(crate) trace: &'a TraceContext,
    pub(crate) method: &'a str,
    pub(crate) route: Option<&'a str>,
    pub(crate) status: u16,
    pub(crate) code: Option<&'a str>,
    pub(crate) account_id: Option<&'a str>,
    pub(crate) elapsed: Duration,
    /// (offset from the request's start, duration) of the store wait and the upstream.
    pub(crate) store: Option<(Duration, Duration)>,
    pub(crate) upstream: Option<(Duration, Duration)>,
}

/// The exporter pipeline.
#[derive(Debug)]
pub(crate) struct Spans {
    provider: SdkTracerProvider,
    tracer: opentelemetry_sdk::trace::SdkTracer,
}

/// Why the exporter could not be built.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the OTLP exporter: {0}")]
pub(crate) struct SpansError(String);

impl Spans {
    /// Exports to `endpoint` (an OTLP/HTTP traces URL, e.g. `http://collector:4318/v1/traces`).
    pub(crate) fn start(endpoint: &str, service: &str) -> Result<Self, SpansError> {
        let agent = ureq::AgentBuilder::new()
            .timeout(Duration::from_secs(10))
            .build();
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(Ureq(agent))
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| SpansError(e.to_string()))?;
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(
                BatchConfigBuilder::default()
                    .with_max_queue_size(8192)
                    .with_scheduled_delay(Duration::from_millis(500))
                    .build(),
            )
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_resource(
                opentelemetry_sdk::Resource::builder()
                    .with_service_name(service.to_owned())
                    .build(),
            )
            .build();
        let tracer = provider.tracer("msgflash-gateway");
        Ok(Self { provider, tracer })
    }

    /// Hands one request's spans to the batch (dropped, never waited for, when it is full).
    pub(crate) fn record(&self, r: &RequestSpan<'_>) {
        let end = SystemTime::now();
        let start = end - r.elapsed;
        let t = r.trace;
        let trace_id = TraceId::from_bytes(t.trace_id);
        let parent = match t.parent_id {
            Some(parent) => Context::new().with_remote_span_context(SpanContext::new(
                trace_id,
                SpanId::from_bytes(parent),
                TraceFlags::new(t.flags),
                true,
                TraceState::default(),
            )),
            None => Context::new(),
        };
        // Methods a client invents are `_OTHER` (OpenTelemetry's rule): bounded names.
        let method = match r.method {
            m @ ("GET" | "HEAD" | "POST" | "PUT" | "DELETE" | "CONNECT" | "OPTIONS" | "TRACE"
            | "PATCH") => m,
            _ => "_OTHER",
        };
        let mut attributes = vec![
            KeyValue::new("http.request.method", method.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(r.status)),
        ];
        if let Some(route) = r.route {
            attributes.push(KeyValue::new("http.route", route.to_owned()));
        }
        if let Some(code) = r.code {
            attributes.push(KeyValue::new("msgflash.error_code", code.to_owned()));
        }
        if let Some(account) = r.account_id {
            attributes.push(KeyValue::new("msgflash.account_id", account.to_owned()));
        }
        let mut builder = self
            .tracer
            .span_builder(format!("{method} {}", r.route.unwrap_or("none")))
            .with_kind(SpanKind::Server)
            .with_start_time(start)
            .with_attributes(attributes);
        builder.trace_id = Some(trace_id);
        builder.span_id = Some(SpanId::from_bytes(t.span_id));
        let span = self.tracer.build_with_context(builder, &parent);
        let cx = parent.with_span(span);
        for (name, kind, part) in [
            ("store", SpanKind::Client, r.store),
            ("upstream", SpanKind::Client, r.upstream),
        ] {
            if let Some((offset, took)) = part {
                let child = self
                    .tracer
                    .span_builder(name)
                    .with_kind(kind)
                    .with_start_time(start + offset)
                    .with_end_time(start + offset + took);
                drop(self.tracer.build_with_context(child, &cx));
            }
        }
        cx.span().end_with_timestamp(end);
    }

    /// Sends what is batched (at a stop).
    pub(crate) fn flush(&self) {
        let _ = self.provider.force_flush();
    }
}
