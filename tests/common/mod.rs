//! Shared by the test crates: a real mosquitto on a free loopback port, a real RTSP server
//! (tests/rtsp_server.py) on another, the daemon binary as a child process with its log, and
//! the config files the tests write.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A mosquitto process on a loopback port; killed (by PID) when dropped.
pub struct Broker {
    pub port: u16,
    pub conf: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Broker {
    /// `extra` is appended to the config; `{dir}` in it is replaced by the broker's folder.
    pub fn start(extra: &str) -> Broker {
        Self::start_with(|port| format!("listener {port} 127.0.0.1\nallow_anonymous true\n{extra}"))
    }

    pub fn start_with(conf_text: impl Fn(u16) -> String) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        // As root, mosquitto would switch to its own user, which cannot read these files.
        let user = if is_root() { "user root\n" } else { "" };
        let text = format!("{user}{}", conf_text(port)).replace("{dir}", &dir.path().display().to_string());
        std::fs::write(&conf, text).unwrap();
        let mut broker = Broker { port, conf, child: None, _dir: dir };
        broker.resume();
        broker
    }

    pub fn resume(&mut self) {
        let log = std::fs::File::create(self.conf.with_extension("log")).unwrap();
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mosquitto is installed (apt-get install mosquitto)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not start on {}: {}",
                self.port,
                std::fs::read_to_string(self.conf.with_extension("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, so that mosquitto saves persistent sessions, then wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, "TERM");
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What tests/rtsp_server.py serves: H.264 video of this size and rate, and a sine tone of
/// `freq` Hz as PCMA (8 kHz only) or L16 (any rate).
#[derive(Debug, Clone, Copy)]
pub struct RtspMedia {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    /// `pcma` or `l16`.
    pub audio_codec: &'static str,
    pub audio_rate: u32,
    pub freq: f64,
    /// `h264`, or `vp8` for a camera that does not send H.264.
    pub video_codec: &'static str,
}

/// tests/rtsp_server.py (GstRtspServer through the system python3) serving one media at
/// `rtsp://127.0.0.1:PORT/stream`; killed (SIGKILL, by PID) when dropped. Starting panics,
/// naming the package, when something it or the client side needs is missing.
pub struct RtspServer {
    pub port: u16,
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl RtspServer {
    pub fn start(media: RtspMedia) -> RtspServer {
        // The client side (the daemon's rtspsrc ! decodebin) needs an H.264 decoder.
        let decoder = Command::new("gst-inspect-1.0").args(["--exists", "avdec_h264"]).status();
        assert!(
            decoder.is_ok_and(|status| status.success()),
            "no H.264 decoder for the RTSP client: apt-get install gstreamer1.0-libav (avdec_h264)"
        );
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("rtsp_server.log");
        let mut server = RtspServer { port: free_port(), child: None, log, _dir: dir };
        server.restart(media);
        server
    }

    pub fn url(&self) -> String {
        format!("rtsp://127.0.0.1:{}/stream", self.port)
    }

    /// Starts the server (again) on the same port, serving `media`; waits until it listens.
    pub fn restart(&mut self, media: RtspMedia) {
        assert!(self.child.is_none(), "the RTSP server is already running");
        // PyGObject (python3-gi) belongs to the system interpreter, not to a venv or pyenv one.
        let python = if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
        let script = repo().join("tests/rtsp_server.py");
        let mut child = Command::new(python)
            .arg(&script)
            .args(["--port", &self.port.to_string()])
            .args(["--width", &media.width.to_string(), "--height", &media.height.to_string()])
            .args(["--fps", &media.fps.to_string(), "--audio-codec", media.audio_codec])
            .args(["--audio-rate", &media.audio_rate.to_string(), "--freq", &media.freq.to_string()])
            .args(["--video-codec", media.video_codec])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&self.log).unwrap())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run {python} {}: {err} (apt-get install python3)", script.display()));
        // "ready PORT" once it listens; end of output if it exits first. A port that answers
        // is not enough: after a kill it might be someone else's.
        let stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
        self.child = Some(child);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(stdout).map_while(Result::ok) {
                if line.starts_with("ready ") {
                    let _ = ready_tx.send(line);
                }
            }
        });
        let ready = ready_rx.recv_timeout(Duration::from_secs(15));
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        assert_eq!(
            ready.as_deref(),
            Ok(format!("ready {}", self.port).as_str()),
            "the RTSP server did not start: {log}"
        );
    }

    /// SIGKILL, as a camera that loses power; waits for the exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn is_root() -> bool {
    std::env::var("USER").map(|user| user == "root").unwrap_or(false)
        || std::fs::read_to_string("/proc/self/status")
            .map(|status| {
                status.lines().any(|line| line.starts_with("Uid:") && line.split_whitespace().nth(1) == Some("0"))
            })
            .unwrap_or(false)
}

/// The repository root (where config.toml and models/ are).
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// What a test's config.toml varies; the rest (`[device]`, `[model]` with one thread,
/// `[window]`, `[mqtt]` on the test broker, `[spool]` in `dir`) is the same for every test.
pub struct ConfigParts<'a> {
    pub device: &'a str,
    pub model: PathBuf,
    pub hop: f64,
    pub broker: u16,
    /// Sources, events and any other tables, appended as written.
    pub body: &'a str,
    /// `[spool] dir`; `None`: `spool` beside the config.
    pub spool: Option<&'a Path>,
}

/// Writes `dir/config.toml` from `parts`.
pub fn write_config(dir: &Path, parts: ConfigParts<'_>) -> PathBuf {
    let config = dir.join("config.toml");
    let text = format!(
        "[device]\nid = \"{device}\"\n\n[model]\npath = \"{model}\"\nthreads = 1\n\n[window]\nhop = {hop:?}\n\n\
         [mqtt]\nurl = \"mqtt://127.0.0.1:{broker}\"\n\n[spool]\ndir = \"{spool}\"\n\n{body}\n",
        device = parts.device,
        model = parts.model.display(),
        hop = parts.hop,
        broker = parts.broker,
        spool = parts.spool.map_or_else(|| dir.join("spool"), Path::to_path_buf).display(),
        body = parts.body,
    );
    std::fs::write(&config, text).unwrap();
    config
}

/// `mbt-edge run` as a child process, its stderr in `<tag>.log` beside the config; killed
/// when dropped.
pub struct Daemon {
    pub child: Child,
    log: PathBuf,
}

impl Daemon {
    pub fn start(config: &Path, tag: &str) -> Daemon {
        Daemon::start_with_env(config, tag, &[])
    }

    pub fn start_with_env(config: &Path, tag: &str, env: &[(&str, &OsStr)]) -> Daemon {
        let log = config.with_file_name(format!("{tag}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_mbt-edge"))
            .args(["run", "--config"])
            .arg(config)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn signal(&self, name: &str) {
        signal(&self.child, name);
    }

    /// Waits for the exit; the exit code (None: killed by a signal).
    pub fn wait(&mut self) -> Option<i32> {
        self.child.wait().unwrap().code()
    }

    /// SIGTERM, then the exit code and the log.
    pub fn stop(mut self) -> (Option<i32>, String) {
        self.signal("TERM");
        let code = self.wait();
        (code, self.log())
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tmpfs of a few KiB mounted for one test (needs root, as CI has), unmounted on drop.
pub struct TinyDisk {
    dir: tempfile::TempDir,
}

impl TinyDisk {
    pub fn mount(size: &str) -> TinyDisk {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mounting a tmpfs needs root (CI runs as root)");
        TinyDisk { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Fills the disk with a file until it refuses more; returns the file.
    pub fn fill(&self) -> PathBuf {
        let filler = self.path().join("filler");
        let mut file = std::fs::File::create(&filler).unwrap();
        while std::io::Write::write_all(&mut file, &[0u8; 1024]).is_ok() {}
        filler
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.dir.path()).status();
    }
}

/// Sends signal `name` (e.g. "TERM", "KILL", "HUP") to `child`.
pub fn signal(child: &Child, name: &str) {
    let _ = Command::new("kill").arg(format!("-{name}")).arg(child.id().to_string()).status();
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `mosquitto_sub` printing `topic payload` lines for `filter` into a file until dropped.
pub struct Subscriber {
    child: Child,
    pub output: PathBuf,
    _dir: tempfile::TempDir,
}

impl Subscriber {
    pub fn start(port: u16, filter: &str) -> Subscriber {
        Self::spawn(port, filter, &[])
    }

    /// A subscriber with a persistent session under client id `id`: what the broker takes
    /// while this one is away (it reconnects once a second after a broker restart, and the
    /// daemon may replay first) waits for it. The broker needs `persistence true` to keep
    /// the session across its own restart.
    pub fn start_persistent(port: u16, filter: &str, id: &str) -> Subscriber {
        Self::spawn(port, filter, &["-c", "-i", id])
    }

    fn spawn(port: u16, filter: &str, session: &[&str]) -> Subscriber {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("messages.txt");
        let file = std::fs::File::create(&output).unwrap();
        let child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-v", "-t", filter])
            .args(session)
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto_sub is installed (apt-get install mosquitto-clients)");
        // Give it a moment to subscribe.
        std::thread::sleep(Duration::from_millis(300));
        Subscriber { child, output, _dir: dir }
    }

    /// (topic, payload) pairs received so far: whole lines only (mosquitto_sub's output may
    /// be read while it writes a line, whose half would not parse).
    pub fn messages(&self) -> Vec<(String, String)> {
        let mut bytes = std::fs::read(&self.output).unwrap_or_default();
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |last| last + 1);
        bytes.truncate(whole);
        // Snapshots are JPEG bytes: read lossily (their lines are noise no test looks at).
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter_map(|line| line.split_once(' ').map(|(topic, payload)| (topic.to_string(), payload.to_string())))
            .collect()
    }

    /// Waits until `done` holds for the messages, or panics with `what`.
    pub fn wait_for(&self, what: &str, timeout: Duration, done: impl Fn(&[(String, String)]) -> bool) {
        let deadline = Instant::now() + timeout;
        loop {
            let messages = self.messages();
            if done(&messages) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; got {messages:#?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Publishes one message with `mosquitto_pub` (QoS 1, not retained), as Home Assistant does.
pub fn mqtt_publish(port: u16, topic: &str, payload: &str) {
    let status = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", topic, "-m", payload])
        .status()
        .expect("mosquitto_pub is installed (apt-get install mosquitto-clients)");
    assert!(status.success(), "mosquitto_pub {topic} {payload}");
}

/// `GET path` on `127.0.0.1:port` with a plain HTTP/1.1 request: (status code, body).
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let (status, body) = http_get_bytes(port, path)?;
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// [`http_get`] for a binary body (an image, a clip).
pub fn http_get_bytes(port: u16, path: &str) -> std::io::Result<(u16, Vec<u8>)> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").map_or(response.len(), |at| at + 4);
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head.split(' ').nth(1).and_then(|code| code.parse().ok()).unwrap_or(0);
    Ok((status, response[split..].to_vec()))
}

/// The value of the Prometheus sample `name{labels}` (labels exactly as rendered, e.g.
/// `source="yard"`; empty for none) in a `/metrics` body.
pub fn metric(body: &str, name: &str, labels: &str) -> Option<f64> {
    let wanted = if labels.is_empty() { name.to_string() } else { format!("{name}{{{labels}}}") };
    body.lines().find_map(|line| {
        let (sample, value) = line.rsplit_once(' ')?;
        (sample == wanted).then(|| value.parse().ok()).flatten()
    })
}

pub fn schema_path() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schema/event.schema.json")
}

/// A JSON Schema checker for the keywords schema/event.schema.json uses: type, enum,
/// required, properties, additionalProperties (false), minimum, maximum, minLength and the
/// formats date-time (RFC 3339) and uuid. Returns one line per violation.
pub fn validate(schema: &serde_json::Value, value: &serde_json::Value, path: &str) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(types) = schema.get("type") {
        let types: Vec<&str> = match types {
            serde_json::Value::String(t) => vec![t.as_str()],
            serde_json::Value::Array(ts) => ts.iter().filter_map(|t| t.as_str()).collect(),
            _ => vec![],
        };
        let ok = types.iter().any(|t| match *t {
            "object" => value.is_object(),
            "string" => value.is_string(),
            "number" => value.is_number(),
            "integer" => value.is_u64() || value.is_i64(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            "array" => value.is_array(),
            _ => false,
        });
        if !ok {
            errors.push(format!("{path}: {value} is not of type {types:?}"));
            return errors;
        }
    }
    if let Some(serde_json::Value::Array(allowed)) = schema.get("enum")
        && !allowed.contains(value)
    {
        errors.push(format!("{path}: {value} not in {allowed:?}"));
    }
    if let Some(n) = value.as_f64() {
        if let Some(min) = schema.get("minimum").and_then(serde_json::Value::as_f64)
            && n < min
        {
            errors.push(format!("{path}: {n} < {min}"));
        }
        if let Some(max) = schema.get("maximum").and_then(serde_json::Value::as_f64)
            && n > max
        {
            errors.push(format!("{path}: {n} > {max}"));
        }
    }
    if let Some(s) = value.as_str() {
        if let Some(min) = schema.get("minLength").and_then(serde_json::Value::as_u64)
            && (s.chars().count() as u64) < min
        {
            errors.push(format!("{path}: shorter than {min}"));
        }
        match schema.get("format").and_then(serde_json::Value::as_str) {
            Some("date-time")
                if time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_err() =>
            {
                errors.push(format!("{path}: {s:?} is not RFC 3339"));
            }
            Some("uuid") if !is_uuid(s) => errors.push(format!("{path}: {s:?} is not a UUID")),
            _ => {}
        }
    }
    if let Some(object) = value.as_object() {
        let properties = schema.get("properties").and_then(serde_json::Value::as_object);
        if let Some(serde_json::Value::Array(required)) = schema.get("required") {
            for key in required.iter().filter_map(serde_json::Value::as_str) {
                if !object.contains_key(key) {
                    errors.push(format!("{path}: missing {key}"));
                }
            }
        }
        for (key, child) in object {
            match properties.and_then(|p| p.get(key)) {
                Some(child_schema) => errors.extend(validate(child_schema, child, &format!("{path}.{key}"))),
                None if schema.get("additionalProperties") == Some(&serde_json::Value::Bool(false)) => {
                    errors.push(format!("{path}: unexpected {key}"));
                }
                None => {}
            }
        }
    }
    errors
}

fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && groups.iter().all(|g| g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// `gst-discoverer-1.0 path`'s report.
pub fn discover(path: &Path) -> String {
    let output = Command::new("gst-discoverer-1.0")
        .arg(path)
        .output()
        .expect("gst-discoverer-1.0 is installed (apt-get install gstreamer1.0-plugins-base-apps)");
    let report = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "gst-discoverer-1.0 {}: {report}", path.display());
    report
}

/// The `Duration: H:MM:SS.nnnnnnnnn` of a discoverer report, in seconds.
pub fn discovered_seconds(report: &str) -> f64 {
    let text = report.lines().find_map(|line| line.trim().strip_prefix("Duration: ")).expect("a duration");
    let parts: Vec<f64> = text.split(':').map(|part| part.parse().unwrap()).collect();
    parts[0] * 3600.0 + parts[1] * 60.0 + parts[2]
}

/// Decodes `path` with GStreamer into raw bytes of `caps` (audio or video); with
/// `drop_video`, a file's video stream goes to a fakesink (a clip's audio is wanted).
pub fn decode(path: &Path, caps: &str, out: &Path, drop_video: bool) -> Vec<u8> {
    let kind = if caps.starts_with("audio") { "audio" } else { "video" };
    let convert = if kind == "audio" { "audioconvert ! audioresample" } else { "videoconvert" };
    let other = if drop_video { "  d. ! video/x-raw ! fakesink" } else { "" };
    let description = format!(
        "filesrc location={} ! decodebin name=d  d. ! {kind}/x-raw ! {convert} ! {caps} ! filesink location={}{other}",
        path.display(),
        out.display()
    );
    let status = Command::new("gst-launch-1.0").arg("-q").args(description.split_whitespace()).status().unwrap();
    assert!(status.success(), "decoding {}", path.display());
    std::fs::read(out).unwrap()
}

/// The frequency (5 Hz steps, 100 Hz to 4 kHz) with the most energy in `samples` at `rate`.
pub fn spectral_peak(samples: &[f32], rate: f64) -> f64 {
    let power = |freq: f64| {
        let (mut re, mut im) = (0.0f64, 0.0f64);
        for (idx, sample) in samples.iter().enumerate() {
            let phase = 2.0 * std::f64::consts::PI * freq * idx as f64 / rate;
            re += *sample as f64 * phase.cos();
            im += *sample as f64 * phase.sin();
        }
        re * re + im * im
    };
    (20..=800).map(|step| step as f64 * 5.0).max_by(|a, b| power(*a).total_cmp(&power(*b))).unwrap()
}
