//! systemd's notify protocol over the sd-notify crate. Every call is a no-op when the process
//! was not started by systemd with `Type=notify` (no `NOTIFY_SOCKET`), so the daemon calls
//! them unconditionally. Errors are returned, never panicked on: the caller logs them, since a
//! lost notification must not stop the daemon.
//!
//! This module only speaks the protocol; *whether* `WATCHDOG=1` may be sent is decided by
//! [`crate::service::Health`].

use std::io;
use std::time::Duration;

use sd_notify::NotifyState;

/// Sends state changes to systemd. Cheap to copy; holds no socket (one datagram per call).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notifier {
    enabled: bool,
}

impl Notifier {
    /// A notifier that talks to systemd when `NOTIFY_SOCKET` is set, and does nothing otherwise.
    pub fn from_env() -> Notifier {
        Notifier { enabled: std::env::var_os("NOTIFY_SOCKET").is_some() }
    }

    /// A notifier that never sends anything (tests, `classify`, `bench`).
    pub fn disabled() -> Notifier {
        Notifier { enabled: false }
    }

    /// Whether notifications go anywhere.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// `READY=1`: startup is finished (model loaded, every source playing or in backoff).
    pub fn ready(&self) -> io::Result<()> {
        self.send(&[NotifyState::Ready])
    }

    /// `READY=1` and `STATUS=<text>` in one datagram, so `systemctl status` never shows a
    /// started service with a stale "starting" line.
    pub fn ready_with_status(&self, text: &str) -> io::Result<()> {
        let text = one_line(text);
        self.send(&[NotifyState::Ready, NotifyState::Status(&text)])
    }

    /// `STATUS=<text>`: the one-line state `systemctl status` shows. Line breaks are replaced
    /// by spaces: the protocol is one assignment per line, and a status text must never be
    /// able to smuggle in `READY=1` or `WATCHDOG=1`.
    pub fn status(&self, text: &str) -> io::Result<()> {
        let text = one_line(text);
        self.send(&[NotifyState::Status(&text)])
    }

    /// `WATCHDOG=1`: the daemon is healthy. Send it only when [`crate::service::Health`] says
    /// so, at least every [`Notifier::watchdog_ping_period`].
    pub fn watchdog(&self) -> io::Result<()> {
        self.send(&[NotifyState::Watchdog])
    }

    /// `STOPPING=1`: a graceful stop has begun (SIGTERM).
    pub fn stopping(&self) -> io::Result<()> {
        self.send(&[NotifyState::Stopping])
    }

    /// `RELOADING=1` with `MONOTONIC_USEC=` (systemd 253+ requires the timestamp with
    /// `RELOADING=1`; older versions ignore it). Follow it with [`Notifier::ready`] once the
    /// new config is applied or refused.
    pub fn reloading(&self) -> io::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        let now = NotifyState::monotonic_usec_now()?;
        self.send(&[NotifyState::Reloading, now])
    }

    /// `WatchdogSec=` of the unit, from `WATCHDOG_USEC` (and `WATCHDOG_PID`, when set, must be
    /// this process). `None`: no watchdog, nothing to feed.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        if !self.enabled {
            return None;
        }
        sd_notify::watchdog_enabled()
    }

    /// How often to feed the watchdog: half its interval, as sd_watchdog_enabled(3) advises.
    pub fn watchdog_ping_period(&self) -> Option<Duration> {
        self.watchdog_interval().map(|interval| interval / 2)
    }

    fn send(&self, states: &[NotifyState<'_>]) -> io::Result<()> {
        if !self.enabled {
            return Ok(());
        }
        sd_notify::notify(states)
    }
}

fn one_line(text: &str) -> String {
    text.chars().map(|c| if c == '\n' || c == '\r' { ' ' } else { c }).collect()
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixDatagram;
    use std::path::PathBuf;
    use std::sync::Mutex;

    use super::*;

    /// Tests that set `NOTIFY_SOCKET` or `WATCHDOG_*` take this lock: the environment is
    /// process-wide and tests run on parallel threads.
    static ENV_LOCK: Mutex<()> = Mutex::new(());

    /// A fake systemd: a Unix datagram socket bound at a fresh path (sd-notify does not
    /// support abstract `@` sockets).
    struct FakeSystemd {
        socket: UnixDatagram,
        path: PathBuf,
    }

    impl FakeSystemd {
        fn bind(name: &str) -> FakeSystemd {
            let path = std::env::temp_dir().join(format!("mbt-edge-notify-{}-{name}.sock", std::process::id()));
            let _ = std::fs::remove_file(&path);
            let socket = UnixDatagram::bind(&path).expect("binding the fake notify socket");
            socket.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            FakeSystemd { socket, path }
        }

        fn receive(&self) -> String {
            let mut buffer = [0u8; 4096];
            let n = self.socket.recv(&mut buffer).expect("a notification");
            String::from_utf8(buffer[..n].to_vec()).unwrap()
        }
    }

    impl Drop for FakeSystemd {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn check(send: impl FnOnce(&Notifier) -> io::Result<()>, expected: &str) {
        let _env = ENV_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let systemd = FakeSystemd::bind("check");
        // SAFETY: every test that touches the environment holds ENV_LOCK.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &systemd.path) };
        let notifier = Notifier::from_env();
        send(&notifier).unwrap();
        let received = systemd.receive();
        // SAFETY: set_var/remove_var race only with other threads reading the environment; every
        // test here that touches it holds ENV_LOCK, and nothing else in this binary reads it.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        assert_eq!(received, expected);
    }

    #[test]
    fn sends_each_state() {
        check(|n| n.ready(), "READY=1\n");
        check(|n| n.status("yard online, gate backoff 4s"), "STATUS=yard online, gate backoff 4s\n");
        check(|n| n.watchdog(), "WATCHDOG=1\n");
        check(|n| n.stopping(), "STOPPING=1\n");
        check(|n| n.ready_with_status("running"), "READY=1\nSTATUS=running\n");
    }

    #[test]
    fn status_cannot_inject_assignments() {
        check(|n| n.status("bad\nREADY=1\r\nWATCHDOG=1"), "STATUS=bad READY=1  WATCHDOG=1\n");
    }

    #[test]
    fn reloading_carries_a_monotonic_timestamp() {
        let _env = ENV_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let systemd = FakeSystemd::bind("reload");
        // SAFETY: set_var/remove_var race only with other threads reading the environment; every
        // test here that touches it holds ENV_LOCK, and nothing else in this binary reads it.
        unsafe { std::env::set_var("NOTIFY_SOCKET", &systemd.path) };
        Notifier::from_env().reloading().unwrap();
        let received = systemd.receive();
        // SAFETY: set_var/remove_var race only with other threads reading the environment; every
        // test here that touches it holds ENV_LOCK, and nothing else in this binary reads it.
        unsafe { std::env::remove_var("NOTIFY_SOCKET") };
        let lines: Vec<&str> = received.lines().collect();
        assert_eq!(lines[0], "RELOADING=1");
        let usec: u64 = lines[1].strip_prefix("MONOTONIC_USEC=").unwrap().parse().unwrap();
        assert!(usec > 0);
    }

    #[test]
    fn without_notify_socket_everything_is_a_no_op() {
        let _env = ENV_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        // SAFETY: set_var/remove_var race only with other threads reading the environment; every
        // test here that touches it holds ENV_LOCK, and nothing else in this binary reads it.
        unsafe {
            std::env::remove_var("NOTIFY_SOCKET");
            std::env::set_var("WATCHDOG_USEC", "30000000");
        }
        let notifier = Notifier::from_env();
        assert!(!notifier.is_enabled());
        notifier.ready().unwrap();
        notifier.watchdog().unwrap();
        notifier.reloading().unwrap();
        assert_eq!(notifier.watchdog_interval(), None);
        // SAFETY: set_var/remove_var race only with other threads reading the environment; every
        // test here that touches it holds ENV_LOCK, and nothing else in this binary reads it.
        unsafe { std::env::remove_var("WATCHDOG_USEC") };
        assert!(!Notifier::disabled().is_enabled());
    }

    #[test]
    fn watchdog_interval_comes_from_watchdog_usec() {
        let _env = ENV_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let systemd = FakeSystemd::bind("watchdog");
        // SAFETY: set_var/remove_var race only with other threads reading the environment; every
        // test here that touches it holds ENV_LOCK, and nothing else in this binary reads it.
        unsafe {
            std::env::set_var("NOTIFY_SOCKET", &systemd.path);
            std::env::set_var("WATCHDOG_USEC", "30000000");
            std::env::set_var("WATCHDOG_PID", std::process::id().to_string());
        }
        let notifier = Notifier::from_env();
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(30)));
        assert_eq!(notifier.watchdog_ping_period(), Some(Duration::from_secs(15)));
        // A watchdog meant for another process (our parent, say) is not ours to feed.
        // SAFETY: set_var/remove_var race only with other threads reading the environment; every
        // test here that touches it holds ENV_LOCK, and nothing else in this binary reads it.
        unsafe { std::env::set_var("WATCHDOG_PID", "1") };
        assert_eq!(notifier.watchdog_interval(), None);
        // SAFETY: set_var/remove_var race only with other threads reading the environment; every
        // test here that touches it holds ENV_LOCK, and nothing else in this binary reads it.
        unsafe {
            std::env::remove_var("WATCHDOG_PID");
            std::env::remove_var("WATCHDOG_USEC");
            std::env::remove_var("NOTIFY_SOCKET");
        }
    }
}
