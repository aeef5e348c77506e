#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
//! Allocations per request: runs the program named by its first argument (the pingora
//! passthrough of `examples/passthrough.rs`, or msgflash-gateway with the arguments that
//! follow) in this process, behind an allocator that counts.
//!
//! With `ALLOC_STATS=HOST:PORT`, each connection to that address reads one line,
//! `<allocations> <reallocations> <bytes allocated>` since start: a client reads it before and
//! after N requests (`bench/run.sh allocs`). Reading costs one allocation (the line), counted.
//!
//! ```sh
//! ALLOC_STATS=127.0.0.1:27199 target/release/examples/alloc_count target/release/msgflash-gateway run -c gw.toml
//! ALLOC_STATS=127.0.0.1:27199 PT_THREADS=1 target/release/examples/alloc_count passthrough
//! ```

use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};
use std::alloc::System;
use std::io::Write;

/// The system allocator behind counters (`stats_alloc`: the crate forbids `unsafe`, so the
/// counting wrapper is that crate's). The counts are the program's, whichever allocator serves
/// them; only their cost differs.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

mod passthrough {
    include!("passthrough.rs");

    pub(crate) fn run() {
        main();
    }
}

fn serve_stats(addr: String) {
    std::thread::spawn(move || {
        let listener = std::net::TcpListener::bind(&addr).expect("ALLOC_STATS: cannot listen");
        for mut conn in listener.incoming().flatten() {
            let s = GLOBAL.stats();
            let line = format!(
                "{} {} {}\n",
                s.allocations, s.reallocations, s.bytes_allocated
            );
            let _ = conn.write_all(line.as_bytes());
        }
    });
}

fn main() -> std::process::ExitCode {
    if let Ok(addr) = std::env::var("ALLOC_STATS") {
        serve_stats(addr);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first() {
        Some(program) if program.contains("passthrough") => {
            passthrough::run();
            std::process::ExitCode::SUCCESS
        }
        Some(_) => {
            use clap::Parser;
            msgflash_gateway::cli::execute(msgflash_gateway::cli::Cli::parse_from(args))
        }
        None => {
            eprintln!("usage: alloc_count (passthrough | PATH/msgflash-gateway ARGS...)");
            std::process::ExitCode::from(2)
        }
    }
}
