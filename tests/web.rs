//! The HTTP side against the running daemon: the live page in a real headless Chromium
//! (driven over WebDriver by Debian's chromedriver), `/metrics` read by the Prometheus
//! project's own text parser (`prometheus_client` in `$MBT_PYTHON`), and `/health` beside
//! clients that trickle bytes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Broker, Daemon, free_port, http_get, repo};
use serde_json::{Value, json};

/// The bundled config.toml (three sources: yard, gate, tour) with the broker at `broker`,
/// the spool under `dir` and the HTTP server on `http`.
fn demo_config(dir: &Path, broker: u16, http: u16) -> PathBuf {
    let text = std::fs::read_to_string(repo().join("config.toml")).unwrap();
    let model = repo().join("models/avsynth-edge.onnx");
    let replaced = text
        .replace("path = \"models/avsynth-edge.onnx\"", &format!("path = {:?}", model.display().to_string()))
        .replace("url = \"mqtt://127.0.0.1:1883\"", &format!("url = \"mqtt://127.0.0.1:{broker}\""))
        .replace("dir = \"target/demo/spool\"", &format!("dir = {:?}", dir.join("spool").display().to_string()));
    assert_ne!(replaced, text, "config.toml changed shape: update demo_config");
    let config = dir.join("config.toml");
    std::fs::write(&config, format!("{replaced}\n[metrics]\nlisten = \"127.0.0.1:{http}\"\n")).unwrap();
    config
}

/// One daemon with three live sources (and a browser) at a time: two beside each other
/// overload two cores.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn turn() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The daemon on the bundled config with its broker and HTTP port.
struct Demo {
    _broker: Broker,
    _dir: tempfile::TempDir,
    http: u16,
    daemon: Daemon,
}

impl Demo {
    fn start() -> Demo {
        let broker = Broker::start("");
        let dir = tempfile::tempdir().unwrap();
        let http = free_port();
        let daemon = Daemon::start(&demo_config(dir.path(), broker.port, http), "run");
        wait_for_http(http, &daemon);
        Demo { _broker: broker, _dir: dir, http, daemon }
    }
}

fn wait_for_http(http: u16, daemon: &Daemon) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while http_get(http, "/health").is_err() {
        assert!(Instant::now() < deadline, "the HTTP server never answered; log:\n{}", daemon.log());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// One HTTP/1.1 exchange with chromedriver: `method path` with a JSON body; the JSON answer.
fn webdriver(port: u16, method: &str, path: &str, body: Option<&Value>) -> Value {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("chromedriver listens");
    stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    // chromedriver may keep the socket open after its answer: read by Content-Length.
    let mut answer = Vec::new();
    let mut buffer = [0u8; 16 * 1024];
    let json = loop {
        let read =
            stream.read(&mut buffer).unwrap_or_else(|err| panic!("chromedriver did not answer {method} {path}: {err}"));
        answer.extend_from_slice(&buffer[..read]);
        let text = String::from_utf8_lossy(&answer);
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|line| line.to_ascii_lowercase().strip_prefix("content-length:").map(|n| n.trim().to_owned()))
                .and_then(|n| n.parse::<usize>().ok());
            if length.is_none_or(|length| body.len() >= length) && (length.is_some() || read == 0) {
                break body.to_owned();
            }
        }
        assert!(read > 0, "chromedriver closed before answering {method} {path}: {text:?}");
    };
    serde_json::from_str(&json).unwrap_or_else(|err| panic!("chromedriver: {err}: {json:?}"))
}

/// Debian's chromedriver on a free loopback port, with a Chromium session: headless, no
/// network beyond loopback (no background requests), a fresh profile.
struct Browser {
    driver: Child,
    port: u16,
    session: String,
    _profile: tempfile::TempDir,
    _logs: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        let port = free_port();
        let logs = tempfile::tempdir().unwrap();
        let log = logs.path().join("chromedriver.log");
        let driver = Command::new("chromedriver")
            .args([format!("--port={port}"), format!("--log-path={}", log.display())])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian chromium-driver, installed by scripts/install-deps.sh)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not listen");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1500",
        ];
        let mut args: Vec<String> = args.iter().map(|arg| arg.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let capabilities = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
        }}});
        let answer = std::panic::catch_unwind(|| webdriver(port, "POST", "/session", Some(&capabilities)));
        let log_tail = || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
        };
        let answer =
            answer.unwrap_or_else(|_| panic!("no WebDriver session; chromedriver's log ends:\n{}", log_tail()));
        let session = answer["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {answer}\nchromedriver's log ends:\n{}", log_tail()))
            .to_owned();
        Browser { driver, port, session, _profile: profile, _logs: logs }
    }

    fn command(&self, method: &str, command: &str, body: Option<&Value>) -> Value {
        let answer = webdriver(self.port, method, &format!("/session/{}/{command}", self.session), body);
        answer["value"].clone()
    }

    fn open(&self, url: &str) {
        self.command("POST", "url", Some(&json!({ "url": url })));
    }

    /// Runs `script` (a function body) in the page and returns what it returns.
    fn run(&self, script: &str) -> Value {
        self.command("POST", "execute/sync", Some(&json!({ "script": script, "args": [] })))
    }

    fn screenshot(&self, path: &Path) {
        use base64::Engine as _;
        let png = self.command("GET", "screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().expect("a base64 PNG")).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(path, bytes).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = webdriver(self.port, "DELETE", &format!("/session/{}", self.session), None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// What the page shows, read from its DOM.
const READ_PAGE: &str = r##"
const cards = [...document.querySelectorAll("article.source")].map((card) => ({
  name: card.dataset.source,
  status: card.dataset.status || "",
  points: Number(card.dataset.points),
  legend: [...card.querySelectorAll(".legend li[data-label]")].map((item) => item.textContent),
  meter: card.querySelector(".meter-value").textContent,
}));
const events = [...document.querySelectorAll("#events tbody tr")].map((row) => ({
  id: row.dataset.eventId,
  type: row.dataset.type,
  cells: [...row.cells].map((cell) => cell.textContent),
  snapshot: (() => {
    const image = row.querySelector("td.evidence img");
    return image ? { loaded: image.complete && image.naturalWidth > 0, width: image.naturalWidth,
                     src: image.getAttribute("src") } : null;
  })(),
}));
return { cards, events, connection: document.querySelector("#connection").textContent,
         device: document.querySelector("#device").textContent };
"##;

/// The page on the demo config: all three sources with their status, score charts that
/// receive new points, a legend with thresholds, a sound level, and the `start` of yard's
/// ball_tone in the events list with its snapshot loaded by the browser (the camera's
/// 160 px). Saves the screenshot as target/web-page.png.
#[test]
fn the_live_page_shows_sources_scores_and_events_in_chromium() {
    let _turn = turn();
    let demo = Demo::start();
    let http = demo.http;
    let browser = Browser::start();
    browser.open(&format!("http://127.0.0.1:{http}/"));

    let deadline = Instant::now() + Duration::from_secs(90);
    let mut first_points: Option<Value> = None;
    let page = loop {
        let page = browser.run(READ_PAGE);
        let cards = page["cards"].as_array().cloned().unwrap_or_default();
        let points: Value = cards
            .iter()
            .map(|card| (card["name"].as_str().unwrap_or("").to_owned(), card["points"].clone()))
            .collect::<serde_json::Map<_, _>>()
            .into();
        let first = first_points.get_or_insert_with(|| points.clone()).clone();
        let names: Vec<&str> = cards.iter().filter_map(|card| card["name"].as_str()).collect();
        let grew = cards.len() == 3
            && cards.iter().all(|card| {
                let name = card["name"].as_str().unwrap_or("");
                card["points"].as_u64().unwrap_or(0) >= first[name].as_u64().unwrap_or(0) + 3
            });
        let yard_started = page["events"].as_array().is_some_and(|events| {
            events.iter().any(|event| {
                event["cells"][0] == "yard" && event["cells"][1] == "ball_tone" && event["snapshot"]["loaded"] == true
            })
        });
        let legends = cards.iter().all(|card| card["legend"].as_array().is_some_and(|legend| !legend.is_empty()));
        if names.len() == 3 && grew && yard_started && legends && page["connection"] == "live" {
            break page;
        }
        assert!(Instant::now() < deadline, "the page never showed it all: {page:#}\nlog:\n{}", demo.daemon.log());
        std::thread::sleep(Duration::from_millis(500));
    };
    let screenshot = repo().join("target/web-page.png");
    browser.screenshot(&screenshot);

    let cards = page["cards"].as_array().unwrap();
    let mut names: Vec<&str> = cards.iter().map(|card| card["name"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["gate", "tour", "yard"]);
    assert!(
        cards.iter().all(|card| ["online", "degraded", "offline"].contains(&card["status"].as_str().unwrap())),
        "{page:#}"
    );
    let yard = cards.iter().find(|card| card["name"] == "yard").unwrap();
    assert_eq!(yard["status"], "online", "{page:#}");
    assert!(
        yard["legend"]
            .as_array()
            .unwrap()
            .iter()
            .any(|item| item.as_str().unwrap().contains("ball_tone (threshold 0.60")),
        "{page:#}"
    );
    assert!(yard["meter"].as_str().unwrap().ends_with(" dBFS") && yard["meter"] != "– dBFS", "{page:#}");
    assert!(page["device"].as_str().is_some_and(|device| !device.is_empty()), "{page:#}");
    let events = page["events"].as_array().unwrap();
    let ball = events.iter().find(|event| event["cells"][0] == "yard" && event["cells"][1] == "ball_tone").unwrap();
    assert_eq!(ball["snapshot"]["width"], 160, "{page:#}");
    let src = ball["snapshot"]["src"].as_str().unwrap();
    assert!(src.ends_with(&format!("/api/events/{}/snapshot.jpg", ball["id"].as_str().unwrap())), "{page:#}");
    let (code, log) = demo.daemon.stop();
    assert_eq!(code, Some(0), "{log}");
}

/// Every metric name of the hand-written exporter this one replaced, and the evidence ones.
const METRIC_NAMES: &[(&str, &str)] = &[
    ("mbt_edge_source_video_fps", "gauge"),
    ("mbt_edge_source_audio_rate_hz", "gauge"),
    ("mbt_edge_source_av_skew_seconds", "gauge"),
    ("mbt_edge_windows_built", "counter"),
    ("mbt_edge_windows_dropped", "counter"),
    ("mbt_edge_source_restarts", "counter"),
    ("mbt_edge_inference_latency_seconds", "histogram"),
    ("mbt_edge_inference_queue_depth", "gauge"),
    ("mbt_edge_inference_queue_capacity", "gauge"),
    ("mbt_edge_events", "counter"),
    ("mbt_edge_mqtt_connected", "gauge"),
    ("mbt_edge_spool_events", "gauge"),
    ("mbt_edge_spool_bytes", "gauge"),
    ("mbt_edge_spool_unwritable", "gauge"),
    ("mbt_edge_spool_unwritten_events", "gauge"),
    ("mbt_edge_evidence_written", "counter"),
    ("mbt_edge_evidence_failed", "counter"),
    ("mbt_edge_evidence_deleted", "counter"),
    ("mbt_edge_evidence_files", "gauge"),
    ("mbt_edge_evidence_bytes", "gauge"),
];

/// Parses `text` with `prometheus_client.parser` and prints `name type sample value` lines.
const PARSE_METRICS: &str = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    print("family", family.name, family.type)
    for sample in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
        print("sample", sample.name, labels or "-", sample.value)
"#;

fn python() -> PathBuf {
    let python =
        std::env::var_os("MBT_PYTHON").expect("MBT_PYTHON: a python with prometheus_client (scripts/test.sh sets it)");
    PathBuf::from(python)
}

/// `/metrics` of the running daemon parses with the Prometheus project's parser, and every
/// metric of before keeps its name and type; and twenty clients trickling a byte every
/// half second do not delay `/health`: every probe is answered within a second.
#[test]
fn metrics_parse_with_prometheus_and_health_answers_beside_slow_clients() {
    let _turn = turn();
    let demo = Demo::start();
    let http = demo.http;
    // Some windows and an event first, so the families have samples.
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (_, body) = http_get(http, "/metrics").unwrap();
        if common::metric(&body, "mbt_edge_events_total", "source=\"yard\",label=\"ball_tone\"").is_some() {
            break body;
        }
        assert!(Instant::now() < deadline, "no event counted: {body}\nlog:\n{}", demo.daemon.log());
        std::thread::sleep(Duration::from_millis(500));
    };
    let mut child = Command::new(python())
        .args(["-c", PARSE_METRICS])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "prometheus_client refused /metrics: {}\n{body}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed = String::from_utf8(output.stdout).unwrap();
    for (name, kind) in METRIC_NAMES {
        assert!(
            parsed.lines().any(|line| line == format!("family {name} {kind}")),
            "{name} {kind} missing in\n{parsed}"
        );
    }
    let sample = |line: &str| parsed.lines().any(|parsed| parsed == line);
    assert!(
        sample("sample mbt_edge_windows_built_total source=yard")
            || parsed.contains("sample mbt_edge_windows_built_total source=yard "),
        "{parsed}"
    );
    assert!(parsed.contains("sample mbt_edge_events_total label=ball_tone,source=yard "), "{parsed}");
    assert!(parsed.contains("sample mbt_edge_inference_latency_seconds_bucket le=+Inf "), "{parsed}");

    // Twenty clients sending their request head a byte every half second.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trickling: Vec<_> = (0..20)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(("127.0.0.1", http)).unwrap();
                for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ".iter().chain(std::iter::repeat(&b'a')) {
                    if stop.load(std::sync::atomic::Ordering::SeqCst) || stream.write_all(&[*byte]).is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    for probe in 0..20 {
        let mut stream = TcpStream::connect(("127.0.0.1", http)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        stream.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap_or_else(|err| panic!("probe {probe} not answered within 1 s: {err}"));
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "probe {probe}: {answer:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for client in trickling {
        client.join().unwrap();
    }
    let (code, log) = demo.daemon.stop();
    assert_eq!(code, Some(0), "{log}");
}
