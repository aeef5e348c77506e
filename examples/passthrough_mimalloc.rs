#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]
// examples/passthrough.rs with mimalloc as the global allocator, as msgflash-gateway has
// (src/main.rs): the framework's cost with the gateway's allocator. bench/run.sh uses this one
// as "pingora passthrough" in its main table; `passthrough` (glibc malloc) is in `run.sh tune`.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

include!("passthrough.rs");
