//! What `/metrics` shows: a typed [`MetricsSnapshot`] copied out of telemetry at scrape time,
//! rendered in the Prometheus text format 0.0.4 by `prometheus-client` (the Prometheus
//! project's own Rust client): its encoder does the names, escaping, float spelling and
//! histogram layout that a hand-written one has to get right. The HTTP side is `crate::web`.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;

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
    pub evidence: EvidenceMetrics,
}

/// Evidence written, failed and deleted by retention, and what the evidence dir holds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvidenceMetrics {
    pub snapshots: u64,
    pub clips: u64,
    pub failed: u64,
    pub deleted: u64,
    pub files: u64,
    pub bytes: u64,
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
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(snapshot.clone())));
    let mut out = String::with_capacity(4096);
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("writing to a String does not fail");
    out
}

/// Encodes one snapshot: registered per scrape, so the counters are the daemon's own
/// (`ConstCounter`, `ConstGauge`), not copies kept in sync.
#[derive(Debug)]
struct SnapshotCollector(MetricsSnapshot);

/// A family's name without its `_total` (the encoder adds it to counters) and its help
/// without the final full stop (the encoder adds one).
fn family<'e>(
    encoder: &'e mut DescriptorEncoder<'_>,
    name: &'e str,
    help: &str,
    kind: MetricType,
) -> Result<MetricEncoder<'e>, std::fmt::Error> {
    let name = name.strip_suffix("_total").unwrap_or(name);
    encoder.encode_descriptor(name, help.trim_end_matches('.'), None, kind)
}

fn per_source<T>(
    encoder: &mut DescriptorEncoder<'_>,
    (name, help, kind): (&str, &str, MetricType),
    sources: &[SourceMetrics],
    value: impl Fn(&SourceMetrics) -> Option<T>,
    encode: impl Fn(T, MetricEncoder<'_>) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    let mut metric = family(encoder, name, help, kind)?;
    for source in sources {
        if let Some(value) = value(source) {
            encode(value, metric.encode_family(&[("source", source.source.as_str())])?)?;
        }
    }
    Ok(())
}

fn gauge(value: f64, encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(encoder)
}

fn counter(value: u64, encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
    ConstCounter::new(value).encode(encoder)
}

fn single_gauge(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    gauge(value, family(encoder, name, help, MetricType::Gauge)?)
}

impl Collector for SnapshotCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = &self.0;
        let sources = &snapshot.sources;
        let encoder = &mut encoder;
        per_source(
            encoder,
            ("mbt_edge_source_video_fps", "Video frames per second arriving from the source.", MetricType::Gauge),
            sources,
            |source| Some(source.video_fps),
            gauge,
        )?;
        per_source(
            encoder,
            ("mbt_edge_source_audio_rate_hz", "Audio samples per second arriving from the source.", MetricType::Gauge),
            sources,
            |source| Some(source.audio_rate_hz),
            gauge,
        )?;
        per_source(
            encoder,
            (
                "mbt_edge_source_av_skew_seconds",
                "Last measured A/V skew: audio minus video arrival delay.",
                MetricType::Gauge,
            ),
            sources,
            |source| source.av_skew_seconds,
            gauge,
        )?;
        per_source(
            encoder,
            ("mbt_edge_windows_built_total", "Windows cut from the source.", MetricType::Counter),
            sources,
            |source| Some(source.windows_built),
            counter,
        )?;
        per_source(
            encoder,
            (
                "mbt_edge_windows_dropped_total",
                "Windows dropped before classification (inference behind or failed).",
                MetricType::Counter,
            ),
            sources,
            |source| Some(source.windows_dropped),
            counter,
        )?;
        per_source(
            encoder,
            ("mbt_edge_source_restarts_total", "Pipeline restarts after a source failed.", MetricType::Counter),
            sources,
            |source| Some(source.restarts),
            counter,
        )?;

        // Telemetry keeps cumulative counts; the encoder wants each bucket's own.
        let histogram = &snapshot.inference_latency;
        let mut previous = 0;
        let buckets: Vec<(f64, u64)> = histogram
            .bounds_seconds
            .iter()
            .zip(&histogram.cumulative_counts)
            .map(|(bound, cumulative)| {
                let own = cumulative.saturating_sub(previous);
                previous = previous.max(*cumulative);
                (*bound, own)
            })
            .collect();
        family(
            encoder,
            "mbt_edge_inference_latency_seconds",
            "Latency of one inference batch: features and model run.",
            MetricType::Histogram,
        )?
        .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            histogram.sum_seconds,
            histogram.count,
            &buckets,
            None,
        )?;

        single_gauge(
            encoder,
            "mbt_edge_inference_queue_depth",
            "Windows waiting for inference.",
            snapshot.queue_depth as f64,
        )?;
        single_gauge(
            encoder,
            "mbt_edge_inference_queue_capacity",
            "Windows the inference queue holds before dropping the oldest.",
            snapshot.queue_capacity as f64,
        )?;
        let mut events =
            family(encoder, "mbt_edge_events_total", "Events started, per source and label.", MetricType::Counter)?;
        for event in &snapshot.events {
            counter(
                event.count,
                events.encode_family(&[("source", event.source.as_str()), ("label", event.label.as_str())])?,
            )?;
        }
        single_gauge(
            encoder,
            "mbt_edge_mqtt_connected",
            "1 while connected to the MQTT broker, else 0.",
            f64::from(u8::from(snapshot.mqtt_connected)),
        )?;
        single_gauge(
            encoder,
            "mbt_edge_spool_events",
            "Events in the spool, not yet acknowledged by the broker.",
            snapshot.spool_events as f64,
        )?;
        single_gauge(encoder, "mbt_edge_spool_bytes", "Size of the spool on disk.", snapshot.spool_bytes as f64)?;
        single_gauge(
            encoder,
            "mbt_edge_spool_unwritable",
            "1 while the spool's disk refuses writes (events are held in memory), else 0.",
            f64::from(u8::from(snapshot.spool_unwritable)),
        )?;
        single_gauge(
            encoder,
            "mbt_edge_spool_unwritten_events",
            "Events held in memory only because the spool's disk refused them.",
            snapshot.spool_unwritten as f64,
        )?;
        let evidence = &snapshot.evidence;
        let mut written = family(
            encoder,
            "mbt_edge_evidence_written_total",
            "Evidence files written: a snapshot per event start, a clip per event end.",
            MetricType::Counter,
        )?;
        counter(evidence.snapshots, written.encode_family(&[("kind", "snapshot")])?)?;
        counter(evidence.clips, written.encode_family(&[("kind", "clip")])?)?;
        counter(
            evidence.failed,
            family(
                encoder,
                "mbt_edge_evidence_failed_total",
                "Snapshots and clips not written (full disk, no media); their events went out flagged.",
                MetricType::Counter,
            )?,
        )?;
        counter(
            evidence.deleted,
            family(
                encoder,
                "mbt_edge_evidence_deleted_total",
                "Evidence files deleted by retention (max_bytes, max_age), oldest first.",
                MetricType::Counter,
            )?,
        )?;
        single_gauge(encoder, "mbt_edge_evidence_files", "Files in the evidence dir.", evidence.files as f64)?;
        single_gauge(encoder, "mbt_edge_evidence_bytes", "Size of the evidence dir.", evidence.bytes as f64)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

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
            evidence: EvidenceMetrics { snapshots: 3, clips: 2, failed: 1, deleted: 4, files: 5, bytes: 123_456 },
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
                ("mbt_edge_evidence_written_total", &[("kind", "snapshot")], Some(3.0)),
                ("mbt_edge_evidence_written_total", &[("kind", "clip")], Some(2.0)),
                ("mbt_edge_evidence_failed_total", &[], Some(1.0)),
                ("mbt_edge_evidence_deleted_total", &[], Some(4.0)),
                ("mbt_edge_evidence_files", &[], Some(5.0)),
                ("mbt_edge_evidence_bytes", &[], Some(123_456.0)),
            ],
        );
    }

    #[test]
    fn families_have_help_and_type() {
        let (families, _) = parse(&render(&snapshot()));
        assert_eq!(families["mbt_edge_inference_latency_seconds"].0, "histogram");
        assert_eq!(families["mbt_edge_windows_built_total"].0, "counter");
        assert_eq!(families["mbt_edge_mqtt_connected"].0, "gauge");
        assert_eq!(families.len(), 20);
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
        let mut odd = snapshot();
        odd.sources[0].video_fps = f64::NAN;
        odd.sources[1].video_fps = f64::INFINITY;
        let text = render(&odd);
        let (_, samples) = parse(&text);
        assert!(value(&samples, "mbt_edge_source_video_fps", &[("source", "yard")]).unwrap().is_nan());
        assert!(text.contains("mbt_edge_source_video_fps{source=\"yard\"} NaN\n"), "{text}");
        assert!(text.contains("} +Inf\n"), "{text}");
    }
}
