//! The msgflash-gateway binary: parse the command line, run it, turn the outcome into an exit code.

use clap::Parser;
use std::process::ExitCode;

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
