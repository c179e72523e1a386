//! One test per kind of mistake a user makes in config.toml: each must name the line and key.

use std::path::Path;
use std::time::Duration;

use super::*;

const BASE: &str = r#"
[model]
path = "models/demo.onnx"
"#;

/// Validates `text` and expects an error at `line` about `key` whose message contains `needle`.
fn check_err(text: &str, line: usize, key: &str, needle: &str) {
    let err =
        Settings::from_toml_str(Path::new("/etc/mbt-edge/config.toml"), text).expect_err("config must be refused");
    assert_eq!(err.line_column.map(|(l, _)| l), Some(line), "line of {err}");
    assert_eq!(err.key, key, "key of {err}");
    assert!(err.message.contains(needle), "message of {err} should contain {needle:?}");
    let rendered = err.to_string();
    assert!(rendered.starts_with(&format!("/etc/mbt-edge/config.toml:{line}:")), "{rendered}");
}

fn check_ok(text: &str) -> Settings {
    Settings::from_toml_str(Path::new("/etc/mbt-edge/config.toml"), text).unwrap_or_else(|err| panic!("{err}"))
}

#[test]
fn minimal_config_gets_defaults() {
    let settings = check_ok(BASE);
    assert_eq!(settings.model.path, Path::new("/etc/mbt-edge/models/demo.onnx"));
    assert_eq!(settings.model.runtime, Runtime::Auto);
    assert_eq!(settings.model.threads, 2);
    assert_eq!(settings.window.hop, Duration::from_secs(1));
    assert!(settings.window.seconds.is_none());
    assert!(settings.sources.is_empty());
}

#[test]
fn metrics_endpoint_defaults_to_loopback_and_can_be_moved_or_disabled() {
    assert_eq!(check_ok(BASE).metrics.listen, Some(crate::config::DEFAULT_METRICS_LISTEN));
    let moved = check_ok(&format!("{BASE}\n[metrics]\nlisten = \"[::1]:9500\"\n"));
    assert_eq!(moved.metrics.listen, Some("[::1]:9500".parse().unwrap()));
    assert_eq!(check_ok(&format!("{BASE}\n[metrics]\nenabled = false\n")).metrics.listen, None);
    check_err(&format!("{BASE}\n[metrics]\nlisten = \"localhost\"\n"), 6, "metrics.listen", "not an address and port");
}

#[test]
fn unknown_top_level_key() {
    check_err(&format!("{BASE}\n[windw]\nhop = 1\n"), 5, "windw", "unknown key `windw`");
}

#[test]
fn unknown_key_in_section_names_allowed_keys() {
    check_err(&format!("{BASE}\n[window]\nhopp = 1.0\n"), 6, "window.hopp", "allowed:");
}

#[test]
fn unknown_key_in_source() {
    let text = format!("{BASE}\n[[source]]\nname = \"a\"\nkind = \"test\"\npatern = \"ball\"\n");
    check_err(&text, 8, "source[0].patern", "unknown key `patern`");
}

#[test]
fn wrong_type() {
    check_err(&format!("{BASE}threads = \"two\"\n"), 4, "model.threads", "invalid type");
}

#[test]
fn out_of_range_value() {
    check_err(&format!("{BASE}threads = 0\n"), 4, "model.threads", "allowed: 1 to 256");
}

#[test]
fn bad_duration() {
    check_err(&format!("{BASE}\n[window]\nhop = \"1 fortnight\"\n"), 6, "window.hop", "not a duration");
}

#[test]
fn durations_accept_numbers_and_units() {
    let settings = check_ok(&format!("{BASE}\n[window]\nhop = \"500ms\"\nseconds = 2\n"));
    assert_eq!(settings.window.hop, Duration::from_millis(500));
    assert_eq!(settings.window.seconds, Some(Duration::from_secs(2)));
}

#[test]
fn missing_source_name() {
    check_err(&format!("{BASE}\n[[source]]\nkind = \"test\"\n"), 5, "source[0].name", "missing");
}

#[test]
fn missing_kind_specific_key() {
    check_err(&format!("{BASE}\n[[source]]\nname = \"cam\"\nkind = \"rtsp\"\n"), 5, "source[0].url", "needs `url`");
}

#[test]
fn key_of_another_kind() {
    let text = format!("{BASE}\n[[source]]\nname = \"cam\"\nkind = \"test\"\nurl = \"rtsp://x\"\n");
    check_err(&text, 8, "source[0].url", "not a key of kind = \"test\"");
}

#[test]
fn unknown_kind() {
    check_err(&format!("{BASE}\n[[source]]\nname = \"cam\"\nkind = \"v4l\"\n"), 7, "source[0].kind", "allowed: v4l2");
}

#[test]
fn duplicate_source_names() {
    let text =
        format!("{BASE}\n[[source]]\nname = \"a\"\nkind = \"test\"\n\n[[source]]\nname = \"a\"\nkind = \"test\"\n");
    check_err(&text, 9, "source[1].name", "duplicate source name");
}

#[test]
fn source_name_must_fit_in_a_topic() {
    check_err(
        &format!("{BASE}\n[[source]]\nname = \"front/door\"\nkind = \"test\"\n"),
        6,
        "source[0].name",
        "not allowed",
    );
}

#[test]
fn audio_only_kind_cannot_have_video() {
    let text = format!("{BASE}\n[[source]]\nname = \"mic\"\nkind = \"alsa\"\naudio_device = \"hw:1\"\nvideo = true\n");
    check_err(&text, 9, "source[0].video", "has no video");
}

#[test]
fn unreadable_file() {
    let err = Settings::load(Path::new("/nonexistent/mbt-edge.toml")).expect_err("must fail");
    assert_eq!(err.line_column, None);
    assert!(err.to_string().starts_with("/nonexistent/mbt-edge.toml: cannot read the file"), "{err}");
}

#[test]
fn toml_syntax_error_has_a_position() {
    let err = Settings::from_toml_str(Path::new("c.toml"), "[model\npath = 1\n").expect_err("must fail");
    assert_eq!(err.line_column.map(|(line, _)| line), Some(1), "{err}");
}

#[test]
fn every_kind_validates() {
    let text = format!(
        r#"{BASE}
[[source]]
name = "cam"
kind = "v4l2"
video_device = "/dev/video0"
audio_device = "hw:1,0"

[[source]]
name = "mic"
kind = "alsa"
audio_device = "hw:1,0"

[[source]]
name = "pa"
kind = "pulse"

[[source]]
name = "ip"
kind = "rtsp"
url = "rtsp://10.0.0.2/stream"
latency = "100ms"
protocols = "tcp"

[[source]]
name = "file"
kind = "uri"
uri = "/tmp/clip.webm"

[[source]]
name = "synthetic"
kind = "test"
pattern = "ball"
wave = "square"
freq = 880.0
is_live = false
duration = "10s"

[[source]]
name = "jetson"
kind = "pipeline"
video_pipeline = "nvv4l2camerasrc ! nvvidconv"
"#
    );
    let settings = check_ok(&text);
    let kinds: Vec<_> = settings.sources.iter().map(|source| source.kind.name()).collect();
    assert_eq!(kinds, ["v4l2", "alsa", "pulse", "rtsp", "uri", "test", "pipeline"]);
    let flags: Vec<_> = settings.sources.iter().map(|source| (source.video, source.audio)).collect();
    assert_eq!(
        flags,
        [(true, true), (false, true), (false, true), (true, true), (true, true), (true, true), (true, false)]
    );
    assert_eq!(
        settings.source("file").map(|source| source.kind.clone()),
        Some(SourceKind::Uri { uri: "file:///tmp/clip.webm".into() })
    );
    assert!(!settings.source("synthetic").expect("present").kind.is_live());
}

#[test]
fn line_column_counts_characters() {
    assert_eq!(line_column("ab\ncd", 4), (2, 2));
    assert_eq!(line_column("ab", 0), (1, 1));
}

#[test]
fn span_of_finds_written_keys_and_falls_back_to_the_parent() {
    let text = "[model]\npath = \"m.onnx\"\n\n[[source]]\nname = \"a\"\n\n[[source]]\nname = \"b\"\nvideo = true\n";
    let line = |key: &str| span_of(text, key).map(|span| line_column(text, span.start).0);
    assert_eq!(line("model.path"), Some(2));
    assert_eq!(line("source[1].video"), Some(9));
    // Not written: the source's own header line.
    assert_eq!(line("source[0].video"), Some(4));
    assert_eq!(line("window.seconds"), None);
    assert_eq!(key_at(text, text.find("video").unwrap()), "source[1].video");
}
