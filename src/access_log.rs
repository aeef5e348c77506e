//! The access log: one JSON line per request, written off the request path. A request hands its
//! line to a bounded queue and goes on; a writer thread writes the lines (to stdout, or to a file
//! it reopens on SIGUSR1 for logrotate). A full queue drops the line and counts it; a request
//! never waits for the log. Refusals are always logged, successes at `sample`; `fields` picks
//! what each line holds. Never a key, a token or a secret: the entry has no field for one.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;

/// Every field a line may hold, in the order they are written.
pub const FIELDS: [&str; 22] = [
    "time",
    "request_id",
    "trace_id",
    "client",
    "method",
    "path",
    "route",
    "auth",
    "status",
    "code",
    "account_id",
    "key_id",
    "user_id",
    "upstream",
    "upstream_status",
    "duration_ms",
    "store_ms",
    "upstream_ms",
    "bytes_in",
    "bytes_out",
    "user_agent",
    "tls",
];

/// Where lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Stdout,
    /// Appended to; reopened (created again if moved away) on SIGUSR1.
    File(PathBuf),
}

/// What `[log]` says about the access log.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub target: Target,
    /// Share of successful (status < 400) requests logged, 0.0 to 1.0; refusals always are.
    pub sample: f64,
    /// Bit i: `FIELDS[i]` is written.
    pub fields: u32,
    /// Lines queued for the writer at most.
    pub buffer: usize,
}

impl Settings {
    /// The mask of `names` (all of them when empty); `Err(name)` for one not in [`FIELDS`].
    pub fn field_mask<'a>(names: impl IntoIterator<Item = &'a str>) -> Result<u32, String> {
        let mut mask = 0u32;
        for name in names {
            let i = FIELDS
                .iter()
                .position(|f| *f == name)
                .ok_or_else(|| name.to_owned())?;
            mask |= 1 << i;
        }
        Ok(if mask == 0 { u32::MAX } else { mask })
    }
}

/// One request as the log tells it. Borrowed from the request's state: building it allocates
/// nothing; the line is written into one buffer.
#[derive(Debug, Default)]
pub(crate) struct Entry<'a> {
    /// Unix milliseconds.
    pub(crate) time_ms: i64,
    pub(crate) request_id: &'a str,
    pub(crate) trace_id: &'a str,
    pub(crate) client: Option<IpAddr>,
    pub(crate) method: &'a str,
    pub(crate) path: &'a str,
    pub(crate) route: Option<&'a str>,
    pub(crate) auth: Option<&'a str>,
    pub(crate) status: u16,
    pub(crate) code: Option<&'a str>,
    pub(crate) account_id: Option<&'a str>,
    pub(crate) key_id: Option<&'a str>,
    pub(crate) user_id: Option<&'a str>,
    pub(crate) upstream: Option<SocketAddr>,
    pub(crate) upstream_status: Option<u16>,
    pub(crate) duration_us: u64,
    pub(crate) store_us: u64,
    pub(crate) upstream_us: Option<u64>,
    pub(crate) bytes_in: usize,
    pub(crate) bytes_out: usize,
    pub(crate) user_agent: Option<&'a str>,
    pub(crate) tls: Option<&'a str>,
}

/// At most `max` bytes of `s`, cut on a character boundary: a client writes these values, and a
/// line must stay small whatever it sends.
fn bounded(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn string(out: &mut Vec<u8>, s: &str) {
    // serde_json escapes control characters, quotes and backslashes: a hostile user agent
    // cannot break the line.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn millis(out: &mut Vec<u8>, us: u64) {
    let mut b = itoa::Buffer::new();
    out.extend_from_slice(b.format(us / 1000).as_bytes());
    out.push(b'.');
    let frac = us % 1000;
    out.extend_from_slice(&[
        b'0' + (frac / 100) as u8,
        b'0' + (frac / 10 % 10) as u8,
        b'0' + (frac % 10) as u8,
    ]);
}

impl Entry<'_> {
    /// The JSON line (with its newline) of the fields in `mask`; absent values are left out.
    pub(crate) fn line(&self, mask: u32) -> Vec<u8> {
        let mut out = Vec::with_capacity(512);
        out.push(b'{');
        let mut first = true;
        let mut field = |out: &mut Vec<u8>, i: usize| -> bool {
            if mask & (1 << i) == 0 {
                return false;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            out.push(b'"');
            out.extend_from_slice(FIELDS[i].as_bytes());
            out.extend_from_slice(b"\":");
            true
        };
        let mut num = itoa::Buffer::new();
        if field(&mut out, 0) {
            let t = chrono::DateTime::from_timestamp_millis(self.time_ms).unwrap_or_default();
            string(
                &mut out,
                &t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            );
        }
        if field(&mut out, 1) {
            string(&mut out, self.request_id);
        }
        if field(&mut out, 2) {
            string(&mut out, self.trace_id);
        }
        if let Some(c) = self.client {
            if field(&mut out, 3) {
                string(&mut out, &c.to_string());
            }
        }
        if field(&mut out, 4) {
            string(&mut out, bounded(self.method, 32));
        }
        if field(&mut out, 5) {
            string(&mut out, bounded(self.path, 2048));
        }
        for (i, v) in [(6, self.route), (7, self.auth)] {
            if let Some(v) = v {
                if field(&mut out, i) {
                    string(&mut out, v);
                }
            }
        }
        if field(&mut out, 8) {
            out.extend_from_slice(num.format(self.status).as_bytes());
        }
        for (i, v) in [
            (9, self.code),
            (10, self.account_id),
            (11, self.key_id),
            (12, self.user_id),
        ] {
            if let Some(v) = v {
                if field(&mut out, i) {
                    string(&mut out, v);
                }
            }
        }
        if let Some(u) = self.upstream {
            if field(&mut out, 13) {
                string(&mut out, &u.to_string());
            }
        }
        if let Some(s) = self.upstream_status {
            if field(&mut out, 14) {
                out.extend_from_slice(num.format(s).as_bytes());
            }
        }
        if field(&mut out, 15) {
            millis(&mut out, self.duration_us);
        }
        if field(&mut out, 16) {
            millis(&mut out, self.store_us);
        }
        if let Some(us) = self.upstream_us {
            if field(&mut out, 17) {
                millis(&mut out, us);
            }
        }
        if field(&mut out, 18) {
            out.extend_from_slice(num.format(self.bytes_in).as_bytes());
        }
        if field(&mut out, 19) {
            out.extend_from_slice(num.format(self.bytes_out).as_bytes());
        }
        for (i, v) in [(20, self.user_agent), (21, self.tls)] {
            if let Some(v) = v {
                if field(&mut out, i) {
                    string(&mut out, bounded(v, 256));
                }
            }
        }
        out.extend_from_slice(b"}\n");
        out
    }
}

/// The queue to the writer thread, and what it counts.
#[derive(Debug)]
pub(crate) struct AccessLog {
    queue: SyncSender<Vec<u8>>,
    settings: Settings,
    /// Successes seen, for sampling (every n-th is logged).
    successes: AtomicU64,
    dropped: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    reopen: Arc<AtomicBool>,
}

impl AccessLog {
    /// Starts the writer thread for `settings`.
    pub(crate) fn start(settings: Settings) -> std::io::Result<Self> {
        let (queue, lines) = std::sync::mpsc::sync_channel(settings.buffer.max(1));
        let dropped = Arc::new(AtomicU64::new(0));
        let written = Arc::new(AtomicU64::new(0));
        let reopen = Arc::new(AtomicBool::new(false));
        let sink = Sink::open(&settings.target)?;
        {
            let (written, reopen, target) =
                (written.clone(), reopen.clone(), settings.target.clone());
            std::thread::Builder::new()
                .name("msgflash-access-log".into())
                .spawn(move || write_lines(&lines, sink, &target, &written, &reopen))?;
        }
        Ok(Self {
            queue,
            settings,
            successes: AtomicU64::new(0),
            dropped,
            written,
            reopen,
        })
    }

    /// Logs `entry` (a refusal, or a request that got no answer, always; a success as
    /// sampled), without waiting.
    pub(crate) fn log(&self, entry: &Entry<'_>) {
        if (1..400).contains(&entry.status) {
            // The n-th success is logged when ⌊(n+1)·rate⌋ passes ⌊n·rate⌋: exactly the rate
            // over any run of successes.
            let n = self.successes.fetch_add(1, Ordering::Relaxed) as f64;
            let rate = self.settings.sample;
            if ((n + 1.0) * rate).floor() <= (n * rate).floor() {
                return;
            }
        }
        match self.queue.try_send(entry.line(self.settings.fields)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The file is reopened before the next line (after logrotate moved it).
    pub(crate) fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
    }

    /// `(lines written, lines dropped because the queue was full)`.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (
            self.written.load(Ordering::Relaxed),
            self.dropped.load(Ordering::Relaxed),
        )
    }
}

enum Sink {
    Stdout(std::io::Stdout),
    File(std::io::BufWriter<std::fs::File>),
}

impl Sink {
    fn open(target: &Target) -> std::io::Result<Self> {
        Ok(match target {
            Target::Stdout => Sink::Stdout(std::io::stdout()),
            Target::File(path) => Sink::File(std::io::BufWriter::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    // Client addresses and account ids: the owner and its group (a log
                    // shipper) only.
                    .mode(0o640)
                    .open(path)?,
            )),
        })
    }

    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout(s) => s.lock().write_all(line),
            Sink::File(f) => f.write_all(line),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Stdout(s) => s.lock().flush(),
            Sink::File(f) => f.flush(),
        }
    }
}

/// The writer thread: lines as they come, flushed whenever the queue is empty, and counted
/// written once flushed (a count that ran ahead of the file let a reader find fewer lines than
/// it said); ends when the log is dropped.
fn write_lines(
    lines: &Receiver<Vec<u8>>,
    mut sink: Sink,
    target: &Target,
    written: &AtomicU64,
    reopen: &AtomicBool,
) {
    while let Ok(mut line) = lines.recv() {
        let mut pending = 0;
        loop {
            if reopen.swap(false, Ordering::AcqRel) {
                let _ = sink.flush();
                match Sink::open(target) {
                    Ok(s) => sink = s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot reopen the access log; writing to the old file")
                    }
                }
            }
            if sink.write(&line).is_ok() {
                pending += 1;
            }
            match lines.try_recv() {
                Ok(next) => line = next,
                Err(_) => break,
            }
        }
        if sink.flush().is_ok() {
            written.fetch_add(pending, Ordering::Relaxed);
        }
    }
    let _ = sink.flush();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            time_ms: 1_764_460_800_123,
            request_id: "r1",
            trace_id: "4bf92f3577b34da6a3ce929d0e0e4736",
            client: Some("203.0.113.7".parse().unwrap()),
            method: "POST",
            path: "/api/v1/messages",
            route: Some("/api/v1/"),
            auth: Some("api_key"),
            status: 429,
            code: Some("API_RATE_LIMIT_EXCEEDED"),
            account_id: Some("acme"),
            key_id: Some("k1"),
            user_id: None,
            upstream: None,
            upstream_status: None,
            duration_us: 1234,
            store_us: 5,
            upstream_us: None,
            bytes_in: 10,
            bytes_out: 99,
            user_agent: Some("curl/8 \"quoted\"\n"),
            tls: Some("TLSv1.3"),
        }
    }

    #[test]
    fn a_line_is_one_json_object_with_what_is_known() {
        let line = entry().line(u32::MAX);
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["time"], "2025-11-30T00:00:00.123Z");
        assert_eq!(v["client"], "203.0.113.7");
        assert_eq!(v["status"], 429);
        assert_eq!(v["duration_ms"], 1.234);
        assert_eq!(v["store_ms"], 0.005);
        assert_eq!(v["user_agent"], "curl/8 \"quoted\"\n");
        assert!(v.get("upstream").is_none() && v.get("user_id").is_none());
        let mask = Settings::field_mask(["status", "code"]).unwrap();
        assert_eq!(
            String::from_utf8(entry().line(mask)).unwrap(),
            "{\"status\":429,\"code\":\"API_RATE_LIMIT_EXCEEDED\"}\n"
        );
        assert_eq!(Settings::field_mask(["nope"]).unwrap_err(), "nope");
        // Client-written values are bounded.
        let mut big = entry();
        let agent = "\"".repeat(100_000);
        big.user_agent = Some(&agent);
        let line = big.line(u32::MAX);
        assert!(line.len() < 2048, "{}", line.len());
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(v["user_agent"].as_str().unwrap().len(), 256);
    }

    #[test]
    fn refusals_are_always_logged_successes_as_sampled_and_a_full_queue_drops() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let log = AccessLog::start(Settings {
            target: Target::File(path.clone()),
            sample: 0.5,
            fields: Settings::field_mask(["status"]).unwrap(),
            buffer: 1000,
        })
        .unwrap();
        let mut ok = entry();
        ok.status = 200;
        for _ in 0..10 {
            log.log(&ok);
            log.log(&entry());
        }
        let wait = |n: u64| {
            let start = std::time::Instant::now();
            while log.counts().0 < n {
                assert!(start.elapsed().as_secs() < 10, "{:?}", log.counts());
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        };
        wait(15);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.matches("429").count(), 10);
        assert_eq!(text.matches("200").count(), 5);
        // logrotate: the file moved away, SIGUSR1, the next lines go to a new file.
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        log.reopen();
        log.log(&entry());
        wait(16);
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"status\":429}\n"
        );
        assert_eq!(log.counts().1, 0);
    }
}
