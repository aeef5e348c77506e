//! The msgflash-gateway binary: parse the command line, run it, turn the outcome into an exit code.

use clap::Parser;
use std::process::ExitCode;

/// mimalloc: pingora allocates on every request (header maps, names, buffers); glibc's
/// malloc/free cost a quarter of a request's instructions (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Logging starts in the CLI: `run` reads its format from the configuration.
    msgflash_gateway::cli::execute(msgflash_gateway::cli::Cli::parse())
}
