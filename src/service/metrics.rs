//! The metrics and health endpoint: Prometheus text format 0.0.4 on `GET /metrics`, `200 ok`
//! or `503 <reason>` on `GET /health`, served by one thread on a std `TcpListener` (loopback
//! by default). [`render`] turns a typed [`MetricsSnapshot`] into the text; the server only
//! calls the closures it was given, so it knows nothing of telemetry.
//!
//! The server must never take the daemon down: a client that sends garbage, stalls, or
//! hangs up gets an error status or is dropped, one connection at a time, with a deadline.

use std::fmt::{self, Write as _};
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// `Content-Type` of `/metrics`: Prometheus text exposition format 0.0.4.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything `/metrics` shows, copied out of telemetry at scrape time.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetricsSnapshot {
    /// One entry per configured source, in config order.
    pub sources: Vec<SourceMetrics>,
    /// Latency of inference batches (features and model run).
    pub inference_latency: LatencyHistogram,
    /// Windows waiting for inference, and how many the queue holds.
    pub queue_depth: usize,
    pub queue_capacity: usize,
    /// Events started, per source and label.
    pub events: Vec<EventCount>,
    pub mqtt_connected: bool,
    /// Events in the spool (not yet acknowledged by the broker) and the spool's size on disk.
    pub spool_events: u64,
    pub spool_bytes: u64,
    /// Events held in memory because the spool's disk refused them.
    pub spool_unwritten: u64,
    pub spool_unwritable: bool,
}

/// One source's rates and counters.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceMetrics {
    pub source: String,
    /// Video frames per second arriving from the pipeline, recently measured.
    pub video_fps: f64,
    /// Audio samples per second arriving from the pipeline, recently measured.
    pub audio_rate_hz: f64,
    /// Last measured A/V skew (audio minus video arrival delay), seconds; `None` before the
    /// first window or for a one-stream source.
    pub av_skew_seconds: Option<f64>,
    pub windows_built: u64,
    /// Windows dropped: inference behind, inference failed, incarnation ended.
    pub windows_dropped: u64,
    /// Pipeline restarts after failures.
    pub restarts: u64,
}

/// A latency histogram as telemetry keeps it: cumulative counts per upper bound.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyHistogram {
    /// Increasing upper bounds in seconds; `+Inf` is added when the last one is finite.
    pub bounds_seconds: Vec<f64>,
    /// Observations at or under each bound (cumulative), same length as `bounds_seconds`.
    pub cumulative_counts: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

/// Events started for one source and label.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventCount {
    pub source: String,
    pub label: String,
    pub count: u64,
}

/// Renders `snapshot` in Prometheus text format 0.0.4, every metric prefixed `mbt_edge_`.
pub fn render(snapshot: &MetricsSnapshot) -> String {
    let mut out = String::with_capacity(4096);
    let sources = &snapshot.sources;

    let mut family = Family::begin(
        &mut out,
        "mbt_edge_source_video_fps",
        "gauge",
        "Video frames per second arriving from the source.",
    );
    for source in sources {
        family.sample("", &[("source", &source.source)], Value::Float(source.video_fps));
    }
    let mut family = Family::begin(
        &mut out,
        "mbt_edge_source_audio_rate_hz",
        "gauge",
        "Audio samples per second arriving from the source.",
    );
    for source in sources {
        family.sample("", &[("source", &source.source)], Value::Float(source.audio_rate_hz));
    }
    let mut family = Family::begin(
        &mut out,
        "mbt_edge_source_av_skew_seconds",
        "gauge",
        "Last measured A/V skew: audio minus video arrival delay.",
    );
    for source in sources {
        if let Some(skew) = source.av_skew_seconds {
            family.sample("", &[("source", &source.source)], Value::Float(skew));
        }
    }
    let mut family = Family::begin(&mut out, "mbt_edge_windows_built_total", "counter", "Windows cut from the source.");
    for source in sources {
        family.sample("", &[("source", &source.source)], Value::Int(source.windows_built));
    }
    let mut family = Family::begin(
        &mut out,
        "mbt_edge_windows_dropped_total",
        "counter",
        "Windows dropped before classification (inference behind or failed).",
    );
    for source in sources {
        family.sample("", &[("source", &source.source)], Value::Int(source.windows_dropped));
    }
    let mut family = Family::begin(
        &mut out,
        "mbt_edge_source_restarts_total",
        "counter",
        "Pipeline restarts after a source failed.",
    );
    for source in sources {
        family.sample("", &[("source", &source.source)], Value::Int(source.restarts));
    }

    let histogram = &snapshot.inference_latency;
    let mut family = Family::begin(
        &mut out,
        "mbt_edge_inference_latency_seconds",
        "histogram",
        "Latency of one inference batch: features and model run.",
    );
    let mut last_bound_infinite = false;
    for (bound, count) in histogram.bounds_seconds.iter().zip(&histogram.cumulative_counts) {
        family.sample("_bucket", &[("le", &format_float(*bound))], Value::Int(*count));
        last_bound_infinite = bound.is_infinite();
    }
    if !last_bound_infinite {
        family.sample("_bucket", &[("le", "+Inf")], Value::Int(histogram.count));
    }
    family.sample("_sum", &[], Value::Float(histogram.sum_seconds));
    family.sample("_count", &[], Value::Int(histogram.count));

    Family::begin(&mut out, "mbt_edge_inference_queue_depth", "gauge", "Windows waiting for inference.").sample(
        "",
        &[],
        Value::Int(snapshot.queue_depth as u64),
    );
    Family::begin(
        &mut out,
        "mbt_edge_inference_queue_capacity",
        "gauge",
        "Windows the inference queue holds before dropping the oldest.",
    )
    .sample("", &[], Value::Int(snapshot.queue_capacity as u64));

    let mut family =
        Family::begin(&mut out, "mbt_edge_events_total", "counter", "Events started, per source and label.");
    for event in &snapshot.events {
        family.sample("", &[("source", &event.source), ("label", &event.label)], Value::Int(event.count));
    }

    Family::begin(&mut out, "mbt_edge_mqtt_connected", "gauge", "1 while connected to the MQTT broker, else 0.")
        .sample("", &[], Value::Int(u64::from(snapshot.mqtt_connected)));
    Family::begin(
        &mut out,
        "mbt_edge_spool_events",
        "gauge",
        "Events in the spool, not yet acknowledged by the broker.",
    )
    .sample("", &[], Value::Int(snapshot.spool_events));
    Family::begin(&mut out, "mbt_edge_spool_bytes", "gauge", "Size of the spool on disk.").sample(
        "",
        &[],
        Value::Int(snapshot.spool_bytes),
    );
    Family::begin(
        &mut out,
        "mbt_edge_spool_unwritable",
        "gauge",
        "1 while the spool's disk refuses writes (events are held in memory), else 0.",
    )
    .sample("", &[], Value::Int(u64::from(snapshot.spool_unwritable)));
    Family::begin(
        &mut out,
        "mbt_edge_spool_unwritten_events",
        "gauge",
        "Events held in memory only because the spool's disk refused them.",
    )
    .sample("", &[], Value::Int(snapshot.spool_unwritten));
    out
}

/// The HTTP server thread; stops when the daemon's `shutdown` flag is set, on
/// [`MetricsServer::stop`], or when dropped.
#[derive(Debug)]
pub struct MetricsServer {
    local_addr: SocketAddr,
    stopped: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often the accept loop looks at the stop flags.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// The most time one client gets to send its request and read the answer.
const CLIENT_DEADLINE: Duration = Duration::from_secs(2);
/// The longest request head accepted (request line and headers).
const MAX_HEAD_BYTES: usize = 8 * 1024;

impl MetricsServer {
    /// Binds `address` (port 0 picks a free one) and serves on a new thread named
    /// `metrics-http`. `metrics` renders the `/metrics` body; `health` is `Ok(())` when
    /// healthy or `Err(reason)`. Fails only if the address cannot be bound.
    pub fn start<M, H>(
        address: SocketAddr,
        shutdown: Arc<AtomicBool>,
        metrics: M,
        health: H,
    ) -> io::Result<MetricsServer>
    where
        M: Fn() -> String + Send + 'static,
        H: Fn() -> Result<(), String> + Send + 'static,
    {
        let listener = TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let stopped = Arc::new(AtomicBool::new(false));
        let thread_stopped = Arc::clone(&stopped);
        let thread = std::thread::Builder::new().name("metrics-http".into()).spawn(move || {
            let handlers = Handlers { metrics: &metrics, health: &health };
            while !shutdown.load(Ordering::Relaxed) && !thread_stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _peer)) => serve_client(stream, &handlers),
                    // WouldBlock: nobody waiting. Other errors (EMFILE, ECONNABORTED) are
                    // transient for a server: wait and accept again.
                    Err(_) => std::thread::sleep(POLL_INTERVAL),
                }
            }
        })?;
        Ok(MetricsServer { local_addr, stopped, thread: Some(thread) })
    }

    /// The bound address (with the port actually chosen).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Stops accepting and waits for the thread: at most one poll interval plus one client's
    /// deadline.
    pub fn stop(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stopped.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

struct Handlers<'a> {
    metrics: &'a dyn Fn() -> String,
    health: &'a dyn Fn() -> Result<(), String>,
}

struct Response {
    status: u16,
    reason: &'static str,
    content_type: &'static str,
    body: String,
    allow: bool,
}

impl Response {
    fn text(status: u16, reason: &'static str, body: impl Into<String>) -> Response {
        Response { status, reason, content_type: "text/plain; charset=utf-8", body: body.into(), allow: false }
    }
}

fn serve_client(mut stream: TcpStream, handlers: &Handlers<'_>) {
    let deadline = Instant::now() + CLIENT_DEADLINE;
    // Accepted sockets may inherit non-blocking mode on some platforms.
    if stream.set_nonblocking(false).is_err() || stream.set_write_timeout(Some(CLIENT_DEADLINE)).is_err() {
        return;
    }
    let (response, head_only) = match read_head(&mut stream, deadline) {
        Ok(Some(head)) => respond(&head, handlers),
        // The client hung up without sending anything (a port probe).
        Ok(None) => return,
        Err(response) => (response, false),
    };
    let mut message = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        response.status,
        response.reason,
        response.content_type,
        response.body.len()
    );
    if response.allow {
        message.push_str("Allow: GET, HEAD\r\n");
    }
    message.push_str("\r\n");
    if !head_only {
        message.push_str(&response.body);
    }
    // A client that went away is its own problem.
    let _ = stream.write_all(message.as_bytes());
    let _ = stream.flush();
    let _ = stream.shutdown(std::net::Shutdown::Write);
}

/// Reads the request head (up to the blank line). `Ok(None)`: closed before a byte arrived;
/// `Err`: the error response to send.
fn read_head(stream: &mut TcpStream, deadline: Instant) -> Result<Option<Vec<u8>>, Response> {
    let mut head = Vec::with_capacity(512);
    let mut buffer = [0u8; 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return Err(Response::text(408, "Request Timeout", "request timeout\n"));
        }
        match stream.read(&mut buffer) {
            Ok(0) if head.is_empty() => return Ok(None),
            Ok(0) => return Err(Response::text(400, "Bad Request", "incomplete request\n")),
            Ok(n) => head.extend_from_slice(&buffer[..n]),
            Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
            Err(err) if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {
                return Err(Response::text(408, "Request Timeout", "request timeout\n"));
            }
            Err(_) => return Ok(None),
        }
        if let Some(end) = find_head_end(&head) {
            head.truncate(end);
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD_BYTES {
            return Err(Response::text(431, "Request Header Fields Too Large", "request head too large\n"));
        }
    }
}

fn find_head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = bytes.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Routes one request head; returns the response and whether to omit the body (HEAD).
fn respond(head: &[u8], handlers: &Handlers<'_>) -> (Response, bool) {
    let bad = || (Response::text(400, "Bad Request", "bad request\n"), false);
    let Ok(head) = std::str::from_utf8(head) else { return bad() };
    let request_line = head.lines().next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return bad();
    };
    if !version.starts_with("HTTP/1.") || !target.starts_with('/') {
        return bad();
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => {
            let mut response = Response::text(405, "Method Not Allowed", "method not allowed\n");
            response.allow = true;
            return (response, false);
        }
    };
    let path = target.split(['?', '#']).next().unwrap_or(target);
    let response = match path {
        "/metrics" => match catch_unwind(AssertUnwindSafe(|| (handlers.metrics)())) {
            Ok(body) => Response { status: 200, reason: "OK", content_type: CONTENT_TYPE, body, allow: false },
            Err(_) => Response::text(500, "Internal Server Error", "metrics unavailable\n"),
        },
        "/health" => match catch_unwind(AssertUnwindSafe(|| (handlers.health)())) {
            Ok(Ok(())) => Response::text(200, "OK", "ok\n"),
            Ok(Err(reason)) => Response::text(503, "Service Unavailable", format!("{}\n", one_line(&reason))),
            Err(_) => Response::text(500, "Internal Server Error", "health unavailable\n"),
        },
        _ => Response::text(404, "Not Found", "not found\n"),
    };
    (response, head_only)
}

fn one_line(text: &str) -> String {
    text.chars().map(|c| if c == '\n' || c == '\r' { ' ' } else { c }).collect()
}

/// One metric family: its `# HELP` and `# TYPE` lines are written by `begin`, then samples.
struct Family<'o> {
    out: &'o mut String,
    name: &'static str,
}

enum Value {
    Int(u64),
    Float(f64),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Int(value) => write!(f, "{value}"),
            Value::Float(value) => f.write_str(&format_float(*value)),
        }
    }
}

impl<'o> Family<'o> {
    fn begin(out: &'o mut String, name: &'static str, kind: &str, help: &str) -> Family<'o> {
        let _ = writeln!(out, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(out, "# TYPE {name} {kind}");
        Family { out, name }
    }

    fn sample(&mut self, suffix: &str, labels: &[(&str, &str)], value: Value) {
        self.out.push_str(self.name);
        self.out.push_str(suffix);
        if !labels.is_empty() {
            self.out.push('{');
            for (idx, (key, label_value)) in labels.iter().enumerate() {
                if idx > 0 {
                    self.out.push(',');
                }
                let _ = write!(self.out, "{key}=\"{}\"", escape_label_value(label_value));
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// Floats as Prometheus writes them: `+Inf`, `-Inf`, `NaN`, otherwise Rust's shortest
/// round-trip form (`0.005`, `2.5`, `1`).
fn format_float(value: f64) -> String {
    if value.is_nan() {
        "NaN".into()
    } else if value == f64::INFINITY {
        "+Inf".into()
    } else if value == f64::NEG_INFINITY {
        "-Inf".into()
    } else {
        format!("{value}")
    }
}

/// `# HELP` text escapes backslash and line feed.
fn escape_help(text: &str) -> String {
    text.replace('\\', "\\\\").replace('\n', "\\n")
}

/// Label values escape backslash, double quote and line feed.
fn escape_label_value(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::net::Ipv4Addr;

    use super::*;

    /// One parsed sample line.
    #[derive(Debug, Clone, PartialEq)]
    struct Sample {
        name: String,
        labels: Vec<(String, String)>,
        value: f64,
    }

    /// A strict reader of the text format 0.0.4, enough to hold `render` to it: every family
    /// has HELP then TYPE before its samples and appears once, names and label names are
    /// valid, label values unescape, values are floats, histograms are cumulative and end
    /// in `+Inf` equal to `_count`.
    fn parse(text: &str) -> (BTreeMap<String, (String, String)>, Vec<Sample>) {
        let valid_name = |name: &str| {
            let mut chars = name.chars();
            chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        };
        assert!(text.ends_with('\n'), "the exposition ends with a line feed");
        let mut families: BTreeMap<String, (String, String)> = BTreeMap::new();
        let mut current: Option<String> = None;
        let mut samples = Vec::new();
        let mut pending_help: Option<(String, String)> = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').expect("HELP has a name and text");
                assert!(valid_name(name), "metric name {name:?}");
                assert!(!families.contains_key(name), "family {name} appears twice");
                pending_help = Some((name.to_string(), help.to_string()));
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').expect("TYPE has a name and type");
                let (help_name, help) = pending_help.take().expect("HELP before TYPE");
                assert_eq!(help_name, name);
                assert!(["counter", "gauge", "histogram", "summary", "untyped"].contains(&kind), "type {kind}");
                families.insert(name.to_string(), (kind.to_string(), help));
                current = Some(name.to_string());
            } else {
                assert!(!line.starts_with('#') && !line.is_empty(), "unexpected line {line:?}");
                let sample = parse_sample(line);
                let family = current.as_deref().expect("a sample after its TYPE");
                let (kind, _) = &families[family];
                let allowed: Vec<String> = if kind == "histogram" {
                    ["_bucket", "_sum", "_count"].iter().map(|s| format!("{family}{s}")).collect()
                } else {
                    vec![family.to_string()]
                };
                assert!(allowed.contains(&sample.name), "sample {} outside its family {family}", sample.name);
                for (label, _) in &sample.labels {
                    assert!(valid_name(label) && !label.starts_with("__"), "label name {label:?}");
                }
                samples.push(sample);
            }
        }
        for (family, (kind, _)) in &families {
            if kind != "histogram" {
                continue;
            }
            let buckets: Vec<&Sample> = samples.iter().filter(|s| s.name == format!("{family}_bucket")).collect();
            let counts: Vec<f64> = buckets.iter().map(|s| s.value).collect();
            assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{family} buckets are cumulative: {counts:?}");
            let last = buckets.last().expect("a histogram has buckets");
            assert_eq!(last.labels, vec![("le".to_string(), "+Inf".to_string())]);
            let count = samples.iter().find(|s| s.name == format!("{family}_count")).expect("_count").value;
            assert_eq!(last.value, count, "{family}: +Inf bucket equals _count");
        }
        (families, samples)
    }

    fn parse_sample(line: &str) -> Sample {
        let chars: Vec<char> = line.chars().collect();
        let mut idx = chars.iter().position(|c| *c == '{' || *c == ' ').expect("a sample has a value");
        let name: String = chars[..idx].iter().collect();
        let mut labels = Vec::new();
        if chars[idx] == '{' {
            idx += 1;
            while chars[idx] != '}' {
                let key_end = idx + chars[idx..].iter().position(|c| *c == '=').expect("label=value");
                let key: String = chars[idx..key_end].iter().collect();
                assert_eq!(chars[key_end + 1], '"', "label value is quoted");
                idx = key_end + 2;
                let mut value = String::new();
                loop {
                    let c = chars[idx];
                    idx += 1;
                    match c {
                        '"' => break,
                        '\\' => {
                            value.push(match chars[idx] {
                                '\\' => '\\',
                                '"' => '"',
                                'n' => '\n',
                                other => panic!("bad escape \\{other}"),
                            });
                            idx += 1;
                        }
                        '\n' => panic!("raw line feed in a label value"),
                        c => value.push(c),
                    }
                }
                labels.push((key, value));
                match chars[idx] {
                    ',' => idx += 1,
                    '}' => {}
                    other => panic!("unexpected {other:?} after a label"),
                }
            }
            idx += 1;
        }
        assert_eq!(chars[idx], ' ', "one space before the value");
        let value_text: String = chars[idx + 1..].iter().collect();
        let value = match value_text.as_str() {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            "NaN" => f64::NAN,
            text => text.parse().unwrap_or_else(|_| panic!("value {text:?}")),
        };
        Sample { name, labels, value }
    }

    fn snapshot() -> MetricsSnapshot {
        MetricsSnapshot {
            sources: vec![
                SourceMetrics {
                    source: "yard".into(),
                    video_fps: 15.0,
                    audio_rate_hz: 16000.0,
                    av_skew_seconds: Some(-0.012),
                    windows_built: 120,
                    windows_dropped: 2,
                    restarts: 1,
                },
                SourceMetrics {
                    source: "gate \"north\" \\ cam\nB".into(),
                    video_fps: 0.0,
                    audio_rate_hz: 8000.5,
                    av_skew_seconds: None,
                    windows_built: 0,
                    windows_dropped: 0,
                    restarts: 7,
                },
            ],
            inference_latency: LatencyHistogram {
                bounds_seconds: vec![0.005, 0.01, 0.05, 0.1, 1.0, f64::INFINITY],
                cumulative_counts: vec![0, 1, 5, 9, 10, 10],
                sum_seconds: 0.42,
                count: 10,
            },
            queue_depth: 3,
            queue_capacity: 8,
            events: vec![
                EventCount { source: "yard".into(), label: "ball_tone".into(), count: 4 },
                EventCount { source: "yard".into(), label: "dog bark".into(), count: 1 },
            ],
            mqtt_connected: true,
            spool_events: 5,
            spool_bytes: 2048,
            spool_unwritten: 0,
            spool_unwritable: false,
        }
    }

    fn value(samples: &[Sample], name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let labels: Vec<(String, String)> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        samples.iter().find(|s| s.name == name && s.labels == labels).map(|s| s.value)
    }

    /// A sample name, its labels, and its value (`None`: absent).
    type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], Option<f64>);

    /// Renders `snapshot`, parses it strictly, and compares the listed samples.
    fn check(snapshot: &MetricsSnapshot, expected: &[Expected<'_>]) {
        let text = render(snapshot);
        let (_, samples) = parse(&text);
        for (name, labels, want) in expected {
            assert_eq!(value(&samples, name, labels), *want, "{name}{labels:?} in\n{text}");
        }
    }

    #[test]
    fn renders_every_metric_in_text_format() {
        let odd = "gate \"north\" \\ cam\nB";
        check(
            &snapshot(),
            &[
                ("mbt_edge_source_video_fps", &[("source", "yard")], Some(15.0)),
                ("mbt_edge_source_audio_rate_hz", &[("source", odd)], Some(8000.5)),
                ("mbt_edge_source_av_skew_seconds", &[("source", "yard")], Some(-0.012)),
                ("mbt_edge_source_av_skew_seconds", &[("source", odd)], None),
                ("mbt_edge_windows_built_total", &[("source", "yard")], Some(120.0)),
                ("mbt_edge_windows_dropped_total", &[("source", "yard")], Some(2.0)),
                ("mbt_edge_source_restarts_total", &[("source", odd)], Some(7.0)),
                ("mbt_edge_inference_latency_seconds_bucket", &[("le", "0.005")], Some(0.0)),
                ("mbt_edge_inference_latency_seconds_bucket", &[("le", "0.05")], Some(5.0)),
                ("mbt_edge_inference_latency_seconds_bucket", &[("le", "1")], Some(10.0)),
                ("mbt_edge_inference_latency_seconds_bucket", &[("le", "+Inf")], Some(10.0)),
                ("mbt_edge_inference_latency_seconds_sum", &[], Some(0.42)),
                ("mbt_edge_inference_latency_seconds_count", &[], Some(10.0)),
                ("mbt_edge_inference_queue_depth", &[], Some(3.0)),
                ("mbt_edge_inference_queue_capacity", &[], Some(8.0)),
                ("mbt_edge_events_total", &[("source", "yard"), ("label", "dog bark")], Some(1.0)),
                ("mbt_edge_mqtt_connected", &[], Some(1.0)),
                ("mbt_edge_spool_events", &[], Some(5.0)),
                ("mbt_edge_spool_bytes", &[], Some(2048.0)),
                ("mbt_edge_spool_unwritable", &[], Some(0.0)),
                ("mbt_edge_spool_unwritten_events", &[], Some(0.0)),
            ],
        );
    }

    #[test]
    fn families_have_help_and_type() {
        let (families, _) = parse(&render(&snapshot()));
        assert_eq!(families["mbt_edge_inference_latency_seconds"].0, "histogram");
        assert_eq!(families["mbt_edge_windows_built_total"].0, "counter");
        assert_eq!(families["mbt_edge_mqtt_connected"].0, "gauge");
        assert_eq!(families.len(), 15);
        assert!(families.values().all(|(_, help)| !help.is_empty()));
    }

    #[test]
    fn label_values_are_escaped() {
        let text = render(&snapshot());
        assert!(text.contains(r#"mbt_edge_source_restarts_total{source="gate \"north\" \\ cam\nB"} 7"#), "{text}");
    }

    #[test]
    fn an_empty_snapshot_is_valid_and_adds_the_inf_bucket() {
        check(
            &MetricsSnapshot::default(),
            &[
                ("mbt_edge_inference_latency_seconds_bucket", &[("le", "+Inf")], Some(0.0)),
                ("mbt_edge_mqtt_connected", &[], Some(0.0)),
            ],
        );
    }

    #[test]
    fn special_floats_use_prometheus_spelling() {
        assert_eq!(format_float(f64::INFINITY), "+Inf");
        assert_eq!(format_float(f64::NEG_INFINITY), "-Inf");
        assert_eq!(format_float(f64::NAN), "NaN");
        assert_eq!(format_float(2.5), "2.5");
        let mut odd = snapshot();
        odd.sources[0].video_fps = f64::NAN;
        let (_, samples) = parse(&render(&odd));
        assert!(value(&samples, "mbt_edge_source_video_fps", &[("source", "yard")]).unwrap().is_nan());
    }

    // The server, over real TCP on loopback.

    struct Server {
        server: MetricsServer,
        shutdown: Arc<AtomicBool>,
    }

    fn start(health: Result<(), String>) -> Server {
        let shutdown = Arc::new(AtomicBool::new(false));
        let server = MetricsServer::start(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            Arc::clone(&shutdown),
            || render(&snapshot()),
            move || health.clone(),
        )
        .expect("binding a loopback port");
        Server { server, shutdown }
    }

    /// Sends `request` as is and returns the whole answer (the server closes the connection).
    fn exchange(server: &Server, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(server.server.local_addr()).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.write_all(request).unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).unwrap();
        String::from_utf8(answer).unwrap()
    }

    fn status_and_body(answer: &str) -> (&str, &str) {
        let (head, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
        (head.lines().next().unwrap(), body)
    }

    #[test]
    fn serves_metrics_over_http() {
        let server = start(Ok(()));
        let answer = exchange(&server, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n");
        let (status, body) = status_and_body(&answer);
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(answer.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8\r\n"));
        assert!(answer.contains(&format!("Content-Length: {}\r\n", body.len())));
        let (_, samples) = parse(body);
        assert_eq!(value(&samples, "mbt_edge_spool_bytes", &[]), Some(2048.0));
        server.server.stop();
    }

    #[test]
    fn health_answers_ok_or_the_reason() {
        let healthy = start(Ok(()));
        let answer = exchange(&healthy, b"GET /health HTTP/1.0\r\n\r\n");
        assert_eq!(status_and_body(&answer), ("HTTP/1.1 200 OK", "ok\n"));

        let sick = start(Err("no windows from any source for 11.0s".into()));
        let answer = exchange(&sick, b"GET /health?verbose=1 HTTP/1.1\n\n");
        assert_eq!(
            status_and_body(&answer),
            ("HTTP/1.1 503 Service Unavailable", "no windows from any source for 11.0s\n")
        );
        let answer = exchange(&sick, b"HEAD /health HTTP/1.1\r\n\r\n");
        assert!(answer.starts_with("HTTP/1.1 503 "));
        assert!(answer.ends_with("\r\n\r\n"), "HEAD has no body: {answer:?}");
    }

    #[test]
    fn unknown_paths_methods_and_garbage_get_errors_and_the_server_lives_on() {
        let server = start(Ok(()));
        let cases: &[(&[u8], &str)] = &[
            (b"GET /nope HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
            (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "HTTP/1.1 405 Method Not Allowed"),
            (b"\x00\xff\xfe garbage\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"GET /metrics\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"GET metrics HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"),
            (b"GET /metrics SPDY/3\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        ];
        for (request, expected) in cases {
            let answer = exchange(&server, request);
            assert_eq!(status_and_body(&answer).0, *expected, "request {:?}", String::from_utf8_lossy(request));
        }
        // A head that never ends.
        let mut huge = b"GET /metrics HTTP/1.1\r\n".to_vec();
        huge.extend(std::iter::repeat_n(b'x', MAX_HEAD_BYTES + 10));
        assert!(exchange(&server, &huge).starts_with("HTTP/1.1 431 "));
        // A client that connects and leaves, and one that sends half a request and hangs up.
        drop(TcpStream::connect(server.server.local_addr()).unwrap());
        {
            let mut half = TcpStream::connect(server.server.local_addr()).unwrap();
            half.write_all(b"GET /met").unwrap();
        }
        let answer = exchange(&server, b"GET /metrics HTTP/1.1\r\n\r\n");
        assert_eq!(status_and_body(&answer).0, "HTTP/1.1 200 OK");
    }

    #[test]
    fn a_stalled_client_times_out_without_blocking_forever() {
        let server = start(Ok(()));
        let mut stalled = TcpStream::connect(server.server.local_addr()).unwrap();
        stalled.write_all(b"GET /metrics HTTP/1.1\r\n").unwrap();
        stalled.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = String::new();
        let _ = stalled.read_to_string(&mut answer);
        assert!(answer.starts_with("HTTP/1.1 408 "), "{answer:?}");
        let answer = exchange(&server, b"GET /health HTTP/1.1\r\n\r\n");
        assert_eq!(status_and_body(&answer).0, "HTTP/1.1 200 OK");
    }

    #[test]
    fn a_panicking_closure_is_a_500_not_a_dead_server() {
        let shutdown = Arc::new(AtomicBool::new(false));
        let server = MetricsServer::start(
            SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            Arc::clone(&shutdown),
            || panic!("snapshot failed"),
            || Ok(()),
        )
        .unwrap();
        let server = Server { server, shutdown };
        assert!(exchange(&server, b"GET /metrics HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 500 "));
        assert!(exchange(&server, b"GET /health HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 "));
    }

    #[test]
    fn the_shutdown_flag_stops_the_server() {
        let server = start(Ok(()));
        let address = server.server.local_addr();
        server.shutdown.store(true, Ordering::Relaxed);
        server.server.stop();
        assert!(TcpStream::connect(address).is_err(), "the port is closed after stop");
    }
}
