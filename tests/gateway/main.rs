//! Black-box tests against real listeners: one gateway per test, a recording upstream.

mod admin;
mod bad_input;
mod cli;
mod cluster;
mod console;
mod hostile;
mod lifecycle;
mod limits;
mod multinode;
mod policies;
mod processes;
mod public_api;
mod redis_server;
mod reload;
mod support;
mod upstreams;
