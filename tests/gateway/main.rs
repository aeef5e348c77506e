//! Black-box tests against real listeners: one gateway per test, a recording upstream.
// A test that cannot go on should stop loudly.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::print_stderr,
    unreachable_pub
)]

mod access_log;
mod admin;
mod bad_input;
mod cli;
mod client;
mod client_addresses;
mod cluster;
mod console;
mod deploy;
mod faults;
mod hostile;
mod lifecycle;
mod limits;
mod multinode;
mod ops;
mod otlp;
mod policies;
mod processes;
mod proxy_protocol;
mod public_api;
mod redis_server;
mod reload;
mod sentinel;
mod support;
mod tls;
mod upstream_tls;
mod upstreams;
