//! Open-loop HTTP/1.1 load generator for bench/run.sh's latency phase (wrk has no fixed-rate mode).
//!
//! Requests are due on a fixed schedule (`rate` per second, spread over `connections` keep-alive
//! connections, all driven by one thread: on a small VM, a thread per connection measured its
//! own wake-ups; a second thread keeps the schedule with `nanosleep`, finer than tokio's
//! millisecond timer ticks, which would send each millisecond's requests as one burst). Two
//! latencies per request: from its send to its response (the figure wrk reports), and from its
//! *due* time, which also counts waiting for a busy connection (no coordinated omission, as in
//! wrk2) and the pacer's own lateness. Prints wrk-shaped lines (`50%`, `99%`, `Requests/sec:`, `Non-2xx`) so bench/report.py
//! reads both the same way.
//!
//! ```text
//! cargo run --release --example openloop -- ADDR RATE SECONDS CONNECTIONS MODE [KEYS_FILE|TOKEN]
//! MODE: valid (round robin over the keys) | abusive (the first key) | jwt (GET /api/dashboard)
//! ```
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::time::Instant;

const BODY: &str = r#"{"instanceId":"3fa85f64-5717-4562-b3fc-2c963f66afa6","to":"+33612345000","type":"text","text":"Hello"}"#;

struct Plan {
    addr: String,
    rate: f64,
    seconds: f64,
    connections: usize,
    mode: String,
    keys: Vec<String>,
    token: String,
    next_key: AtomicUsize,
}

#[derive(Default)]
struct Tally {
    /// Per completed request, microseconds from the moment it was sent to its response.
    from_send_us: Vec<u64>,
    /// Per completed request, microseconds from the moment it was due to its response.
    from_due_us: Vec<u64>,
    /// (microseconds from send to response, seconds into the run at the send) of the slowest.
    slowest: Vec<(u64, f64)>,
    /// Requests sent more than a millisecond after they were due (the connection was busy,
    /// or the generator late).
    late: u64,
    non_2xx: u64,
    errors: u64,
    bytes: u64,
}

impl Plan {
    fn request(&self) -> Vec<u8> {
        match self.mode.as_str() {
            "jwt" => format!(
                "GET /api/dashboard HTTP/1.1\r\nhost: {}\r\nauthorization: Bearer {}\r\n\r\n",
                self.addr, self.token
            )
            .into_bytes(),
            mode => {
                let key = match mode {
                    "abusive" => &self.keys[0],
                    _ => {
                        let i = self.next_key.fetch_add(1, Ordering::Relaxed);
                        &self.keys[i % self.keys.len()]
                    }
                };
                format!(
                    "POST /api/v1/messages/send HTTP/1.1\r\nhost: {}\r\nx-api-key: {key}\r\n\
                     content-type: application/json\r\ncontent-length: {}\r\n\r\n{BODY}",
                    self.addr,
                    BODY.len()
                )
                .into_bytes()
            }
        }
    }
}

type Conn = BufReader<TcpStream>;

/// Reads one response (status line, headers, content-length body); returns (status, bytes).
async fn read_response(conn: &mut Conn) -> std::io::Result<(u16, u64)> {
    use std::io::{Error, ErrorKind};
    let mut line = String::new();
    let mut bytes = conn.read_line(&mut line).await? as u64;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Error::new(ErrorKind::InvalidData, "bad status line"))?;
    let mut length = 0u64;
    loop {
        line.clear();
        let n = conn.read_line(&mut line).await?;
        if n == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        bytes += n as u64;
        let trimmed = line.trim_end();
        if trimmed.is_empty() {
            break;
        }
        if let Some((name, value)) = trimmed.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                return Err(Error::new(ErrorKind::InvalidData, "chunked response"));
            }
        }
    }
    let mut body = vec![0u8; usize::try_from(length).unwrap_or(0)];
    conn.read_exact(&mut body).await?;
    Ok((status, bytes + length))
}

async fn connect(addr: &str) -> std::io::Result<Conn> {
    let stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(BufReader::new(stream))
}

async fn exchange(conn: &mut Conn, request: &[u8]) -> std::io::Result<(u16, u64)> {
    conn.get_mut().write_all(request).await?;
    tokio::time::timeout(Duration::from_secs(5), read_response(conn))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// The schedule, kept by a thread of its own: tokio's timer wakes on millisecond ticks, which
/// would send each millisecond's requests as one burst. Request n is handed, at its due time,
/// to connection n mod C (queued there if that connection is still busy).
fn pace(plan: &Plan, start: std::time::Instant, lanes: Vec<UnboundedSender<std::time::Instant>>) {
    let total = (plan.rate * plan.seconds) as u64;
    let interval = 1.0 / plan.rate;
    for n in 0..total {
        let due = start + Duration::from_secs_f64(n as f64 * interval);
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        let lane = &lanes[(n % lanes.len() as u64) as usize];
        if lane.send(due).is_err() {
            return;
        }
    }
}

/// One connection: sends a request for every due time it is handed, in order.
async fn drive(
    plan: Arc<Plan>,
    start: Instant,
    mut due_times: UnboundedReceiver<std::time::Instant>,
) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<Conn> = None;
    while let Some(due) = due_times.recv().await {
        let due = Instant::from_std(due);
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match connect(&plan.addr).await {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    tally.errors += 1;
                    continue;
                }
            },
        };
        let request = plan.request();
        let sent = Instant::now();
        if sent.duration_since(due) > Duration::from_millis(1) {
            tally.late += 1;
        }
        match exchange(c, &request).await {
            Ok((status, bytes)) => {
                let took = sent.elapsed().as_micros() as u64;
                tally.from_send_us.push(took);
                keep_slowest(
                    &mut tally.slowest,
                    (took, sent.duration_since(start).as_secs_f64()),
                );
                tally.from_due_us.push(due.elapsed().as_micros() as u64);
                tally.bytes += bytes;
                if !(200..400).contains(&status) {
                    tally.non_2xx += 1;
                }
            }
            Err(_) => {
                tally.errors += 1;
                conn = None;
            }
        }
    }
    tally
}

/// Keeps the ten slowest requests: when they happened tells a periodic stall from noise.
fn keep_slowest(slowest: &mut Vec<(u64, f64)>, candidate: (u64, f64)) {
    if slowest.len() == 10 && slowest.last().is_some_and(|last| last.0 >= candidate.0) {
        return;
    }
    slowest.push(candidate);
    slowest.sort_by_key(|s| std::cmp::Reverse(s.0));
    slowest.truncate(10);
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 5 {
        eprintln!("usage: openloop ADDR RATE SECONDS CONNECTIONS MODE [KEYS_FILE|TOKEN]");
        std::process::exit(2);
    }
    let number = |i: usize| -> f64 {
        args[i].parse().unwrap_or_else(|_| {
            eprintln!("openloop: argument {} is not a number: {}", i + 1, args[i]);
            std::process::exit(2)
        })
    };
    let mode = args[4].clone();
    let extra = args.get(5).cloned().unwrap_or_default();
    let keys: Vec<String> = if mode == "jwt" {
        Vec::new()
    } else {
        std::fs::read_to_string(&extra)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    };
    if mode != "jwt" && keys.is_empty() {
        eprintln!("openloop: no keys in {extra:?}");
        std::process::exit(2);
    }
    let plan = Arc::new(Plan {
        addr: args[0].trim_start_matches("http://").to_owned(),
        rate: number(1).max(1.0),
        seconds: number(2).max(0.1),
        connections: (number(3) as usize).max(1),
        mode,
        keys,
        token: extra,
        next_key: AtomicUsize::new(0),
    });
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("openloop: no runtime: {e}");
            std::process::exit(1)
        }
    };
    let start = std::time::Instant::now() + Duration::from_millis(50);
    let (lanes, receivers): (Vec<_>, Vec<_>) =
        (0..plan.connections).map(|_| unbounded_channel()).unzip();
    let pacer = {
        let plan = Arc::clone(&plan);
        std::thread::spawn(move || pace(&plan, start, lanes))
    };
    let all = runtime.block_on(async {
        let tasks: Vec<_> = receivers
            .into_iter()
            .map(|due_times| {
                tokio::spawn(drive(
                    Arc::clone(&plan),
                    Instant::from_std(start),
                    due_times,
                ))
            })
            .collect();
        let mut all = Tally::default();
        for task in tasks {
            if let Ok(t) = task.await {
                all.from_send_us.extend(t.from_send_us);
                for slow in t.slowest {
                    keep_slowest(&mut all.slowest, slow);
                }
                all.from_due_us.extend(t.from_due_us);
                all.late += t.late;
                all.non_2xx += t.non_2xx;
                all.errors += t.errors;
                all.bytes += t.bytes;
            }
        }
        all
    });
    let _ = pacer.join();
    let mut all = all;
    let elapsed = start.elapsed().as_secs_f64();
    all.from_send_us.sort_unstable();
    all.from_due_us.sort_unstable();
    let done = all.from_send_us.len();
    println!(
        "open loop: {} req/s offered over {} connections for {}s; {} sends more than 1 ms late",
        plan.rate, plan.connections, plan.seconds, all.late
    );
    println!("  Latency Distribution (from send to response)");
    for p in [50.0, 75.0, 90.0, 99.0, 99.9] {
        println!("  {p:>5}%  {}us", percentile(&all.from_send_us, p));
    }
    let slowest: Vec<String> = all
        .slowest
        .iter()
        .map(|(us, at)| format!("{us}us@{at:.3}s"))
        .collect();
    println!(
        "  slowest (latency@seconds into the run): {}",
        slowest.join(" ")
    );
    println!(
        "  Latency from the due time (includes waiting for a busy connection and timer lateness)"
    );
    for p in [50.0, 99.0] {
        println!("  due{p}%  {}us", percentile(&all.from_due_us, p));
    }
    println!(
        "  {done} requests in {elapsed:.2}s, {:.2}MB read",
        all.bytes as f64 / 1e6
    );
    if all.non_2xx > 0 {
        println!("  Non-2xx or 3xx responses: {}", all.non_2xx);
    }
    if all.errors > 0 {
        println!(
            "  Socket errors: connect 0, read {}, write 0, timeout 0",
            all.errors
        );
    }
    println!("Requests/sec: {:.2}", done as f64 / elapsed);
}
