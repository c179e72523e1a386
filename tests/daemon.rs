//! The whole daemon as users run it: `mbt-edge run` on a config with a live test source, the
//! committed tiny model and a real mosquitto. Events, statuses and availability arrive on the
//! contract's topics; SIGTERM stops it cleanly (exit 0, open events ended, availability offline).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Broker, Subscriber, signal};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn write_config(dir: &Path, port: u16, extra: &str) -> PathBuf {
    let config = dir.join("config.toml");
    let text = format!(
        r#"
[device]
id = "testbox"

[model]
path = "{model}"
threads = 1

[window]
hop = 0.5

[[source]]
name = "yard"
kind = "test"
pattern = "ball"
wave = "sine"
fps = 15
width = 160
height = 120

[events]
threshold = 0.0
off_threshold = 0.0
min_windows = 1

[mqtt]
url = "mqtt://127.0.0.1:{port}"

[spool]
dir = "{spool}"
{extra}
"#,
        model = repo().join("models/testdata/mbt-tiny.onnx").display(),
        spool = dir.join("spool").display(),
    );
    std::fs::write(&config, text).unwrap();
    config
}

fn start_daemon(config: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_mbt-edge"))
        .args(["run", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(config.with_extension("log")).unwrap())
        .spawn()
        .unwrap()
}

#[test]
fn run_publishes_events_statuses_and_stops_cleanly_on_sigterm() {
    let broker = Broker::start("");
    let subscriber = Subscriber::start(broker.port, "mbt-edge/#");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), broker.port, "");
    let mut daemon = start_daemon(&config);
    let log = || std::fs::read_to_string(config.with_extension("log")).unwrap_or_default();

    subscriber.wait_for("a start event", Duration::from_secs(30), |messages| {
        messages.iter().any(|(topic, payload)| topic == "mbt-edge/testbox/yard/events" && payload.contains("\"start\""))
    });
    let messages = subscriber.messages();
    assert!(messages.contains(&("mbt-edge/testbox/availability".into(), "online".into())), "{messages:?}\n{}", log());
    assert!(messages.contains(&("mbt-edge/testbox/yard/status".into(), "online".into())), "{messages:?}");
    let start: Value =
        serde_json::from_str(&messages.iter().find(|(topic, _)| topic == "mbt-edge/testbox/yard/events").unwrap().1)
            .unwrap();
    assert_eq!(start["device"], "testbox");
    assert_eq!(start["source"], "yard");
    assert_eq!(start["model"]["name"], "mbt-tiny");
    assert_eq!(start["model"]["sha256"].as_str().map(str::len), Some(64));
    let model = mbt_edge::model::ModelInfo::read(&repo().join("models/testdata/mbt-tiny.onnx")).unwrap();
    let label = start["label"].as_str().unwrap_or_default().to_string();
    assert!(model.metadata.labels.contains(&label), "{start}");

    signal(&daemon, "TERM");
    let status = daemon.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{}", log());
    subscriber.wait_for("availability offline", Duration::from_secs(10), |messages| {
        messages.iter().any(|(topic, payload)| topic == "mbt-edge/testbox/availability" && payload == "offline")
    });
    // Every event that started has ended.
    let events: Vec<Value> = subscriber
        .messages()
        .iter()
        .filter(|(topic, _)| topic.ends_with("/events"))
        .map(|(_, payload)| serde_json::from_str(payload).unwrap())
        .collect();
    let started: std::collections::BTreeSet<&str> =
        events.iter().filter(|event| event["type"] == "start").map(|event| event["id"].as_str().unwrap()).collect();
    let ended: std::collections::BTreeSet<&str> =
        events.iter().filter(|event| event["type"] == "end").map(|event| event["id"].as_str().unwrap()).collect();
    assert_eq!(started, ended, "{events:#?}");
    let seqs: Vec<u64> = events.iter().map(|event| event["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|pair| pair[1] == pair[0] + 1), "seq has gaps: {seqs:?}");
}
