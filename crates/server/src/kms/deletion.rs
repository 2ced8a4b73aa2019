//! Scheduled key deletion: the background task that deletes keys whose waiting period is over.
//!
//! A due key is first marked `Deleting` (invisible; CancelKeyDeletion no longer finds it), then
//! its token object is destroyed, then its metadata (tags and aliases with it) is removed. A
//! crash in between leaves a `Deleting` row, which the next pass finishes. When the key's
//! store is not connected, the material cannot be destroyed: it is left orphaned in the
//! cluster, and the log says so, naming its label (the key ARN) so an operator can remove it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use model::states::ConnectionState::*;

/// The shortest claim a sweeper takes on a key it deletes.
const DELETION_LEASE_MS: i64 = 30_000;
use super::Kms;
use crate::metadata::{Failure, Removal};

impl Kms {
    /// Claims (or renews the claim on) a key for this replica's sweep: one due for deletion,
    /// or one whose creation was abandoned. Returns the instant until which this replica may
    /// start destroying the key's material (half the lease, measured from before the claim:
    /// the other half is margin for the replicas' clocks); none when the key no longer
    /// qualifies (a deletion cancelled, a creation finished) or another replica holds it.
    pub(super) async fn claim_removal(
        &self,
        id: &uuid::Uuid,
        arn: &str,
        removal: Removal,
    ) -> Option<Instant> {
        let lease_ms =
            (4 * self.connections.settings().call_timeout_ms as i64).max(DELETION_LEASE_MS);
        let asked = Instant::now();
        match self
            .meta
            .claim_removal(id, removal, self.now(), &self.replica, lease_ms)
            .await
        {
            Ok(()) => Some(asked + Duration::from_millis(lease_ms as u64 / 2)),
            Err(Failure::NotFound) => None,
            Err(e) => {
                tracing::error!(key_arn = %arn, error = %e, "claiming a key for removal failed");
                None
            }
        }
    }

    /// Deletes every key whose deletion date has passed; returns how many were deleted.
    pub async fn delete_due_keys(&self) -> usize {
        let now = self.now();
        let due = match self.meta.keys_due(now, 100).await {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "listing keys due for deletion failed");
                return 0;
            }
        };
        let mut deleted = 0;
        for key in due {
            let arn = self.scope.key_arn(&key.id);
            // While the store is changing state, wait: deleting now would orphan material that
            // could be destroyed a moment later.
            let state = match self.keystore_state(&key.custom_key_store_id).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(key_arn = %arn, error = %e, "reading the key's store failed");
                    continue;
                }
            };
            let conn = self.connection(&key.custom_key_store_id);
            let reachable = match (state, &conn) {
                (Connected, Some(_)) => true,
                (Disconnected | Failed, _) => false,
                _ => continue,
            };
            if self
                .claim_removal(&key.id, &arn, Removal::Due)
                .await
                .is_none()
            {
                continue;
            }
            match conn.filter(|_| reachable) {
                Some(conn) => {
                    // Renewed right before the material goes: a sweeper frozen past its
                    // lease finds that another replica has taken the key over, and one
                    // frozen after the renewal does not destroy once its claim ran out.
                    let Some(until) = self.claim_removal(&key.id, &arn, Removal::Due).await else {
                        continue;
                    };
                    if let Err(e) = conn.destroy_key_before(key.id, Some(until)).await {
                        // Keep the row (Deleting) and try again on the next pass.
                        tracing::warn!(key_arn = %arn, error = ?e, "destroying key material failed; will retry");
                        continue;
                    }
                }
                None => {
                    crate::metrics::get().orphaned();
                    tracing::warn!(
                        key_arn = %arn,
                        label = %arn,
                        custom_key_store_id = %key.custom_key_store_id,
                        "key deleted while its custom key store is disconnected: its key material \
                         is left orphaned in the cluster under this label"
                    );
                }
            }
            match self.meta.delete_key(&key.id).await {
                Ok(()) => {
                    deleted += 1;
                    tracing::info!(key_arn = %arn, "deleted key at the end of its waiting period");
                }
                Err(e) => {
                    tracing::error!(key_arn = %arn, error = %e, "removing key metadata failed")
                }
            }
        }
        deleted
    }

    /// Removes key creations abandoned after an HSM timeout: `Creating` rows older than any
    /// CreateKey can still be working on, in stores whose HSM answers.
    pub async fn sweep_abandoned_creations(&self) {
        let cutoff = self.creation_cutoff();
        let conns = self.connections.healthy();
        for (store_id, conn) in conns {
            self.reconcile_creating_keys(&store_id, &conn, cutoff).await;
        }
    }

    /// Runs `delete_due_keys` and the creation sweep every `interval` until the process ends.
    pub fn spawn_deletion_task(
        self: &Arc<Self>,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        self.spawn_every(interval, |kms| async move {
            kms.delete_due_keys().await;
            kms.sweep_abandoned_creations().await;
        })
    }

    /// Runs `work` every `interval` (the first time at once; a late tick delays the next
    /// rather than bunching them) until the process ends or the task is aborted.
    pub(crate) fn spawn_every<F, Fut>(
        self: &Arc<Self>,
        interval: Duration,
        work: F,
    ) -> tokio::task::JoinHandle<()>
    where
        F: Fn(Arc<Kms>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let kms = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                work(Arc::clone(&kms)).await;
            }
        })
    }
}
