//! Micro-benchmarks of the pieces on the request path (`cargo bench --bench pieces`).
//! Performance is reported here, never asserted; docs/benchmarks.md keeps the figures.
#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use msgflash_gateway::auth::api_key::{is_well_formed, KeyHash, NewKey};
use msgflash_gateway::auth::jwt::{mint_hs256, JwtVerifier, MintRequest};
use msgflash_gateway::cache::BoundedCache;
use msgflash_gateway::config::JwtSettings;
use msgflash_gateway::errors::GatewayError;
use msgflash_gateway::limits::gcra::{decide, BucketParams};
use std::sync::Arc;
use std::time::Duration;

const NOW_UNIX: i64 = 1_764_000_000;
const NOW_NS: u64 = 1_764_000_000_000_000_000;

fn key_parse_and_hash(c: &mut Criterion) {
    let key = NewKey::generate().expect("random");
    let key = key.expose().as_bytes().to_vec();
    c.bench_function("api_key/is_well_formed", |b| {
        b.iter(|| is_well_formed(black_box(&key)))
    });
    c.bench_function("api_key/is_well_formed+KeyHash::of", |b| {
        b.iter(|| {
            let k = black_box(&key);
            is_well_formed(k).then(|| KeyHash::of(k))
        })
    });
}

fn cache_lookup(c: &mut Criterion) {
    const N: usize = 100_000;
    let cache: BoundedCache<KeyHash, Arc<String>> = BoundedCache::new(N, u64::MAX / 4);
    let hashes: Vec<KeyHash> = (0..N)
        .map(|_| NewKey::generate().expect("random").hash())
        .collect();
    for (i, h) in hashes.iter().enumerate() {
        cache.insert(*h, Arc::new(format!("key_{i:024}")), 0);
    }
    let missing = NewKey::generate().expect("random").hash();
    let mut i = 0usize;
    c.bench_function("cache/get hit (100k entries)", |b| {
        b.iter(|| {
            i = (i + 7919) % N;
            cache.get(black_box(&hashes[i]), NOW_NS)
        })
    });
    c.bench_function("cache/get miss (100k entries)", |b| {
        b.iter(|| cache.get(black_box(&missing), NOW_NS))
    });
}

fn jwt_verify(c: &mut Criterion) {
    let secret = "bench-jwt-secret-of-a-reasonable-length";
    let settings = JwtSettings {
        algorithms: vec![jsonwebtoken::Algorithm::HS256],
        secret_env: "MSGFLASH_JWT_SECRET".to_owned(),
        secret: Some(secret.to_owned()),
        issuer: Some("msgflash".to_owned()),
        audience: Some("msgflash-console".to_owned()),
        account_claim: "account_id".to_owned(),
        leeway: Duration::from_secs(30),
        public_keys: Vec::new(),
        jwks: None,
    };
    let verifier = JwtVerifier::new(&settings).expect("verifier");
    let token = mint_hs256(&MintRequest {
        secret,
        account_claim: "account_id",
        account_id: "acct_00000001",
        sub: Some("user-1"),
        issuer: Some("msgflash"),
        audience: Some("msgflash-console"),
        now_unix: NOW_UNIX,
        ttl_secs: 3600,
    })
    .expect("mint");
    assert!(verifier.verify(&token, NOW_UNIX).is_ok());
    c.bench_function("jwt/verify HS256", |b| {
        b.iter(|| verifier.verify_uncached(black_box(&token), NOW_UNIX))
    });
    c.bench_function("jwt/verify HS256, cached", |b| {
        b.iter(|| verifier.verify(black_box(&token), NOW_UNIX))
    });
}

fn limiter_decision(c: &mut Criterion) {
    let params = BucketParams {
        rate_per_second: 10,
        burst: 10,
    };
    c.bench_function("gcra/decide allow", |b| {
        b.iter(|| decide(black_box(Some(NOW_NS - 1)), black_box(NOW_NS), params))
    });
    c.bench_function("gcra/decide deny", |b| {
        b.iter(|| {
            decide(
                black_box(Some(NOW_NS + 2_000_000_000)),
                black_box(NOW_NS),
                params,
            )
        })
    });
}

fn error_body(c: &mut Criterion) {
    c.bench_function("errors/invalid_api_key().body()", |b| {
        b.iter(|| black_box(GatewayError::invalid_api_key()).body())
    });
    c.bench_function("errors/rate_limited(1).body()", |b| {
        b.iter(|| GatewayError::rate_limited(black_box(1)).body())
    });
}

criterion_group! {
    name = pieces;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);
    targets = key_parse_and_hash, cache_lookup, jwt_verify, limiter_decision, error_body
}
criterion_main!(pieces);
