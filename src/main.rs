//! The msgflash-gateway binary: parse the command line, run it, turn the outcome into an exit code.

use clap::Parser;
use std::process::ExitCode;

/// mimalloc: pingora allocates on every request (header maps, names, buffers); glibc's
/// malloc/free cost a quarter of a request's instructions (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    msgflash_gateway::cli::execute(msgflash_gateway::cli::Cli::parse())
}
