//! Acceptance: the daemon end to end as a user runs it (the built binary, the shipped demo
//! model, real GStreamer sources, a real mosquitto on a free loopback port, a generated
//! config), including the faults it must survive: a source pipeline that errors, a lost
//! microphone or camera, a broker outage, SIGKILL, and malformed configs and models.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Broker, ConfigParts, Daemon, Subscriber, free_port, http_get, metric, repo, schema_path, validate};
use serde_json::Value;
use time::format_description::well_known::Rfc3339;

fn demo_model() -> PathBuf {
    repo().join("models/avsynth-edge.onnx")
}

/// A config for the demo model: `sources` are `[[source]]` tables, `extra` goes at the end.
fn write_config(dir: &Path, broker: u16, sources: &str, extra: &str) -> PathBuf {
    let body = format!("{sources}\n{extra}");
    common::write_config(
        dir,
        ConfigParts { device: "box", model: demo_model(), hop: 1.0, broker, body: &body, spool: None },
    )
}

/// `[events]` as the bundled demo config has it.
const DEMO_EVENTS: &str = "[events]\nthreshold = 0.6\nmin_windows = 2\ncooldown = \"2s\"\n";

/// The `tour` source of the bundled config.toml: wheel_clicks, rings_tone, ball_buzz and
/// background, 10 s each, live.
fn tour_source() -> String {
    let config: toml::Value = toml::from_str(&std::fs::read_to_string(repo().join("config.toml")).unwrap()).unwrap();
    let tour =
        config["source"].as_array().unwrap().iter().find(|source| source["name"].as_str() == Some("tour")).unwrap();
    format!(
        "[[source]]\nname = \"tour\"\nkind = \"pipeline\"\nvideo_pipeline = {}\naudio_pipeline = {}\n",
        tour["video_pipeline"], tour["audio_pipeline"]
    )
}

/// `kind = "test"` playing ball_tone (a wavy orange ball and a 440 Hz sine).
fn ball_tone_source(name: &str) -> String {
    format!(
        r#"[[source]]
name = "{name}"
kind = "test"
pattern = "ball"
video_extra = "motion=wavy foreground-color=0xffffa020 background-color=0xff182848"
wave = "sine"
freq = 440.0
volume = 0.3
width = 160
height = 120
fps = 15
"#
    )
}

/// The event messages among `messages`, parsed.
fn events(messages: &[(String, String)]) -> Vec<Value> {
    messages
        .iter()
        .filter(|(topic, _)| topic.ends_with("/events"))
        .map(|(_, payload)| serde_json::from_str(payload).unwrap())
        .collect()
}

fn statuses(messages: &[(String, String)], source: &str) -> Vec<String> {
    messages
        .iter()
        .filter(|(topic, _)| topic == &format!("mbt-edge/box/{source}/status"))
        .map(|m| m.1.clone())
        .collect()
}

fn labels_of_starts(events: &[Value], source: &str) -> Vec<String> {
    events
        .iter()
        .filter(|event| event["source"] == source && event["type"] == "start")
        .map(|event| event["label"].as_str().unwrap().to_string())
        .collect()
}

/// The tour plays four demo classes in turn: each gets a `start` and an `end` with the
/// right label, in order, schema-valid, with a plausible latency.
#[test]
fn classes_played_in_sequence_give_start_and_end_events_with_the_right_labels() {
    let broker = Broker::start("");
    let subscriber = Subscriber::start(broker.port, "mbt-edge/#");
    let dir = tempfile::tempdir().unwrap();
    // min_windows 3: at the change from ball_buzz to background, two windows mixing the ball
    // with fading buzz are often ball_tone (a 1-s event in 19 of 87 tours of a 60-min soak);
    // every class played lasts about ten windows.
    let events_config = DEMO_EVENTS.replace("min_windows = 2", "min_windows = 3");
    let config = write_config(dir.path(), broker.port, &tour_source(), &events_config);
    let daemon = Daemon::start(&config, "run");
    let order = ["wheel_clicks", "rings_tone", "ball_buzz", "background"];
    subscriber.wait_for("the tour's four classes", Duration::from_secs(90), |messages| {
        let events = events(messages);
        let ended = |label: &str| events.iter().any(|event| event["label"] == label && event["type"] == "end");
        ended("ball_buzz") && labels_of_starts(&events, "tour").iter().any(|label| label == "background")
    });
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");

    let events = events(&subscriber.messages());
    let starts = labels_of_starts(&events, "tour");
    assert!(starts.iter().all(|label| order.contains(&label.as_str())), "unexpected labels: {starts:?}");
    // The four classes start in the order played (a class may start more than once).
    let mut next = 0;
    for label in &starts {
        if next < order.len() && label == order[next] {
            next += 1;
        }
    }
    assert_eq!(next, order.len(), "start labels {starts:?} do not follow {order:?}");
    // Every event that started ended (the last one when the daemon stopped), each with one start and one end.
    let mut by_id: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for event in &events {
        by_id.entry(event["id"].as_str().unwrap()).or_default().push(event["type"].as_str().unwrap());
    }
    for (id, kinds) in &by_id {
        assert_eq!(kinds.first(), Some(&"start"), "{id}: {kinds:?}");
        assert_eq!(kinds.last(), Some(&"end"), "{id}: {kinds:?}");
        assert_eq!(kinds.iter().filter(|kind| **kind == "end").count(), 1, "{id}: {kinds:?}");
    }
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(schema_path()).unwrap()).unwrap();
    for event in &events {
        assert_eq!(validate(&schema, event, "$"), Vec::<String>::new(), "{event}");
        assert!(event["degraded"].is_null(), "{event}");
        assert_eq!(event["replayed"], false, "{event}");
    }
    // From the window's end to publishing (features, inference, engine, spool fsync): a figure
    // to read in the test output, not a pass/fail (the schema above holds it to >= 0).
    let latencies: Vec<f64> = events.iter().filter_map(|event| event["latency_ms"].as_f64()).collect();
    assert_eq!(latencies.len(), events.len(), "every event carries latency_ms");
    eprintln!("event latency_ms: {latencies:?}");
}

/// `classify` on a clip made with gst-launch-1.0: every window of a ball_tone clip is ball_tone.
#[test]
fn classify_names_the_class_of_a_generated_clip() {
    let dir = tempfile::tempdir().unwrap();
    let clip = dir.path().join("ball_tone.webm");
    // 10 s: the yard scene of config.toml, VP8 + Opus at 48 kHz stereo.
    let status = Command::new("gst-launch-1.0")
        .args(["-q", "webmmux", "name=mux", "!", "filesink"])
        .arg(format!("location={}", clip.display()))
        .args(["videotestsrc", "num-buffers=150", "pattern=ball", "motion=wavy"])
        .args(["foreground-color=0xffffa020", "background-color=0xff182848"])
        .args(["!", "video/x-raw,width=160,height=120,framerate=15/1"])
        // At vp8enc's default bitrate the ball smears enough to fool the first window.
        .args(["!", "vp8enc", "deadline=1", "target-bitrate=2000000", "!", "queue"])
        .args(["!", "mux.", "audiotestsrc", "num-buffers=500", "samplesperbuffer=960", "wave=sine", "freq=440"])
        .args(["volume=0.3", "!", "audio/x-raw,rate=48000,channels=2", "!", "opusenc", "!", "queue", "!", "mux."])
        .status()
        .unwrap();
    assert!(status.success());
    let config = dir.path().join("classify.toml");
    std::fs::write(&config, format!("[model]\npath = \"{}\"\nthreads = 1\n", demo_model().display())).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_mbt-edge"))
        .args(["classify", "--top", "1", "--config"])
        .arg(&config)
        .arg("--input")
        .arg(&clip)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    let lines: Vec<Value> =
        String::from_utf8_lossy(&output.stdout).lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    // 2.56 s windows every 1 s over 10 s: starts 0..7.
    assert_eq!(lines.len(), 8, "{lines:#?}");
    let top: Vec<&str> = lines.iter().map(|line| line["top"][0]["label"].as_str().unwrap()).collect();
    assert!(top.iter().all(|label| *label == "ball_tone"), "{top:?}");
}

/// Two sources at once: each gets its own events and status; a source whose pipeline errors
/// mid-run goes offline, is restarted and comes back online while the other runs on untouched.
#[test]
fn a_failing_source_restarts_alone_and_two_sources_keep_their_own_events() {
    let broker = Broker::start("");
    let subscriber = Subscriber::start(broker.port, "mbt-edge/#");
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = free_port();
    // flaky: the gate scene (bar_beeps) whose video branch posts an error after 90 frames (6 s).
    let flaky = r#"[[source]]
name = "flaky"
kind = "pipeline"
video_pipeline = "videotestsrc is-live=true pattern=bar foreground-color=0xff40e0ff background-color=0xff202020 horizontal-speed=3 ! video/x-raw,width=160,height=120,framerate=15/1 ! identity error-after=90"
audio_pipeline = "audiotestsrc is-live=true wave=ticks freq=880 volume=0.4 sine-periods-per-tick=97 tick-interval=400000000 apply-tick-ramp=true ! audio/x-raw,rate=16000,channels=1"
"#;
    let sources = format!("{}\n{flaky}", ball_tone_source("steady"));
    let extra = format!("{DEMO_EVENTS}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n");
    let config = write_config(dir.path(), broker.port, &sources, &extra);
    let daemon = Daemon::start(&config, "run");
    subscriber.wait_for("flaky back online after its failure", Duration::from_secs(60), |messages| {
        let flaky = statuses(messages, "flaky");
        flaky
            .iter()
            .position(|status| status == "offline")
            .is_some_and(|offline| flaky[offline..].contains(&"online".to_string()))
    });
    subscriber.wait_for("events from both sources", Duration::from_secs(30), |messages| {
        let events = events(messages);
        ["steady", "flaky"].iter().all(|source| events.iter().any(|event| event["source"] == *source))
    });
    let (status, metrics) = http_get(metrics_port, "/metrics").unwrap();
    assert_eq!(status, 200);
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");

    let messages = subscriber.messages();
    // steady: online, and offline only when the daemon stopped.
    let steady = statuses(&messages, "steady");
    assert!(steady.len() <= 2 && steady[0] == "online" && steady[1..].iter().all(|s| s == "offline"), "{steady:?}");
    assert!(log.contains("source failed; restarting after backoff source=\"flaky\""), "{log}");
    assert!(!log.contains("source failed; restarting after backoff source=\"steady\""), "{log}");
    assert_eq!(metric(&metrics, "mbt_edge_source_restarts_total", r#"source="steady""#), Some(0.0), "{metrics}");
    assert!(metric(&metrics, "mbt_edge_source_restarts_total", r#"source="flaky""#) >= Some(1.0), "{metrics}");
    let events = events(&messages);
    for (source, label) in [("steady", "ball_tone"), ("flaky", "bar_beeps")] {
        let labels: BTreeSet<&str> = events
            .iter()
            .filter(|event| event["source"] == source)
            .map(|event| event["label"].as_str().unwrap())
            .collect();
        assert_eq!(labels, BTreeSet::from([label]), "{source}");
    }
}

/// A lost microphone (its stream ends at once while the camera goes on) and a lost camera:
/// status `degraded`, and events go on from the surviving sense, marked `degraded`. One sense
/// names only its category (ball -> ball_tone or ball_buzz; a sine -> ball_tone or rings_tone),
/// so this config lowers the threshold to what one sense reaches.
#[test]
fn a_lost_sense_gives_degraded_status_and_events_from_the_other_sense() {
    let broker = Broker::start("");
    let subscriber = Subscriber::start(broker.port, "mbt-edge/#");
    let dir = tempfile::tempdir().unwrap();
    let sources = r#"[[source]]
name = "mic_gone"
kind = "pipeline"
video_pipeline = "videotestsrc is-live=true pattern=ball motion=wavy foreground-color=0xffffa020 background-color=0xff182848 ! video/x-raw,width=160,height=120,framerate=15/1"
audio_pipeline = "audiotestsrc is-live=true num-buffers=1 ! audio/x-raw,rate=16000,channels=1"

[[source]]
name = "cam_gone"
kind = "pipeline"
video_pipeline = "videotestsrc is-live=true num-buffers=1 ! video/x-raw,width=160,height=120,framerate=15/1"
audio_pipeline = "audiotestsrc is-live=true wave=sine freq=440 volume=0.3 ! audio/x-raw,rate=16000,channels=1"
"#;
    let extra = "[events]\nthreshold = 0.3\noff_threshold = 0.2\nmin_windows = 1\n";
    let config = write_config(dir.path(), broker.port, sources, extra);
    let daemon = Daemon::start(&config, "run");
    // Events from the first windows; the status turns `degraded` once the stream has been
    // gone for `stall_timeout` (5 s).
    subscriber.wait_for("events and degraded statuses from both sources", Duration::from_secs(40), |messages| {
        let events = events(messages);
        ["mic_gone", "cam_gone"].iter().all(|source| {
            events.iter().any(|event| event["source"] == *source)
                && statuses(messages, source).iter().any(|status| status == "degraded")
        })
    });
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    let messages = subscriber.messages();
    for source in ["mic_gone", "cam_gone"] {
        assert!(statuses(&messages, source).contains(&"degraded".to_string()), "{source}: {messages:?}");
    }
    for event in events(&messages).iter().filter(|event| event["type"] == "start") {
        let label = event["label"].as_str().unwrap();
        match event["source"].as_str().unwrap() {
            "mic_gone" => {
                assert_eq!(event["degraded"], "audio_lost", "{event}");
                assert!(label.starts_with("ball_"), "the camera sees a ball: {event}");
                assert!(event["scores"]["audio"].is_null(), "{event}");
            }
            _ => {
                assert_eq!(event["degraded"], "video_lost", "{event}");
                assert!(label.ends_with("_tone"), "the microphone hears a sine: {event}");
                assert!(event["scores"]["video"].is_null(), "{event}");
            }
        }
    }
}

/// The broker goes away for 15 s, then the daemon is SIGKILLed while events wait in its spool,
/// then both come back: every event seq from 1 on reaches a subscriber, the ones from the
/// outage marked `replayed`, and the restarted daemon's seqs continue after the old ones.
#[test]
fn broker_outage_and_sigkill_lose_no_event_and_seq_continues() {
    let mut broker = Broker::start("");
    let first = Subscriber::start(broker.port, "mbt-edge/+/+/events");
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), broker.port, &tour_source(), DEMO_EVENTS);
    let mut daemon = Daemon::start(&config, "first");
    first.wait_for("a first event", Duration::from_secs(40), |messages| !messages.is_empty());
    broker.stop();
    // The tour changes class every 10 s: events keep coming while the broker is down.
    let spool_dir = dir.path().join("spool");
    let log_has_spooled = |daemon: &Daemon| daemon.log().matches("broker unreachable").count() > 0;
    std::thread::sleep(Duration::from_secs(15));
    assert!(log_has_spooled(&daemon), "{}", daemon.log());
    daemon.child.kill().unwrap();
    daemon.child.wait().unwrap();
    let first_log = daemon.log();
    drop(daemon);
    assert!(std::fs::read_dir(&spool_dir).unwrap().count() > 0);

    broker.resume();
    let second = Subscriber::start(broker.port, "mbt-edge/+/+/events");
    let daemon = Daemon::start(&config, "second");
    // Replayed ones plus at least one fresh event from the restarted daemon.
    second.wait_for("replayed and fresh events", Duration::from_secs(60), |messages| {
        let events = events(messages);
        events.iter().any(|event| event["replayed"] == true) && events.iter().any(|event| event["replayed"] == false)
    });
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");

    let mut all = events(&first.messages());
    all.extend(events(&second.messages()));
    let seqs: BTreeSet<u64> = all.iter().map(|event| event["seq"].as_u64().unwrap()).collect();
    let max = *seqs.iter().max().unwrap();
    let missing: Vec<u64> = (1..=max).filter(|seq| !seqs.contains(seq)).collect();
    assert!(missing.is_empty(), "lost seqs {missing:?}\nfirst daemon:\n{first_log}\nsecond:\n{log}");
    let replayed: Vec<u64> =
        all.iter().filter(|event| event["replayed"] == true).map(|event| event["seq"].as_u64().unwrap()).collect();
    let fresh_second: Vec<u64> = events(&second.messages())
        .iter()
        .filter(|event| event["replayed"] == false)
        .map(|event| event["seq"].as_u64().unwrap())
        .collect();
    assert!(!replayed.is_empty());
    assert!(
        fresh_second.iter().min() > replayed.iter().max(),
        "the restarted daemon's seqs continue after the spooled ones: replayed {replayed:?}, fresh {fresh_second:?}"
    );
}

/// Malformed configs and broken models: exit 78 with the file, line and key (or the model file
/// and what is wrong), never a panic or a backtrace.
#[test]
fn malformed_configs_and_models_exit_78_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model();
    let truncated = dir.path().join("truncated.onnx");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let garbage = dir.path().join("garbage.onnx");
    std::fs::write(&garbage, b"this is not an ONNX file\n").unwrap();
    // One byte flipped in the weights (the file's second half is initializer data), beside
    // the export's .sha256: it still parses, so only the hash can tell.
    let rotted = dir.path().join("rotted.onnx");
    let mut flipped = bytes.clone();
    let middle = flipped.len() * 3 / 4;
    flipped[middle] ^= 0x01;
    std::fs::write(&rotted, &flipped).unwrap();
    let sidecar = format!("{}.sha256", model.display());
    std::fs::copy(&sidecar, dir.path().join("rotted.onnx.sha256")).unwrap();
    let expected_sha = std::fs::read_to_string(&sidecar).unwrap().split_whitespace().next().unwrap().to_owned();
    let rotted_needle = format!("says {expected_sha}");
    let base = |model: &Path| format!("[model]\npath = \"{}\"\n", model.display());
    let ok = base(&model);
    let test_source = "[[source]]\nname = \"cam\"\nkind = \"test\"\n";
    // (config text, what the message must contain)
    let cases: Vec<(String, &str)> = vec![
        (format!("{ok}\n[windw]\nhop = 1\n"), "config.toml:4:2: key `windw`: unknown key"),
        (format!("{ok}thread = 2\n"), "config.toml:3:1: key `model.thread`: unknown key"),
        (format!("{ok}threads = \"two\"\n"), "config.toml:3:11: key `model.threads`: invalid type"),
        (format!("{ok}threads = 0\n"), "config.toml:3:11: key `model.threads`"),
        (format!("{ok}\n[window]\nhop = \"1 fortnight\"\n"), "config.toml:5:7: key `window.hop`"),
        (format!("{ok}\n[window]\nhop = -1\n"), "config.toml:5:7: key `window.hop`"),
        (format!("{ok}\n[window]\nseconds = 2.0\n"), "key `window.seconds`: 2s differs from the model's window"),
        (format!("{ok}\n[[source]]\nkind = \"test\"\n"), "key `source[0].name`"),
        (format!("{ok}\n[[source]]\nname = \"cam\"\nkind = \"webcam\"\n"), "key `source[0].kind`: unknown kind"),
        (format!("{ok}\n[[source]]\nname = \"cam\"\nkind = \"v4l2\"\n"), "key `source[0].video_device`"),
        (format!("{ok}\n{test_source}\n{test_source}"), "duplicate source name"),
        (format!("{ok}\n[[source]]\nname = \"front/door\"\nkind = \"test\"\n"), "key `source[0].name`"),
        (format!("{ok}\n{test_source}patern = \"ball\"\n"), "key `source[0].patern`: unknown key"),
        ("[model\npath = \"x.onnx\"\n".to_string(), "config.toml:1:"),
        (format!("{ok}\n[events]\nthreshold = 1.5\n"), "key `events.threshold`"),
        (format!("{ok}\n[events]\nthreshold = 0.5\noff_threshold = 0.7\n"), "key `events.off_threshold`"),
        (format!("{ok}\n[events.labels.\"barking\"]\nthreshold = 0.5\n"), "barking"),
        (format!("{ok}\n[mqtt]\nurl = \"http://127.0.0.1\"\n"), "key `mqtt.url`"),
        (format!("{ok}\n[mqtt]\nqos = 2\n"), "key `mqtt.qos`"),
        (format!("{ok}\n[metrics]\nlisten = \"localhost\"\n"), "key `metrics.listen`"),
        ("[model]\npath = \"/nonexistent/model.onnx\"\n".to_string(), "key `model.path`"),
        (base(&truncated), "truncated.onnx"),
        (base(&garbage), "garbage.onnx"),
        (base(&rotted), &rotted_needle),
    ];
    for (idx, (text, needle)) in cases.iter().enumerate() {
        let config = dir.path().join("config.toml");
        std::fs::write(&config, text).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_mbt-edge"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        let case = format!("case {idx}:\n{text}\n--- stderr:\n{stderr}");
        assert_eq!(output.status.code(), Some(78), "{case}");
        assert!(stderr.contains(needle), "expected {needle:?}; {case}");
        assert!(stderr.contains("config.toml") || stderr.contains(".onnx"), "{case}");
        assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{case}");
        assert!(stderr.lines().count() <= 3, "one clear message, not a dump: {case}");
    }
}

/// The spool's disk fills while the broker is down (a 256 KiB tmpfs the test mounts; CI runs
/// as root): events keep their seq, held in memory, `/health` says `spool_unwritable`; once
/// the disk has room again and the broker is back, every event arrives, seq without a gap,
/// and every `end` after its `start`.
#[test]
fn a_full_spool_disk_while_the_broker_is_down_loses_no_event_and_health_says_so() {
    // A persistent session kept across the broker's restart: the replay may come before
    // mosquitto_sub reconnects (it lost every replayed event that way once in CI).
    let mut broker = Broker::start("persistence true\npersistence_location {dir}/\n");
    let subscriber = Subscriber::start_persistent(broker.port, "mbt-edge/+/+/events", "spool-disk-test");
    let dir = tempfile::tempdir().unwrap();
    let disk = common::TinyDisk::mount("256k");
    let spool = disk.path().join("spool");
    let port = free_port();
    // Evidence off the tiny disk: this test is about the spool (the next one fills evidence's).
    let body = format!(
        "{}\n{DEMO_EVENTS}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[evidence]\ndir = \"{}\"\n",
        tour_source(),
        dir.path().join("evidence").display()
    );
    let parts = ConfigParts {
        device: "box",
        model: demo_model(),
        hop: 1.0,
        broker: broker.port,
        body: &body,
        spool: Some(&spool),
    };
    let config = common::write_config(dir.path(), parts);
    let daemon = Daemon::start(&config, "run");
    subscriber.wait_for("a first event", Duration::from_secs(40), |messages| !messages.is_empty());

    broker.stop();
    let filler = disk.fill();
    let health = || http_get(port, "/health").unwrap_or((0, String::new()));
    let held = || {
        http_get(port, "/metrics")
            .ok()
            .and_then(|(_, body)| metric(&body, "mbt_edge_spool_unwritten_events", ""))
            .unwrap_or(0.0)
    };
    // The tour changes class every 10 s: events come while the disk is full.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while held() < 1.0 {
        assert!(std::time::Instant::now() < deadline, "no events held in memory; {}", daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // The health thread judges once a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while health().0 == 200 {
        assert!(std::time::Instant::now() < deadline, "/health stays ok while the spool cannot write");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (status, body) = health();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("spool_unwritable"), "{body}");

    std::fs::remove_file(filler).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while held() > 0.0 || health().0 != 200 {
        assert!(std::time::Instant::now() < deadline, "held events not written back: {:?}; {}", health(), daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    broker.resume();
    let spooled = || {
        http_get(port, "/metrics").ok().and_then(|(_, body)| metric(&body, "mbt_edge_spool_events", "")).unwrap_or(1.0)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while spooled() > 0.0 {
        assert!(std::time::Instant::now() < deadline, "spool not drained; {}", daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // Every event started so far reaches the subscriber: the seq check below cannot see a
    // lost tail.
    let (_, body) = http_get(port, "/metrics").unwrap();
    let started_total: f64 = body
        .lines()
        .filter(|line| line.starts_with("mbt_edge_events_total{"))
        .filter_map(|line| line.rsplit_once(' ').and_then(|(_, value)| value.parse::<f64>().ok()))
        .sum();
    assert!(started_total >= 2.0, "{body}");
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
    assert!(log.contains("spool cannot write") && log.contains("spool writable again"), "{log}");
    subscriber.wait_for("every started event", Duration::from_secs(10), |messages| {
        events(messages).iter().filter(|event| event["type"] == "start").count() as f64 >= started_total
    });

    let all = events(&subscriber.messages());
    let seqs: BTreeSet<u64> = all.iter().map(|event| event["seq"].as_u64().unwrap()).collect();
    let max = *seqs.iter().max().unwrap();
    let missing: Vec<u64> = (1..=max).filter(|seq| !seqs.contains(seq)).collect();
    assert!(missing.is_empty(), "lost seqs {missing:?}\n{log}");
    let started: BTreeSet<&str> =
        all.iter().filter(|event| event["type"] == "start").map(|event| event["id"].as_str().unwrap()).collect();
    for end in all.iter().filter(|event| event["type"] == "end") {
        assert!(started.contains(end["id"].as_str().unwrap()), "an end without its start: {end}");
    }
    assert!(all.iter().any(|event| event["replayed"] == true), "events waited out the outage");
}

/// The tour's rings_tone (a tinted zone plate and a 660 Hz sine): its `start` carries a
/// snapshot (a JPEG at the configured width that is not black, retained on MQTT, served over
/// HTTP), its `end` a clip that gst-discoverer reads as WebM with video and audio, as long as
/// pre_roll + the event + post_roll, whose audio peaks at 660 Hz. Old files beyond max_bytes
/// are deleted oldest first, and each deletion is counted in /metrics and the stats message.
#[test]
fn an_event_gets_a_snapshot_and_a_clip_with_its_sound_and_retention_counts_what_it_deletes() {
    let broker = Broker::start("");
    let subscriber = Subscriber::start(broker.port, "mbt-edge/#");
    let dir = tempfile::tempdir().unwrap();
    let evidence = dir.path().join("evidence");
    // 1.8 MB of old files (an hour old, oldest first) against a 1 MiB limit.
    let old = evidence.join("old");
    std::fs::create_dir_all(&old).unwrap();
    for idx in 0..6u64 {
        let path = old.join(format!("{idx}.jpg"));
        std::fs::write(&path, vec![0u8; 300_000]).unwrap();
        let at = std::time::SystemTime::now() - Duration::from_secs(3600 - idx);
        std::fs::File::options().write(true).open(&path).unwrap().set_modified(at).unwrap();
    }
    let port = free_port();
    let body = format!(
        "{}\n{DEMO_EVENTS}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[evidence]\ndir = \"evidence\"\n\
         pre_roll = 3\npost_roll = 2\nsnapshot_width = 96\nmax_bytes = \"1MiB\"\n",
        tour_source()
    );
    let config = write_config(dir.path(), broker.port, "", &body);
    // Home Assistant discovery on, for the image entity.
    let text = std::fs::read_to_string(&config).unwrap().replace("[mqtt]\n", "[mqtt]\nhome_assistant = true\n");
    std::fs::write(&config, text).unwrap();
    let daemon = Daemon::start(&config, "run");
    let clip_of = |messages: &[(String, String)], id: &str| {
        messages
            .iter()
            .filter(|(topic, _)| topic == "mbt-edge/box/tour/clip")
            .filter_map(|(_, payload)| serde_json::from_str::<Value>(payload).ok())
            .find(|clip| clip["event_id"] == id)
    };
    let rings_end = |messages: &[(String, String)]| {
        events(messages).into_iter().find(|event| event["label"] == "rings_tone" && event["type"] == "end")
    };
    subscriber.wait_for("rings_tone's clip", Duration::from_secs(120), |messages| {
        rings_end(messages).is_some_and(|end| clip_of(messages, end["id"].as_str().unwrap()).is_some())
    });
    let messages = subscriber.messages();
    let end = rings_end(&messages).unwrap();
    let id = end["id"].as_str().unwrap().to_string();
    let start = events(&messages).into_iter().find(|event| event["id"] == id.as_str() && event["type"] == "start");
    let start = start.expect("the start of the event");
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(schema_path()).unwrap()).unwrap();
    for event in [&start, &end] {
        assert_eq!(validate(&schema, event, "$"), Vec::<String>::new(), "{event}");
    }

    // The snapshot: a 96 x 72 JPEG (the tour is 160 x 120), not black.
    assert_eq!(start["evidence"]["snapshot"], format!("tour/{id}.jpg"), "{start}");
    assert_eq!(start["evidence"]["snapshot_url"], format!("/api/events/{id}/snapshot.jpg"));
    assert!(start["evidence"]["error"].is_null(), "{start}");
    let snapshot = evidence.join(format!("tour/{id}.jpg"));
    let report = common::discover(&snapshot);
    assert!(report.contains("Width: 96") && report.contains("Height: 72"), "{report}");
    let gray =
        common::decode(&snapshot, "video/x-raw,format=GRAY8,width=96,height=72", &dir.path().join("gray.raw"), false);
    assert_eq!(gray.len(), 96 * 72);
    let mean = gray.iter().map(|v| f64::from(*v)).sum::<f64>() / gray.len() as f64;
    let bright = gray.iter().filter(|v| **v > 60).count();
    assert!(mean > 40.0 && bright > gray.len() / 4, "a black snapshot: mean {mean}, {bright} bright pixels");
    // Served over HTTP with the same bytes.
    let jpeg = std::fs::read(&snapshot).unwrap();
    let (status, served) = common::http_get_bytes(port, &format!("/api/events/{id}/snapshot.jpg")).unwrap();
    assert_eq!(status, 200);
    assert_eq!(served, jpeg);
    // Retained on MQTT: a subscriber that comes later gets the latest start's JPEG.
    let retained = |topic: &str| {
        let output = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-t", topic, "-C", "1", "-W", "5", "-N"])
            .output()
            .unwrap();
        output.stdout
    };
    let jpeg_retained = retained("mbt-edge/box/tour/snapshot");
    assert!(jpeg_retained.starts_with(&[0xff, 0xd8]), "a retained JPEG ({} bytes)", jpeg_retained.len());
    let discovery: Value = serde_json::from_slice(&retained("homeassistant/image/box/tour_snapshot/config"))
        .expect("the image entity's retained discovery");
    assert_eq!(discovery["image_topic"], "mbt-edge/box/tour/snapshot");
    assert_eq!(discovery["content_type"], "image/jpeg");

    // The clip: WebM with VP8 and Opus, pre_roll + the event + post_roll long.
    assert_eq!(end["evidence"]["clip"], format!("tour/{id}.webm"), "{end}");
    assert_eq!(end["evidence"]["snapshot"], start["evidence"]["snapshot"], "end carries the snapshot on");
    let clip_message = clip_of(&messages, &id).unwrap();
    assert!(clip_message["error"].is_null(), "{clip_message}");
    let clip = evidence.join(format!("tour/{id}.webm"));
    let report = common::discover(&clip);
    assert!(report.contains("container #0: WebM") || report.contains("WebM"), "{report}");
    assert!(report.contains("video #") && report.contains("VP8"), "{report}");
    assert!(report.contains("audio #") && report.contains("Opus"), "{report}");
    let time = |value: &Value| time::OffsetDateTime::parse(value.as_str().unwrap(), &Rfc3339).unwrap();
    let event_seconds = (time(&end["end_time"]) - time(&end["start_time"])).as_seconds_f64();
    let expected = 3.0 + event_seconds + 2.0;
    let seconds = common::discovered_seconds(&report);
    assert!((seconds - expected).abs() <= 0.5, "clip {seconds} s, expected {expected} s\n{report}");
    let (status, served) = common::http_get_bytes(port, &format!("/api/events/{id}/clip.webm")).unwrap();
    assert_eq!((status, served.len() as u64), (200, std::fs::metadata(&clip).unwrap().len()));
    // The sound of the event: the middle second of it peaks at the tour's 660 Hz.
    let raw =
        common::decode(&clip, "audio/x-raw,format=F32LE,channels=1,rate=16000", &dir.path().join("clip.raw"), true);
    let samples: Vec<f32> = raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let middle = ((3.0 + event_seconds / 2.0) * 16_000.0) as usize;
    let peak = common::spectral_peak(&samples[middle - 8000..middle + 8000], 16_000.0);
    assert!((peak - 660.0).abs() <= 10.0, "the clip's audio peaks at {peak} Hz, not 660 Hz");

    // Retention: the oldest files went first and the folder is within max_bytes again.
    let files: Vec<PathBuf> = std::fs::read_dir(&evidence)
        .unwrap()
        .flat_map(|folder| std::fs::read_dir(folder.unwrap().path()).unwrap())
        .map(|entry| entry.unwrap().path())
        .filter(|path| !path.file_name().unwrap().to_str().unwrap().ends_with(".part"))
        .collect();
    let total: u64 = files.iter().map(|path| std::fs::metadata(path).unwrap().len()).sum();
    assert!(total <= 1 << 20, "{total} bytes kept: {files:?}");
    assert!(!old.join("0.jpg").exists() && !old.join("1.jpg").exists(), "the oldest went first: {files:?}");
    assert!(snapshot.exists() && clip.exists());
    let metrics = http_get(port, "/metrics").unwrap().1;
    let written = metric(&metrics, "mbt_edge_evidence_written_total", "kind=\"snapshot\"").unwrap()
        + metric(&metrics, "mbt_edge_evidence_written_total", "kind=\"clip\"").unwrap();
    let deleted = metric(&metrics, "mbt_edge_evidence_deleted_total", "").unwrap();
    // Every file that was there or written and is gone was deleted and counted (a clip may
    // be written between the listing and the scrape: at most one more).
    let gone = 6.0 + written - files.len() as f64;
    assert!(deleted >= 3.0 && (deleted - gone).abs() <= 1.0, "deleted {deleted}, gone {gone}\n{metrics}");
    assert_eq!(metric(&metrics, "mbt_edge_evidence_failed_total", ""), Some(0.0), "{metrics}");
    subscriber.wait_for("the stats message counting the deletions", Duration::from_secs(40), |messages| {
        messages.iter().filter(|(topic, _)| topic == "mbt-edge/box/stats").any(|(_, payload)| {
            serde_json::from_str::<Value>(payload)
                .is_ok_and(|stats| stats["runtime"]["evidence"]["deleted"].as_f64().is_some_and(|n| n >= 3.0))
        })
    });
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
}

/// Evidence on a disk that is full: events still go out at once, each flagged with why it
/// has no snapshot, and the failure is counted.
#[test]
fn a_full_evidence_disk_never_holds_up_an_event_it_goes_out_flagged() {
    let broker = Broker::start("");
    let subscriber = Subscriber::start(broker.port, "mbt-edge/+/+/events");
    let dir = tempfile::tempdir().unwrap();
    let disk = common::TinyDisk::mount("64k");
    let _filler = disk.fill();
    let port = free_port();
    let body = format!(
        "{}\n{DEMO_EVENTS}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n\n[evidence]\ndir = \"{}\"\n",
        ball_tone_source("yard"),
        disk.path().display()
    );
    let config = write_config(dir.path(), broker.port, "", &body);
    let daemon = Daemon::start(&config, "run");
    subscriber.wait_for("a start", Duration::from_secs(60), |messages| {
        events(messages).iter().any(|event| event["type"] == "start")
    });
    let start = events(&subscriber.messages()).into_iter().find(|event| event["type"] == "start").unwrap();
    assert_eq!(start["label"], "ball_tone", "{start}");
    assert!(start["evidence"]["snapshot"].is_null(), "{start}");
    let error = start["evidence"]["error"].as_str().unwrap_or_default();
    assert!(error.starts_with("snapshot: cannot write") && error.contains("space"), "{start}");
    let metrics = http_get(port, "/metrics").unwrap().1;
    assert!(metric(&metrics, "mbt_edge_evidence_failed_total", "").unwrap() >= 1.0, "{metrics}");
    let (code, log) = daemon.stop();
    assert_eq!(code, Some(0), "{log}");
}
