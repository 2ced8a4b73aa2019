//! The per-store request quota: a token bucket refilled continuously at the configured rate
//! and holding at most one second's worth, so a store takes short bursts up to its rate but
//! never more than the rate over any second on average.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use super::error::{ErrorKind, KmsError, KmsResult};

/// The cryptographic request quota of every custom key store.
pub struct Quotas {
    /// Requests per second per store; 0 = no quota.
    rate: u32,
    by_store: RwLock<HashMap<String, Arc<Quota>>>,
}

impl Quotas {
    pub fn per_second(rate: u32) -> Quotas {
        Quotas {
            rate,
            by_store: RwLock::new(HashMap::new()),
        }
    }

    /// Takes one request from the store's quota, or answers ThrottlingException.
    pub fn admit(&self, store_id: &str) -> KmsResult<()> {
        if self.rate == 0 {
            return Ok(());
        }
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
                .or_insert_with(|| Arc::new(Quota::per_second(self.rate)))
                .clone(),
        };
        if quota.try_take() {
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
    rate: f64,
    /// (tokens available, when last refilled).
    bucket: Mutex<(f64, Instant)>,
}

impl Quota {
    pub fn per_second(rate: u32) -> Quota {
        let rate = f64::from(rate.max(1));
        Quota {
            rate,
            bucket: Mutex::new((rate, Instant::now())),
        }
    }

    /// Takes a token if one is there.
    pub fn try_take(&self) -> bool {
        self.take_at(Instant::now())
    }

    fn take_at(&self, now: Instant) -> bool {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let earned = now.saturating_duration_since(b.1).as_secs_f64() * self.rate;
        b.0 = (b.0 + earned).min(self.rate);
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
        let q = Quota::per_second(10);
        let t0 = Instant::now();
        let first: usize = (0..25).filter(|_| q.take_at(t0)).count();
        assert_eq!(first, 10, "a full bucket holds one second's worth");
        assert!(
            !q.take_at(t0 + Duration::from_millis(50)),
            "half a token is not a token"
        );
        assert!(q.take_at(t0 + Duration::from_millis(100)));
        let later = t0 + Duration::from_secs(60);
        let burst: usize = (0..25).filter(|_| q.take_at(later)).count();
        assert_eq!(
            burst, 10,
            "an idle minute refills one second's worth, no more"
        );
    }
}
