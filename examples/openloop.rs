//! Open-loop HTTP/1.1 load generator for bench/run.sh's latency phase (wrk has no fixed-rate mode).
//!
//! Requests are due on a fixed schedule (`rate` per second, spread over `connections` keep-alive
//! connections, one thread each); a request's latency is measured from the moment it was *due*,
//! not from when it was sent, so a slow response delays the next send and that delay is counted
//! (no coordinated omission, as in wrk2). Prints wrk-shaped lines (`50%`, `99%`, `Requests/sec:`,
//! `Non-2xx`) so bench/report.py reads both the same way.
//!
//! ```text
//! cargo run --release --example openloop -- ADDR RATE SECONDS CONNECTIONS MODE [KEYS_FILE|TOKEN]
//! MODE: valid (round robin over the keys) | abusive (the first key) | jwt (GET /api/dashboard)
//! ```

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Latency of each completed request from its due time, in microseconds.
    latencies_us: Vec<u64>,
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

/// Reads one response (status line, headers, content-length body); returns (status, bytes).
fn read_response(reader: &mut BufReader<TcpStream>) -> io::Result<(u16, u64)> {
    let mut line = String::new();
    let mut bytes = reader.read_line(&mut line)? as u64;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad status line"))?;
    let mut length = 0u64;
    loop {
        line.clear();
        let n = reader.read_line(&mut line)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
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
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "chunked response",
                ));
            }
        }
    }
    io::copy(&mut reader.by_ref().take(length), &mut io::sink())?;
    Ok((status, bytes + length))
}

fn connect(addr: &str) -> io::Result<(TcpStream, BufReader<TcpStream>)> {
    let stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let reader = BufReader::new(stream.try_clone()?);
    Ok((stream, reader))
}

/// Connection `index` sends requests index, index + C, index + 2C, ... of the global schedule.
fn drive(plan: &Plan, index: usize, start: Instant) -> Tally {
    let mut tally = Tally::default();
    let total = (plan.rate * plan.seconds) as u64;
    let interval = 1.0 / plan.rate;
    let mut conn = None;
    let mut n = index as u64;
    while n < total {
        let due = start + Duration::from_secs_f64(n as f64 * interval);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        n += plan.connections as u64;
        let (stream, reader) = match conn.as_mut() {
            Some(c) => c,
            None => match connect(&plan.addr) {
                Ok(c) => conn.insert(c),
                Err(_) => {
                    tally.errors += 1;
                    continue;
                }
            },
        };
        let outcome = stream
            .write_all(&plan.request())
            .and_then(|()| read_response(reader));
        match outcome {
            Ok((status, bytes)) => {
                tally.latencies_us.push(due.elapsed().as_micros() as u64);
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
        token: if extra.is_empty() {
            String::new()
        } else {
            extra
        },
        next_key: AtomicUsize::new(0),
    });
    let start = Instant::now() + Duration::from_millis(50);
    let workers: Vec<_> = (0..plan.connections)
        .map(|i| {
            let plan = Arc::clone(&plan);
            std::thread::spawn(move || drive(&plan, i, start))
        })
        .collect();
    let mut all = Tally::default();
    for w in workers {
        if let Ok(t) = w.join() {
            all.latencies_us.extend(t.latencies_us);
            all.non_2xx += t.non_2xx;
            all.errors += t.errors;
            all.bytes += t.bytes;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    all.latencies_us.sort_unstable();
    let done = all.latencies_us.len();
    println!(
        "open loop: {} req/s offered over {} connections for {}s (latency from the due time)",
        plan.rate, plan.connections, plan.seconds
    );
    println!("  Latency Distribution");
    for p in [50.0, 75.0, 90.0, 99.0, 99.9] {
        println!("  {p:>5}%  {}us", percentile(&all.latencies_us, p));
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
