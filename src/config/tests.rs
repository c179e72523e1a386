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
fn listening_beyond_loopback_needs_a_token_file_that_holds_a_token() {
    check_err(
        &format!("{BASE}\n[metrics]\nlisten = \"0.0.0.0:9464\"\n"),
        6,
        "metrics.listen",
        "not a loopback address: set [metrics] token_file",
    );
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("token");
    std::fs::write(&good, "0123456789abcdef-_.~XYZ\n").unwrap();
    let settings = check_ok(&format!(
        "{BASE}\n[metrics]\nlisten = \"0.0.0.0:9464\"\ntoken_file = {:?}\n",
        good.display().to_string()
    ));
    assert_eq!(settings.metrics.token.as_deref(), Some("0123456789abcdef-_.~XYZ"));
    // Loopback with a token: the token is required there too.
    let settings = check_ok(&format!("{BASE}\n[metrics]\ntoken_file = {:?}\n", good.display().to_string()));
    assert!(settings.metrics.token.is_some());
    let short = dir.path().join("short");
    std::fs::write(&short, "abc\n").unwrap();
    check_err(
        &format!("{BASE}\n[metrics]\ntoken_file = {:?}\n", short.display().to_string()),
        6,
        "metrics.token_file",
        "must hold a token of at least 16 characters",
    );
    let spaced = dir.path().join("spaced");
    std::fs::write(&spaced, "0123456789 abcdef ghij\n").unwrap();
    check_err(
        &format!("{BASE}\n[metrics]\ntoken_file = {:?}\n", spaced.display().to_string()),
        6,
        "metrics.token_file",
        "A-Z a-z 0-9",
    );
    check_err(
        &format!("{BASE}\n[metrics]\ntoken_file = \"/nonexistent/token\"\n"),
        6,
        "metrics.token_file",
        "cannot read /nonexistent/token",
    );
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

/// `[events]`, `[mqtt]` and `[spool]` alone, validated as the sections they are.
mod sections {
    use serde::Deserialize;

    use super::super::FieldError;
    use super::super::events::RawEvents;
    use super::super::mqtt::{RawMqtt, RawSpool};
    use crate::delivery::{MqttSettings, SpoolSettings};
    use crate::events::EventSettings;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        events: RawEvents,
        #[serde(default)]
        mqtt: RawMqtt,
        #[serde(default)]
        spool: RawSpool,
    }

    struct Typed {
        events: EventSettings,
        mqtt: MqttSettings,
        spool: SpoolSettings,
    }

    fn parse(toml_text: &str) -> Result<Typed, FieldError> {
        let file: File = toml::from_str(toml_text).map_err(|e| FieldError::new("", e.span(), e.message()))?;
        Ok(Typed { events: file.events.validate()?, mqtt: file.mqtt.validate("porch")?, spool: file.spool.validate()? })
    }

    /// Parses `toml_text` and compares either what `inspect` extracts from the typed
    /// settings, or the error as `key: message-prefix @ spanned text`, with `expected`.
    fn check(toml_text: &str, inspect: fn(&Typed) -> String, expected: &str) {
        let got = match parse(toml_text) {
            Ok(typed) => inspect(&typed),
            Err(e) => {
                let spanned = e.span.clone().map(|s| &toml_text[s]).unwrap_or("");
                format!("{}: {} @ {spanned}", e.key, e.message)
            }
        };
        assert!(got.starts_with(expected), "got {got:?}, expected {expected:?}");
    }

    #[test]
    fn defaults() {
        check(
            "",
            |t| {
                format!(
                    "{:?} {} {} {:?} {} {:?}",
                    t.events.default,
                    t.mqtt.url,
                    t.mqtt.client_id,
                    t.mqtt.keepalive,
                    t.spool.max_bytes,
                    t.spool.max_age
                )
            },
            "LabelSettings { threshold: 0.6, off_threshold: 0.5, min_windows: 2, cooldown: 3s, require: Fused, enabled: true } mqtt://127.0.0.1:1883 mbt-edge-porch 30s 67108864 604800s",
        );
    }

    #[test]
    fn label_overrides_merge_with_defaults() {
        check(
            "[events]\nthreshold = 0.7\ncooldown = \"500ms\"\n[events.labels.\"dog bark\"]\nthreshold = 0.9\nrequire = \"both\"\n[events.labels.cat]\nenabled = false\n",
            |t| {
                let dog = &t.events.per_label["dog bark"];
                let cat = &t.events.per_label["cat"];
                format!(
                    "{} {} {:?} {:?} {} {}",
                    dog.threshold, dog.off_threshold, dog.cooldown, dog.require, cat.enabled, cat.off_threshold
                )
            },
            "0.9 0.8 500ms Both false 0.6",
        );
    }

    #[test]
    fn errors_name_the_key_and_span() {
        let none = |_: &Typed| String::new();
        check(
            "[events.labels.dog]\nthreshold = 1.5\n",
            none,
            "events.labels.dog.threshold: must be a score in 0..=1, got 1.5 @ 1.5",
        );
        check(
            "[events]\nthreshold = 0.5\noff_threshold = 0.7\n",
            none,
            "events.off_threshold: must be in 0..=threshold (0.5), got 0.7 @ 0.7",
        );
        check(
            "[events]\nrequire = \"all\"\n",
            none,
            "events.require: must be fused, both or either, got \"all\" @ \"all\"",
        );
        check("[events]\ncooldown = \"3 weeks\"\n", none, "events.cooldown: not a duration");
        check(
            "[mqtt]\nurl = \"http://x\"\n",
            none,
            "mqtt.url: expected mqtt://host[:port] or mqtts://host[:port], got \"http://x\" @ \"http://x\"",
        );
        check("[mqtt]\nqos = 2\n", none, "mqtt.qos: must be 0 or 1");
        check("[mqtt]\nca = \"/etc/hostname\"\n", none, "mqtt.ca: TLS files need an mqtts:// url");
        check("[mqtt]\ntopic_prefix = \"a/#\"\n", none, "mqtt.topic_prefix: must not contain MQTT wildcards");
        check("[spool]\nmax_bytes = \"12 parsecs\"\n", none, "spool.max_bytes: expected bytes");
        check("[mqtt]\nbogus = 1\n", none, ": unknown field `bogus`");
    }

    #[test]
    fn urls_and_sizes() {
        check("[mqtt]\nurl = \"mqtts://broker.lan\"\n", |t| t.mqtt.url.to_string(), "mqtts://broker.lan:8883");
        check("[mqtt]\nurl = \"mqtt://[::1]:1884\"\n", |t| t.mqtt.url.to_string(), "mqtt://[::1]:1884");
        check(
            "[spool]\nmax_bytes = \"1GiB\"\nmax_age = \"2h\"\n",
            |t| format!("{} {:?}", t.spool.max_bytes, t.spool.max_age),
            "1073741824 7200s",
        );
    }

    #[test]
    fn password_from_file_and_unknown_label() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let text = format!("[mqtt]\nusername = \"edge\"\npassword_file = {:?}\n", file.display().to_string());
        let typed = parse(&text).unwrap();
        assert_eq!(typed.mqtt.password.as_deref(), Some("s3cret"));

        let text = "[events.labels.unicorn]\nthreshold = 0.9\n";
        let file: File = toml::from_str(text).unwrap();
        let e = file.events.check_labels(&["dog".to_owned()]).unwrap_err();
        assert_eq!(e.key, "events.labels.unicorn");
        assert_eq!(&text[e.span.unwrap()], "unicorn");
    }
}

#[test]
fn every_duration_key_reads_the_same_notation() {
    // A bare "3" and a unit "d" were accepted by some keys and refused by others.
    let settings = check_ok(&format!("{BASE}\n[window]\nhop = \"3\"\n[events]\ncooldown = \"3\"\n"));
    assert_eq!(settings.window.hop, Duration::from_secs(3));
    assert_eq!(settings.events.default.cooldown, Duration::from_secs(3));
    let settings = check_ok(&format!("{BASE}\n[events]\ncooldown = \"1d\"\n[spool]\nmax_age = \"2d\"\n"));
    assert_eq!(settings.events.default.cooldown, Duration::from_secs(86_400));
    assert_eq!(settings.spool.max_age, Duration::from_secs(2 * 86_400));
    // "1d" is a duration for hop too; it is refused for its range, not its notation.
    check_err(&format!("{BASE}\n[window]\nhop = \"1d\"\n"), 6, "window.hop", "out of range");
}
