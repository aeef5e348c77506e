//! Memory held by the gateway's key caches, measured as the RSS delta (`/proc/self/statm`)
//! of filling `BoundedCache`s shaped like `auth::Directory`'s:
//!
//! * positive key cache: `KeyHash -> (Arc<CachedKey>, key id header value)` (records as
//!   `manage` creates them, slimmed the way `Directory` caches them);
//! * account cache: `String -> (Arc<Account>, account id header value)` (one account per 10
//!   keys, the Pro plan's cap);
//! * negative cache: `KeyHash -> ()` (unknown keys).
//!
//! `cargo run --release --example cache_memory [-- ENTRIES]` (default 100000). Linux only.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use http::HeaderValue;
use msgflash_gateway::auth::api_key::{random_id, KeyHash, NewKey};
use msgflash_gateway::auth::CachedKey;
use msgflash_gateway::cache::BoundedCache;
use msgflash_gateway::store::{Account, KeyRecord, Subscription};
use std::sync::Arc;

const TTL_NS: u64 = 3_600_000_000_000;

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let resident: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("statm resident field");
    resident * page_size()
}

fn page_size() -> u64 {
    // Every Linux target the gateway runs on uses 4 KiB base pages; smaps says so if not.
    std::fs::read_to_string("/proc/self/smaps")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("KernelPageSize:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(4096, |kb| kb * 1024)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn report(what: &str, before: u64, after: u64, entries: usize) {
    let delta = after.saturating_sub(before);
    println!(
        "{what:<34} {:>8.1} MiB for {entries} entries = {:>5} bytes/entry, {:>6.1} MiB per 100k",
        mib(delta),
        delta / entries.max(1) as u64,
        mib(delta) * 100_000.0 / entries.max(1) as f64
    );
}

fn main() {
    let entries: usize = std::env::args()
        .nth(1)
        .map(|v| v.parse().expect("ENTRIES: a number"))
        .unwrap_or(100_000);
    let accounts_n = entries.div_ceil(10);

    // Shards fill unevenly (16 shards of capacity/16 each), so give 10 % headroom: every
    // entry inserted stays and the figure is per entry actually held.
    let capacity = entries + entries / 10;
    // Records are built inside the measured section: their strings are what the cache holds.
    // Temporaries (the key itself, hex buffers) are freed at once and reused by the allocator.
    let start = rss_bytes();
    let key_cache: BoundedCache<KeyHash, (Arc<CachedKey>, HeaderValue)> =
        BoundedCache::new(capacity, TTL_NS);
    for i in 0..entries {
        let key = NewKey::generate().expect("random");
        let record = KeyRecord {
            id: random_id("key_").expect("random"),
            account_id: format!("acct_{:08}", i / 10),
            name: "production".to_owned(),
            hash: key.hash().to_hex(),
            prefix: key.display_prefix(),
            last4: key.last4(),
            scopes: Vec::new(),
            instance_ids: Vec::new(),
            created_at_ms: 1_764_000_000_000,
            last_used_at_ms: None,
            revoked_at_ms: None,
        };
        let id_value = HeaderValue::from_str(&record.id).expect("id");
        let cached = CachedKey::of(record).expect("a plain record");
        key_cache.insert(key.hash(), (Arc::new(cached), id_value), 0);
    }
    let after_keys = rss_bytes();

    let account_cache: BoundedCache<String, (Arc<Account>, HeaderValue)> =
        BoundedCache::new(capacity, TTL_NS);
    for i in 0..accounts_n {
        let account = Account {
            id: format!("acct_{i:08}"),
            plan: "pro".to_owned(),
            subscription: Subscription::Active,
            quota_anchor_day: 1,
            created_at_ms: 1_764_000_000_000,
            updated_at_ms: 1_764_000_000_000,
        };
        let id_value = HeaderValue::from_str(&account.id).expect("id");
        account_cache.insert(account.id.clone(), (Arc::new(account), id_value), 0);
    }
    let after_accounts = rss_bytes();

    let unknown: BoundedCache<KeyHash, ()> = BoundedCache::new(capacity, TTL_NS);
    for _ in 0..entries {
        unknown.insert(NewKey::generate().expect("random").hash(), (), 0);
    }
    let after_unknown = rss_bytes();

    println!(
        "held: {} keys, {} accounts, {} unknown keys",
        key_cache.len(),
        account_cache.len(),
        unknown.len()
    );
    println!("msgflash-gateway cache memory (RSS delta from /proc/self/statm)");
    report(
        "key cache (KeyHash -> CachedKey)",
        start,
        after_keys,
        entries,
    );
    report(
        &format!("account cache ({accounts_n} accounts)"),
        after_keys,
        after_accounts,
        accounts_n,
    );
    report(
        "negative cache (KeyHash -> ())",
        after_accounts,
        after_unknown,
        entries,
    );
    report("keys + their accounts", start, after_accounts, entries);
    println!(
        "total for {entries} cached keys, their accounts and {entries} unknown keys: {:.1} MiB",
        mib(after_unknown.saturating_sub(start))
    );
    std::hint::black_box((&key_cache, &account_cache, &unknown));
}
