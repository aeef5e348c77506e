//! Cache invalidation between nodes: what a node publishes when it changes a record, and the
//! subscriber that applies what other nodes publish.

use super::schema::CHANNEL;
use super::RedisStore;
use crate::store::{Invalidation, InvalidationSink, StoreError};
use futures_util::StreamExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

impl RedisStore {
    /// Tells every node to drop `message`'s record from its caches; `Err` when Redis did not
    /// take the message.
    pub(super) async fn publish(&self, message: String) -> Result<(), StoreError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(CHANNEL).arg(message);
        self.cmd::<i64>(&cmd).await.map(|_| ()).inspect_err(|e| {
            tracing::warn!(error = %e, "could not publish a cache invalidation");
        })
    }
}

/// How often the subscriber pings its own connection, and how long a silent one is still
/// believed: past it, the node does not answer from its caches alone.
pub(super) const HEARTBEAT_EVERY: Duration = Duration::from_millis(50);
pub(super) const SILENCE_TOLERATED: Duration = Duration::from_millis(200);

/// When this node's subscriber last heard anything on the channel.
#[derive(Debug)]
pub(super) struct Liveness {
    start: Instant,
    /// Nanoseconds since `start`; 0 when never heard.
    heard_ns: AtomicU64,
}

impl Liveness {
    pub(super) fn new() -> Self {
        Self {
            start: Instant::now(),
            heard_ns: AtomicU64::new(0),
        }
    }

    fn heard(&self) {
        let ns = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.heard_ns.store(ns.max(1), Ordering::Release);
    }

    /// The subscription is gone (its stream ended, a ping failed): nothing is believed from
    /// the caches alone until the next subscription is made (which flushes them).
    fn lost(&self) {
        self.heard_ns.store(0, Ordering::Release);
    }

    pub(super) fn confirmed(&self) -> bool {
        let heard = self.heard_ns.load(Ordering::Acquire);
        let now = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        heard != 0
            && now.saturating_sub(heard)
                < u64::try_from(SILENCE_TOLERATED.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// Listens on the invalidation channel; after every (re)subscription the local caches are
/// flushed, since anything published while away was missed.
pub(super) async fn subscribe(
    source: super::connection::PubsubSource,
    sink: InvalidationSink,
    liveness: Arc<Liveness>,
) {
    let mut attempt = 0usize;
    loop {
        let client = source.client(attempt).await;
        attempt = attempt.wrapping_add(1);
        let connected = match client {
            Ok(client) => {
                tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub()).await
            }
            Err(e) => Ok(Err(e)),
        };
        if let Ok(Ok(mut pubsub)) = connected {
            if pubsub.subscribe(CHANNEL).await.is_ok() {
                sink(Invalidation::All);
                liveness.heard();
                // The subscription proves it is alive: a PING on its own connection every
                // HEARTBEAT_EVERY (a half-open connection shows within SILENCE_TOLERATED).
                let (mut pings, mut messages) = pubsub.split();
                let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
                loop {
                    tokio::select! {
                        msg = messages.next() => {
                            let Some(msg) = msg else { break };
                            liveness.heard();
                            let Ok(payload) = msg.get_payload::<String>() else {
                                continue;
                            };
                            match payload.split_once(' ') {
                                Some(("k", hash)) => sink(Invalidation::Key(hash.to_owned())),
                                Some(("a", account)) => {
                                    sink(Invalidation::Account(account.to_owned()))
                                }
                                _ => sink(Invalidation::All),
                            }
                        }
                        _ = tick.tick() => {
                            let pong = tokio::time::timeout(
                                SILENCE_TOLERATED / 2,
                                pings.ping::<redis::Value>(),
                            )
                            .await;
                            match pong {
                                Ok(Ok(_)) => liveness.heard(),
                                _ => break,
                            }
                        }
                    }
                }
                // Deaf from now on, not from SILENCE_TOLERATED after the last ping: a change
                // published meanwhile would be missed. The caches still answer when the store
                // cannot (an outage must not turn cached callers away); the flush comes with
                // the resubscription.
                liveness.lost();
                tracing::warn!("invalidation channel lost; resubscribing");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_subscription_is_not_believed_until_heard_again() {
        let l = Liveness::new();
        assert!(!l.confirmed(), "never heard");
        l.heard();
        assert!(l.confirmed());
        l.lost();
        assert!(
            !l.confirmed(),
            "lost at once, not after the silence tolerated"
        );
        l.heard();
        assert!(l.confirmed());
    }
}
