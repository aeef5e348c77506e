//! Cache invalidation between nodes: what a node publishes when it changes a record, and the
//! subscriber that applies what other nodes publish.

use super::schema::CHANNEL;
use super::RedisStore;
use crate::store::{Invalidation, InvalidationSink, StoreError};
use futures_util::StreamExt;
use std::time::Duration;

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

/// Listens on the invalidation channel; after every (re)subscription the local caches are
/// flushed, since anything published while away was missed.
pub(super) async fn subscribe(clients: Vec<redis::Client>, sink: InvalidationSink) {
    let mut attempt = 0usize;
    loop {
        let client = &clients[attempt % clients.len()];
        attempt = attempt.wrapping_add(1);
        let connected =
            tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub()).await;
        if let Ok(Ok(mut pubsub)) = connected {
            if pubsub.subscribe(CHANNEL).await.is_ok() {
                sink(Invalidation::All);
                let mut messages = pubsub.on_message();
                while let Some(msg) = messages.next().await {
                    let Ok(payload) = msg.get_payload::<String>() else {
                        continue;
                    };
                    match payload.split_once(' ') {
                        Some(("k", hash)) => sink(Invalidation::Key(hash.to_owned())),
                        Some(("a", account)) => sink(Invalidation::Account(account.to_owned())),
                        _ => sink(Invalidation::All),
                    }
                }
                // Keep serving from the caches while away (an outage must not turn cached
                // callers away); the flush comes with the resubscription.
                tracing::warn!("invalidation channel lost; resubscribing");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
