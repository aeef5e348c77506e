//! msgflash-gateway: the edge of the MsgFlash API on pingora — API keys, console JWTs,
//! per-key rate limits, monthly quotas, one JSON error shape.
//!
//! The public modules are what the binary, the tests, the benchmarks and the examples use;
//! everything else is `pub(crate)` (the crate lints, in Cargo.toml, keep it that way:
//! `unreachable_pub`, no `unwrap`/`expect`/`panic!`/prints outside tests and the CLI).

pub mod access_log;
pub(crate) mod admin;
pub mod auth;
pub(crate) mod before_tls;
pub(crate) mod body_type;
pub mod cache;
pub mod certs;
pub mod cli;
pub mod client_ip;
pub mod clock;
pub mod config;
pub(crate) mod conn_limit;
pub mod diagnostics;
pub(crate) mod echo;
pub(crate) mod edge_stream;
pub mod errors;
pub(crate) mod gateway;
pub(crate) mod histogram;
pub(crate) mod host_name;
pub(crate) mod inspect;
pub mod limits;
pub(crate) mod live;
pub(crate) mod log_limit;
pub(crate) mod manage;
pub(crate) mod metrics;
pub mod path;
pub mod policy;
pub(crate) mod proxy;
pub(crate) mod proxy_protocol;
pub(crate) mod routing;
pub mod server;
#[cfg(feature = "otlp")]
pub(crate) mod spans;
pub mod store;
pub(crate) mod trace_context;
