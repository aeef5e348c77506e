//! msgflash-gateway: the edge of the MsgFlash API on pingora — API keys, console JWTs,
//! per-key rate limits, monthly quotas, one JSON error shape.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod cache;
pub mod cli;
pub mod client;
pub mod clock;
pub mod config;
pub mod echo;
pub mod errors;
pub mod gateway;
pub mod limits;
pub mod live;
pub mod manage;
pub mod metrics;
pub mod path;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod store;
