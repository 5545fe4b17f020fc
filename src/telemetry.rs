//! Logging: `tracing` to stderr, text or JSON. `RUST_LOG` overrides `log.filter`. The cron
//! scheduler logs every tick at INFO, so it is held to WARN unless asked for.
//!
//! JSON (`log.format = "json"`) is one object per line: `timestamp`, `level`, `target`,
//! `message`, the fields of every enclosing span, root first (a run's `run.id`, `trigger` and
//! `mode`, a unit's `unit`), then the event's own fields. Fields that carry JSON (`counts`) are
//! embedded as objects, not as strings. Everything else the process prints itself (the `--once`
//! summary, errors, usage errors) goes through [`json_line`] in the same shape, so a JSON log
//! pipeline sees nothing but JSON. Before the configuration is loaded, [`early_format`] decides
//! the format from `--log-format`, `SEEDKEEPER_LOG__FORMAT` or the config file's `log.format`, so
//! a configuration error is already printed in the format asked for.
//!
//! Logging never stops the work: a line that cannot be written (stderr on a full disk, a closed
//! pipe, `2>/dev/full`) is dropped and counted in `seedkeeper_log_write_errors_total`
//! ([`log_write_errors`]), and the run goes on. Left to itself, `tracing-subscriber` reports a
//! failed write with `eprintln!`, which panics when stderr is the thing that failed: one full
//! disk would kill every run at its first log line while the probes kept answering 200.

use std::fmt;
use std::io::IsTerminal;
use std::io::Write;
use std::sync::{LazyLock, OnceLock};

use prometheus_client::metrics::counter::Counter;
use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

use crate::config::{ConfigLayers, LogFormat};

/// Event fields whose value is JSON text, embedded as JSON.
const JSON_FIELDS: &[&str] = &["counts", "findings"];

/// The format of the process's own lines, decided once per process (see [`set_format`]): a
/// value that later code could change would leave the first lines and the last ones in
/// different formats, and tests in one process would have to put it back.
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Log lines (and the process's own error lines) that could not be written. Process-wide, as
/// stderr is: every app's registry shows the same counter (see `crate::metrics`). It only
/// counts up; tests read it from the /metrics of a binary they started, never reset it.
static LOG_WRITE_ERRORS: LazyLock<Counter> = LazyLock::new(Counter::default);

/// The counter behind `seedkeeper_log_write_errors_total` (a clone shares the value).
pub(crate) fn log_write_errors() -> &'static Counter {
    &LOG_WRITE_ERRORS
}

/// The log sink: [`crate::progress::LogWriter`] (stderr, around the progress bars), whose
/// failures are counted and swallowed. It answers every write as done, so the subscriber never
/// sees an error and never falls back to its own `eprintln!` (see the module docs).
#[derive(Clone, Copy, Default)]
pub(crate) struct Sink;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Sink {
    type Writer = Sink;

    fn make_writer(&'a self) -> Self::Writer {
        Sink
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // One event is one write_all of a whole line: a line that fails is dropped once, counted
        // once, rather than retried or split.
        if crate::progress::LogWriter.write_all(buf).is_err() {
            LOG_WRITE_ERRORS.inc();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if crate::progress::LogWriter.flush().is_err() {
            LOG_WRITE_ERRORS.inc();
        }
        Ok(())
    }
}

/// Writes one line of the process's own to stderr; a failure is counted, never a panic (as
/// `eprintln!` would).
pub(crate) fn stderr_line(line: &str) {
    let mut err = std::io::stderr().lock();
    if err
        .write_all(line.as_bytes())
        .and_then(|()| err.write_all(b"\n"))
        .and_then(|()| err.flush())
        .is_err()
    {
        LOG_WRITE_ERRORS.inc();
    }
}

pub(crate) fn init(format: LogFormat, filter: &str) {
    set_format(format);
    let base = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| filter.to_string());
    let directives = if base.contains("tokio_cron_scheduler") {
        base
    } else {
        format!("{base},tokio_cron_scheduler=warn")
    };
    let env = EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| EnvFilter::new("info,tokio_cron_scheduler=warn"));
    // Colours only for a terminal: journald, files and pipes get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env)
        .with_ansi(std::io::stderr().is_terminal())
        // Its fallback report of a failed write is an `eprintln!` (see the module docs); [`Sink`]
        // reports none, this is a second guard.
        .log_internal_errors(false)
        // Stderr, with progress bars (if any are drawn) lifted while a line is written; a line
        // that cannot be written is dropped and counted.
        .with_writer(Sink);
    let _ = match format {
        LogFormat::Json => builder
            .fmt_fields(SpanFields)
            .event_format(FlatJson)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// The format of what the process prints itself ([`print_error`], [`json_line`] callers). The
/// first call decides and later ones change nothing: the first is made before the
/// configuration is loaded ([`early_format`], from the same flag, variable and file), and
/// [`init`]'s, with the loaded `log.format`, agrees with it whenever loading succeeded.
pub(crate) fn set_format(format: LogFormat) {
    let _already_decided = FORMAT.set(format);
}

/// Whether the process's own lines are JSON; text until [`set_format`] decides.
pub(crate) fn is_json() -> bool {
    FORMAT.get() == Some(&LogFormat::Json)
}

/// The log format before the configuration is loaded (to print its errors): `--log-format`,
/// else `SEEDKEEPER_LOG__FORMAT`, else `log.format` of the config file the load will read
/// (`--config`, `SEEDKEEPER_CONFIG`, `config/seedkeeper.toml`) when it is readable TOML, else
/// text. The loaded configuration decides afterwards, as always.
pub(crate) fn early_format(flag: Option<LogFormat>, sources: &ConfigLayers) -> LogFormat {
    if let Some(f) = flag {
        return f;
    }
    if let Some(f) = sources.var("SEEDKEEPER_LOG__FORMAT").and_then(parse_format) {
        return f;
    }
    // The file the load will read, as the load chooses it.
    let Some(file) = sources.config_file() else {
        return LogFormat::Text;
    };
    // Bounded and regular files only: a FIFO here would block before the first line.
    crate::config::read_regular(&file.path, crate::config::CONFIG_LIMIT)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .and_then(|t| t.get("log")?.get("format")?.as_str().and_then(parse_format))
        .unwrap_or(LogFormat::Text)
}

/// Whether a command line that failed to parse asked for JSON (`--log-format json` or
/// `--log-format=json`), else `SEEDKEEPER_LOG__FORMAT`.
pub(crate) fn json_requested(args: &[String]) -> bool {
    let flag = args.iter().enumerate().find_map(|(i, a)| {
        if a == "--log-format" {
            args.get(i + 1).and_then(|v| parse_format(v))
        } else {
            a.strip_prefix("--log-format=").and_then(parse_format)
        }
    });
    let env = std::env::var("SEEDKEEPER_LOG__FORMAT")
        .ok()
        .and_then(|v| parse_format(&v));
    flag.or(env) == Some(LogFormat::Json)
}

fn parse_format(s: &str) -> Option<LogFormat> {
    match s.trim().to_ascii_lowercase().as_str() {
        "json" => Some(LogFormat::Json),
        "text" => Some(LogFormat::Text),
        _ => None,
    }
}

/// One JSON log line (without the newline) in the shape of the JSON log format.
pub(crate) fn json_line(level: &str, target: &str, message: &str, fields: Vec<(String, Value)>) -> String {
    let mut line = Line::default();
    line.set("timestamp", Value::String(timestamp()));
    line.set("level", Value::String(level.to_string()));
    line.set("target", Value::String(target.to_string()));
    line.set("message", Value::String(message.to_string()));
    for (k, v) in fields {
        line.set(&k, v);
    }
    line.render()
}

/// An error the process reports itself, on stderr: `seedkeeper: <message>` as text, a JSON line
/// with `error.kind` and `exit_code` as JSON.
pub(crate) fn print_error(message: &str, kind: &str, exit_code: u8) {
    if is_json() {
        stderr_line(&json_line(
            "ERROR",
            "seedkeeper",
            message,
            vec![
                ("error.kind".into(), Value::String(kind.to_string())),
                ("exit_code".into(), Value::from(exit_code)),
            ],
        ));
    } else {
        stderr_line(&format!("seedkeeper: {message}"));
    }
}

fn timestamp() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

/// Keys in insertion order; a later value for a key replaces the earlier one in place.
#[derive(Default)]
struct Line(Vec<(String, Value)>);

impl Line {
    fn set(&mut self, key: &str, value: Value) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some(slot) => slot.1 = value,
            None => self.0.push((key.to_string(), value)),
        }
    }

    fn render(&self) -> String {
        let mut s = String::from("{");
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&Value::String(k.clone()).to_string());
            s.push(':');
            s.push_str(&v.to_string());
        }
        s.push('}');
        s
    }
}

/// The JSON event format: span fields flattened onto every line (see the module docs).
struct FlatJson;

impl<S, N> FormatEvent<S, N> for FlatJson
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        let mut line = Line::default();
        line.set("timestamp", Value::String(timestamp()));
        line.set("level", Value::String(meta.level().as_str().to_string()));
        line.set("target", Value::String(meta.target().to_string()));
        line.set("message", Value::String(String::new()));
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let ext = span.extensions();
                if let Some(fields) = ext.get::<FormattedFields<N>>() {
                    for (k, v) in SpanFields::parse(&fields.fields) {
                        line.set(&k, v);
                    }
                }
            }
        }
        event.record(&mut Fields(&mut line));
        writeln!(writer, "{}", line.render())
    }
}

/// How a span's fields are kept for [`FlatJson`]: a JSON array of `[name, value]` pairs, in the
/// order they were recorded (so `run.id` comes first on every line).
struct SpanFields;

impl SpanFields {
    fn parse(text: &str) -> Vec<(String, Value)> {
        serde_json::from_str::<Vec<(String, Value)>>(text).unwrap_or_default()
    }

    fn render(line: &Line) -> String {
        Value::Array(
            line.0
                .iter()
                .map(|(k, v)| Value::Array(vec![Value::String(k.clone()), v.clone()]))
                .collect(),
        )
        .to_string()
    }
}

impl<'w> FormatFields<'w> for SpanFields {
    fn format_fields<R: RecordFields>(&self, mut writer: Writer<'w>, fields: R) -> fmt::Result {
        let mut line = Line::default();
        fields.record(&mut Fields(&mut line));
        writer.write_str(&Self::render(&line))
    }

    fn add_fields(
        &self,
        current: &'w mut FormattedFields<Self>,
        fields: &tracing::span::Record<'_>,
    ) -> fmt::Result {
        let mut line = Line(Self::parse(&current.fields));
        fields.record(&mut Fields(&mut line));
        current.fields = Self::render(&line);
        Ok(())
    }
}

/// Records an event's fields into a [`Line`]. Events bridged from the `log` crate carry their
/// real target in `log.target`; the other `log.*` fields are dropped.
struct Fields<'a>(&'a mut Line);

impl Fields<'_> {
    fn put(&mut self, field: &Field, value: Value) {
        match field.name() {
            "log.target" => self.0.set("target", value),
            n if n.starts_with("log.") => {}
            n => self.0.set(n, value),
        }
    }
}

impl Visit for Fields<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.record_text(field, value.to_string());
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::from(value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(value.to_string()));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.record_text(field, format!("{value:?}"));
    }
}

impl Fields<'_> {
    fn record_text(&mut self, field: &Field, text: String) {
        if JSON_FIELDS.contains(&field.name()) {
            if let Ok(v @ (Value::Object(_) | Value::Array(_))) = serde_json::from_str(&text) {
                self.put(field, v);
                return;
            }
        }
        self.put(field, Value::String(text));
    }
}

/// rustls needs one process-wide crypto provider; ring keeps cmake and aws-lc out of the build.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_keep_their_order_embed_json_fields_and_let_later_keys_win() {
        let l = json_line(
            "INFO",
            "t",
            "m",
            vec![
                ("a".into(), Value::from(1)),
                ("message".into(), Value::from("n")),
            ],
        );
        let v: Value = serde_json::from_str(&l).unwrap_or_default();
        assert_eq!(v["message"], "n");
        assert!(l.starts_with("{\"timestamp\":"), "{l}");
        assert!(l.contains("\"message\":\"n\",\"a\":1"), "{l}");
    }

    #[test]
    fn the_early_format_comes_from_the_flag_the_environment_or_the_file() {
        let dir = std::env::temp_dir().join(format!("sk-telemetry-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("c.toml");
        let _ = std::fs::write(&file, "[log]\nformat = \"json\"\nnot_a_key = 1\n");
        let env = |pairs: &[(&str, &str)]| ConfigLayers {
            file: None,
            env: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let with_file = ConfigLayers {
            file: Some(file.clone()),
            env: vec![],
        };
        assert_eq!(early_format(None, &with_file), LogFormat::Json);
        assert_eq!(
            early_format(Some(LogFormat::Text), &with_file),
            LogFormat::Text
        );
        let path = file.display().to_string();
        assert_eq!(
            early_format(None, &env(&[("SEEDKEEPER_CONFIG", &path)])),
            LogFormat::Json
        );
        assert_eq!(
            early_format(
                None,
                &env(&[
                    ("SEEDKEEPER_CONFIG", &path),
                    ("SEEDKEEPER_LOG__FORMAT", "text")
                ])
            ),
            LogFormat::Text
        );
        assert_eq!(
            early_format(None, &env(&[("SEEDKEEPER_LOG__FORMAT", "JSON")])),
            LogFormat::Json
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert!(json_requested(&["x".into(), "--log-format=json".into()]));
        assert!(json_requested(&[
            "x".into(),
            "--log-format".into(),
            "json".into()
        ]));
    }
}

#[cfg(test)]
mod span_tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut v) = self.0.lock() {
                v.extend_from_slice(b);
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_lines_carry_the_fields_of_every_enclosing_span() {
        let buf = Buf::default();
        let out = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .fmt_fields(SpanFields)
            .event_format(FlatJson)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let run = tracing::info_span!(
                "run",
                run.id = "r1",
                trigger = "once",
                outcome = tracing::field::Empty
            );
            run.record("outcome", "succeeded");
            let _r = run.enter();
            let unit = tracing::info_span!("unit", unit = "identities");
            let _u = unit.enter();
            let counts = serde_json::json!({"identities": {"inserted": 2}});
            tracing::warn!(path = "users", counts = %counts, "retrying");
        });
        let text = String::from_utf8(buf.0.lock().map(|v| v.clone()).unwrap_or_default())
            .unwrap_or_default();
        println!("{text}");
        let v: Value = serde_json::from_str(text.trim()).unwrap_or_default();
        assert_eq!(v["run.id"], "r1", "{text}");
        assert_eq!(v["trigger"], "once");
        assert_eq!(v["unit"], "identities");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["message"], "retrying");
        assert_eq!(v["counts"]["identities"]["inserted"], 2);
        assert_eq!(v["outcome"], "succeeded", "a field recorded later");
        assert!(
            text.contains("\"message\":\"retrying\",\"run.id\":\"r1\",\"trigger\":\"once\""),
            "span fields in their order, after the message: {text}"
        );
    }
}
