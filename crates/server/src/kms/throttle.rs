//! The per-store request quota: a token bucket refilled continuously at the configured rate
//! and holding at most one second's worth, so a store takes short bursts up to its rate but
//! never more than the rate over any second on average.
//!
//! The quota is the service's, not a replica's: with N live replicas (counted from their
//! heartbeats in the database) each enforces 1/N of it, with no database round trip per
//! request. A load balancer that spreads requests unevenly can see throttling below the
//! service's rate on the busier replica; never more than the rate in total.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use model::error::{ErrorKind, KmsError, KmsResult};

/// The cryptographic request quota of every custom key store.
pub struct Quotas {
    /// Requests per second per store, for the whole service; 0 = no quota.
    rate: u32,
    /// Live replicas sharing the rate (1 until a heartbeat says otherwise).
    replicas: AtomicU32,
    by_store: RwLock<HashMap<String, Arc<Quota>>>,
}

impl Quotas {
    pub fn per_second(rate: u32) -> Quotas {
        Quotas {
            rate,
            replicas: AtomicU32::new(1),
            by_store: RwLock::new(HashMap::new()),
        }
    }

    /// How many live replicas share the quota.
    pub fn set_replicas(&self, n: u32) {
        self.replicas.store(n.max(1), Ordering::Relaxed);
    }

    /// How many live replicas there are (1 without a database of replicas).
    pub fn replicas(&self) -> u32 {
        self.replicas.load(Ordering::Relaxed).max(1)
    }

    /// This replica's share of a store's rate, per second.
    fn share(&self) -> f64 {
        f64::from(self.rate) / f64::from(self.replicas.load(Ordering::Relaxed).max(1))
    }

    /// Takes one request from the store's quota, or answers ThrottlingException. Each
    /// admitted request is counted for the store (`hsm_kms_store_requests_total`, the
    /// console's store health), with or without a rate.
    pub fn admit(&self, store_id: &str) -> KmsResult<()> {
        let quota = self
            .by_store
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(store_id)
            .cloned();
        let quota = match quota {
            Some(q) => q,
            None => self
                .by_store
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(store_id.to_string())
                .or_insert_with(|| Arc::new(Quota::counted(self.share(), store_id)))
                .clone(),
        };
        if self.rate == 0 || quota.take_at(Instant::now(), self.share()) {
            quota.admitted.inc();
            Ok(())
        } else {
            crate::metrics::get().throttled(store_id);
            Err(KmsError::new(
                ErrorKind::Throttling,
                format!(
                    "Custom key store {store_id} is over its quota of {} cryptographic requests \
                     per second; retry with back-off",
                    self.rate
                ),
            ))
        }
    }
}

pub struct Quota {
    /// (tokens available, when last refilled).
    bucket: Mutex<(f64, Instant)>,
    /// The requests it admitted.
    admitted: prometheus_client::metrics::counter::Counter,
}

impl Quota {
    /// A full bucket for `rate` requests per second.
    pub fn new(rate: f64) -> Quota {
        Quota {
            bucket: Mutex::new((rate.max(1.0), Instant::now())),
            admitted: Default::default(),
        }
    }

    /// A full bucket for `rate` requests per second, counting what it admits as the
    /// store's requests in the metrics.
    fn counted(rate: f64, store_id: &str) -> Quota {
        Quota {
            admitted: crate::metrics::get().store_requests(store_id),
            ..Quota::new(rate)
        }
    }

    /// Takes a token if one is there, the bucket refilled at `rate` per second and holding
    /// one second's worth (at least one request).
    fn take_at(&self, now: Instant, rate: f64) -> bool {
        let rate = rate.max(1.0);
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let earned = now.saturating_duration_since(b.1).as_secs_f64() * rate;
        b.0 = (b.0 + earned).min(rate);
        b.1 = now.max(b.1);
        if b.0 >= 1.0 {
            b.0 -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_holds_one_second_and_refills_at_the_rate() {
        let q = Quota::new(10.0);
        let t0 = Instant::now();
        let first: usize = (0..25).filter(|_| q.take_at(t0, 10.0)).count();
        assert_eq!(first, 10, "a full bucket holds one second's worth");
        assert!(
            !q.take_at(t0 + Duration::from_millis(50), 10.0),
            "half a token is not a token"
        );
        assert!(q.take_at(t0 + Duration::from_millis(100), 10.0));
        let later = t0 + Duration::from_secs(60);
        let burst: usize = (0..25).filter(|_| q.take_at(later, 10.0)).count();
        assert_eq!(
            burst, 10,
            "an idle minute refills one second's worth, no more"
        );
    }

    #[test]
    fn live_replicas_share_the_rate() {
        let quotas = Quotas::per_second(100);
        quotas.set_replicas(4);
        let admitted = (0..200).filter(|_| quotas.admit("cks-1").is_ok()).count();
        assert!((25..=26).contains(&admitted), "{admitted} of a 25 share");
        quotas.set_replicas(0);
        assert_eq!(quotas.share(), 100.0, "never fewer than one replica");
    }
}
