//! The command line: run | check | accounts | keys | jwt (SPEC §8).
// Printing is this module's job (and only this module's: the crate denies it elsewhere).
#![allow(clippy::print_stderr)]

use crate::auth::jwt::{mint_hs256, MintRequest};
use crate::clock::{Clock, SystemClock};
use crate::config::{parse_duration, Config};
use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "msgflash-gateway",
    version,
    about = "The MsgFlash API edge gateway"
)]
pub struct Cli {
    /// Configuration file.
    #[arg(short, long, global = true, default_value = "gateway.toml")]
    pub config: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve: the public listener, the admin listener and (if configured) the echo upstream.
    Run {
        /// Take the listening sockets over from a running gateway (send it SIGQUIT next).
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate the configuration and the policy files; exit 1 on any error.
    Check,
    /// Manage accounts through the admin API of a running gateway.
    #[command(subcommand)]
    Accounts(AccountsCmd),
    /// Manage API keys through the admin API of a running gateway.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Console tokens for development and tests.
    #[command(subcommand)]
    Jwt(JwtCmd),
}

#[derive(Debug, Subcommand)]
pub enum AccountsCmd {
    /// Create or update an account (an existing one keeps what is not given; a new one is
    /// active, its quota period starting on the 1st).
    Put {
        account: String,
        /// Required for a new account.
        #[arg(long)]
        plan: Option<String>,
        #[arg(long, value_parser = ["active", "inactive"])]
        subscription: Option<String>,
        /// The quota period's first day of the month, 1-31 (`quotaAnchorDay`).
        #[arg(long, visible_alias = "quota-anchor-day")]
        anchor_day: Option<u8>,
    },
    /// Show an account, its usage and key count.
    Show { account: String },
}

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Create a key; prints the full key alone (or the record with --json).
    Create {
        account: String,
        #[arg(long)]
        name: String,
        /// Restrict the key to scopes (repeatable, or comma-separated).
        #[arg(long = "scope", visible_alias = "scopes", value_delimiter = ',')]
        scopes: Vec<String>,
        /// Restrict the key to instance ids (repeatable, or comma-separated).
        #[arg(
            long = "instance",
            visible_aliases = ["instance-id", "instance-ids"],
            value_delimiter = ','
        )]
        instances: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// List an account's keys (no secrets).
    List { account: String },
    /// Revoke a key, effective immediately.
    Revoke { account: String, key_id: String },
}

#[derive(Debug, Subcommand)]
pub enum JwtCmd {
    /// Mint an HS256 console token with the configured secret.
    Mint(MintArgs),
}

#[derive(Debug, Args)]
pub struct MintArgs {
    account: String,
    #[arg(long)]
    sub: Option<String>,
    #[arg(long, default_value = "1h")]
    ttl: String,
}

/// Operational logs to stderr (`RUST_LOG` filters, `info` by default): text, or one JSON object
/// a line when `json` (`[log] format = "json"`, for `run`).
fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (a test that runs the CLI twice) keeps the first.
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Runs a parsed command line.
pub fn execute(cli: Cli) -> ExitCode {
    match dispatch(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("msgflash-gateway: {message}");
            ExitCode::FAILURE
        }
    }
}

fn load(path: &std::path::Path) -> Result<Config, String> {
    Config::load(path).map_err(|e| format!("invalid configuration:\n{e}"))
}

fn dispatch(cli: Cli) -> Result<(), String> {
    if !matches!(cli.command, Command::Run { .. }) {
        init_logging(false);
    }
    match cli.command {
        Command::Run { upgrade } => {
            let config = load(&cli.config);
            init_logging(config.as_ref().is_ok_and(|c| c.log.json));
            crate::server::run(config?, upgrade).map_err(|e| e.to_string())
        }
        Command::Check => {
            let config = load(&cli.config)?;
            check_accounts(&config)?;
            let weak = config.weak_secrets();
            if !weak.is_empty() {
                let lines: Vec<String> = weak.iter().map(ToString::to_string).collect();
                return Err(format!("invalid configuration:\n{}", lines.join("\n")));
            }
            for warning in &config.warnings {
                eprintln!("{warning}");
            }
            for warning in config.missing_secrets() {
                eprintln!("warning: {warning}");
            }
            say(format_args!(
                "{}: ok ({} routes, {} upstreams, {} plans, {} route policies)",
                cli.config.display(),
                config.routes.len(),
                config.upstreams.len(),
                config.policies.plans.names().count(),
                config.policies.routes.len()
            ));
            Ok(())
        }
        Command::Accounts(cmd) => {
            let admin = AdminClient::new(&load(&cli.config)?)?;
            let reply = match cmd {
                AccountsCmd::Put {
                    account,
                    plan,
                    subscription,
                    anchor_day,
                } => {
                    let mut body = json!({});
                    if let Some(plan) = plan {
                        body["plan"] = json!(plan);
                    }
                    if let Some(subscription) = subscription {
                        body["subscription"] = json!(subscription);
                    }
                    if let Some(day) = anchor_day {
                        body["quotaAnchorDay"] = json!(day);
                    }
                    admin.call(
                        "PUT",
                        &format!("/admin/v1/accounts/{}", id_arg(&account)?),
                        Some(body),
                    )?
                }
                AccountsCmd::Show { account } => admin.call(
                    "GET",
                    &format!("/admin/v1/accounts/{}", id_arg(&account)?),
                    None,
                )?,
            };
            print_json(&reply);
            Ok(())
        }
        Command::Keys(cmd) => {
            let admin = AdminClient::new(&load(&cli.config)?)?;
            match cmd {
                KeysCmd::Create {
                    account,
                    name,
                    scopes,
                    instances,
                    json: as_json,
                } => {
                    let reply = admin.call(
                        "POST",
                        &format!("/admin/v1/accounts/{}/keys", id_arg(&account)?),
                        Some(json!({"name": name, "scopes": scopes, "instanceIds": instances})),
                    )?;
                    if as_json {
                        print_json(&reply);
                    } else {
                        say(format_args!(
                            "{}",
                            reply["key"].as_str().unwrap_or_default()
                        ));
                    }
                }
                KeysCmd::List { account } => print_json(&admin.call(
                    "GET",
                    &format!("/admin/v1/accounts/{}/keys", id_arg(&account)?),
                    None,
                )?),
                KeysCmd::Revoke { account, key_id } => print_json(&admin.call(
                    "DELETE",
                    &format!(
                        "/admin/v1/accounts/{}/keys/{}",
                        id_arg(&account)?,
                        id_arg(&key_id)?
                    ),
                    None,
                )?),
            }
            Ok(())
        }
        Command::Jwt(JwtCmd::Mint(args)) => {
            let config = load(&cli.config)?;
            let secret = config.jwt.secret.as_deref().ok_or_else(|| {
                format!(
                    "the JWT secret is not set: export {}",
                    config.jwt.secret_env
                )
            })?;
            let ttl =
                mint_ttl(&args.ttl).ok_or_else(|| format!("--ttl {}: not a duration", args.ttl))?;
            let token = mint_hs256(&MintRequest {
                secret,
                account_claim: &config.jwt.account_claim,
                account_id: &args.account,
                sub: args.sub.as_deref(),
                issuer: config.jwt.issuer.as_deref(),
                audience: config.jwt.audience.as_deref(),
                now_unix: SystemClock.now_unix(),
                ttl_secs: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            })
            .map_err(|e| format!("cannot mint: {e}"))?;
            say(format_args!("{token}"));
            Ok(())
        }
    }
}

/// Accounts in the embedded data file must name plans that exist.
fn check_accounts(config: &Config) -> Result<(), String> {
    if config.store.redis.is_some() || !config.store.data_file.exists() {
        return Ok(());
    }
    let file = &config.store.data_file;
    let accounts =
        crate::store::embedded::accounts_in(file).map_err(|e| format!("invalid data file: {e}"))?;
    let problems: Vec<String> = accounts
        .iter()
        .filter(|(_, a)| config.policies.plans.get(&a.plan).is_none())
        .map(|(line, a)| {
            format!(
                "{}:{line}:1: accounts.{}.plan: unknown plan \"{}\"",
                file.display(),
                a.id,
                a.plan
            )
        })
        .collect();
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("invalid configuration:\n{}", problems.join("\n")))
    }
}

/// One line on stdout; a closed pipe (`| head`) is not an error worth a panic.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

fn print_json(v: &Value) {
    say(format_args!(
        "{}",
        serde_json::to_string_pretty(v).unwrap_or_default()
    ));
}

/// An account or key id as a path segment: only what ids are made of, so that no argument
/// (`../other/keys/key_1`) can name another resource than the one it says.
fn id_arg(id: &str) -> Result<&str, String> {
    // `.` and `..` are ids too, but an HTTP client resolves them as path steps.
    if crate::store::valid_id(id) && id != "." && id != ".." {
        Ok(id)
    } else {
        Err(format!(
            "{id:?} is not an id: ids are 1 to 128 characters of A-Z a-z 0-9 . _ : -"
        ))
    }
}

/// The admin API of a running gateway, as the configuration locates it.
struct AdminClient {
    addr: SocketAddr,
    token: String,
}

impl AdminClient {
    fn new(config: &Config) -> Result<Self, String> {
        if config.admin.tls.is_some() {
            // This client speaks plain HTTP: the token must not go out in clear text.
            return Err(format!(
                "the admin listener at {} speaks TLS only, which this command does not: call \
                 the admin API with an HTTPS client (e.g. curl --cacert)",
                config.admin.listen
            ));
        }
        let mut addr = config.admin.listen;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        let token = config.admin.token.clone().ok_or_else(|| {
            format!(
                "the admin token is not set: export {}",
                config.admin.token_env
            )
        })?;
        Ok(Self { addr, token })
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("http://{}{path}", self.addr);
        let request = ureq::AgentBuilder::new()
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .request(method, &url)
            .set("authorization", &format!("Bearer {}", self.token));
        let answer = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        let (status, response) = match answer {
            Ok(r) => (r.status(), r),
            Err(ureq::Error::Status(status, r)) => (status, r),
            Err(e) => return Err(format!("cannot reach the admin API at {}: {e}", self.addr)),
        };
        let value: Value = response.into_json().unwrap_or(Value::Null);
        if (200..300).contains(&status) {
            Ok(value)
        } else {
            let msg = value["error"]["message"]
                .as_str()
                .unwrap_or("unexpected answer");
            let code = value["error"]["code"].as_str().unwrap_or("ERROR");
            Err(format!("{status} {code}: {msg}"))
        }
    }
}

/// A token's lifetime as `jwt mint --ttl` takes it: a config duration (`90s`, `1h`), whole
/// days (`1d`), or bare seconds (`3600`).
fn mint_ttl(s: &str) -> Option<std::time::Duration> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<u64>() {
        return Some(std::time::Duration::from_secs(secs));
    }
    if let Some(days) = t.strip_suffix('d').and_then(|d| d.parse::<u64>().ok()) {
        return Some(std::time::Duration::from_secs(days.checked_mul(86_400)?));
    }
    parse_duration(t)
}
