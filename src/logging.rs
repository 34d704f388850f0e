//! Log output: human text on a terminal, or one JSON object per line with Cloud Logging's field
//! names (`severity`, `message`, `timestamp`), so logs from Cloud Run and GKE land structured.
//! See "Structured logging" in Google's Cloud Logging docs for the special fields.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the process's log subscriber. `BQ2SFTP_LOG` (an `EnvFilter` directive) overrides
/// the level chosen by `-v`.
pub fn init(format: LogFormat, verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BQ2SFTP_LOG").unwrap_or_else(|_| {
        // Periodic progress lines and the final summary show at the default level.
        tracing_subscriber::EnvFilter::new(format!("bq2sftp={default},bq2sftp::progress=info,warn"))
    });
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_target(false).try_init(),
        LogFormat::Json => builder.event_format(CloudLogging).try_init(),
    };
}

/// Cloud Logging's severity names for tracing's levels.
pub fn severity(level: &Level) -> &'static str {
    match *level {
        Level::ERROR => "ERROR",
        Level::WARN => "WARNING",
        Level::INFO => "INFO",
        Level::DEBUG | Level::TRACE => "DEBUG",
    }
}

/// One JSON object per event: `severity`, `message`, `timestamp`, plus the event's fields.
pub struct CloudLogging;

impl<S, N> FormatEvent<S, N> for CloudLogging
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let mut fields = JsonFields::default();
        event.record(&mut fields);
        let mut object = serde_json::Map::new();
        object.insert("severity".into(), severity(event.metadata().level()).into());
        object.insert("message".into(), fields.message.take().unwrap_or_default().into());
        object
            .insert("timestamp".into(), chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true).into());
        object.insert("target".into(), event.metadata().target().into());
        object.extend(fields.fields);
        writeln!(writer, "{}", serde_json::Value::Object(object))
    }
}

#[derive(Default)]
struct JsonFields {
    message: Option<String>,
    fields: serde_json::Map<String, serde_json::Value>,
}

impl JsonFields {
    fn put(&mut self, field: &Field, value: serde_json::Value) {
        if field.name() == "message" {
            self.message = Some(match value {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            });
        } else {
            self.fields.insert(field.name().to_string(), value);
        }
    }
}

impl Visit for JsonFields {
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, format!("{value:?}").into());
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, value.into());
    }
}
