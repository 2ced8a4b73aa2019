//! Prometheus metrics, rendered in the text exposition format on the admin port.
//!
//! One process-wide set (like the tracing subscriber): the layers record into it without
//! passing handles around. Gauges that describe current state (store connection states, the
//! session pools) are filled from the live service at scrape time, so they cannot go stale.

use std::sync::LazyLock;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Request {
    operation: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Stage {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HsmCall {
    function: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HsmError {
    function: &'static str,
    error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Store {
    custom_key_store_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreState {
    custom_key_store_id: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reconnect {
    custom_key_store_id: String,
    outcome: &'static str,
}

fn latency() -> Histogram {
    // 50 µs .. ~1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

pub struct Metrics {
    registry: Registry,
    requests: Family<Request, Histogram, fn() -> Histogram>,
    hsm_calls: Family<HsmCall, Histogram, fn() -> Histogram>,
    hsm_errors: Family<HsmError, Counter>,
    pool_size: Family<Store, Gauge>,
    pool_in_use: Family<Store, Gauge>,
    throttled: Family<Store, Counter>,
    store_requests: Family<Store, Counter>,
    store_hsm_errors: Family<Store, Counter>,
    store_state: Family<StoreState, Gauge>,
    reconnects: Family<Reconnect, Counter>,
    session_replacements: Counter,
    orphaned: Counter,
    session_waits: Family<Store, Histogram, fn() -> Histogram>,
    sessions_needed: Family<Store, Gauge>,
    aws_requests: Family<Stage, Gauge>,
    refusals_unrecorded: Counter,
    connections_evicted: Counter,
    key_lookup_failures: Family<Reason, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

pub fn get() -> &'static Metrics {
    &METRICS
}

/// The stages of an AWS protocol request (`Metrics::aws_stage`).
pub const AWS_STAGES: [&str; 3] = ["reading", "waiting", "serving"];

/// One request counted in a stage while this lives.
pub struct StageGuard(Gauge);

impl Drop for StageGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// A store's state as the `hsm_kms_store_state` gauge shows it: the AWS connection state, or
/// DEGRADED for a CONNECTED store whose HSM failed and which is reconnecting.
pub struct StoreSnapshot {
    pub id: String,
    pub state: &'static str,
    /// (sessions, busy sessions) of its live connection.
    pub pool: Option<(usize, usize)>,
}

impl Metrics {
    fn new() -> Metrics {
        let m = Metrics {
            registry: Registry::with_prefix("hsm_kms"),
            requests: Family::new_with_constructor(latency),
            hsm_calls: Family::new_with_constructor(latency),
            hsm_errors: Family::default(),
            pool_size: Family::default(),
            pool_in_use: Family::default(),
            throttled: Family::default(),
            store_state: Family::default(),
            store_requests: Family::default(),
            store_hsm_errors: Family::default(),
            reconnects: Family::default(),
            session_replacements: Counter::default(),
            orphaned: Counter::default(),
            session_waits: Family::new_with_constructor(latency),
            sessions_needed: Family::default(),
            aws_requests: Family::default(),
            refusals_unrecorded: Counter::default(),
            connections_evicted: Counter::default(),
            key_lookup_failures: Family::default(),
        };
        // The HSM errors an operator alerts on, at zero from the start (other return values
        // appear with their first occurrence).
        for function in [
            "C_Encrypt",
            "C_Decrypt",
            "C_GenerateKey",
            "C_DestroyObject",
            "C_GenerateRandom",
        ] {
            for error in ["Timeout", "DeviceError", "DeviceRemoved", "TokenNotPresent"] {
                let _ = m.hsm_errors.get_or_create(&HsmError {
                    function,
                    error: error.to_string(),
                });
            }
        }
        for reason in ["missing", "ambiguous"] {
            let _ = m.key_lookup_failures.get_or_create(&Reason { reason });
        }
        // Every stage shows from the start, at zero.
        for stage in AWS_STAGES {
            let _ = m.aws_requests.get_or_create(&Stage { stage });
        }
        let mut r = m.registry;
        r.register(
            "request_duration_seconds",
            "gRPC KMS requests by operation and outcome (ok or the AWS exception name)",
            m.requests.clone(),
        );
        r.register(
            "hsm_call_duration_seconds",
            "HSM operations by their main PKCS#11 function, queueing excluded",
            m.hsm_calls.clone(),
        );
        r.register(
            "hsm_call_errors",
            "Failed HSM operations by PKCS#11 function and return value",
            m.hsm_errors.clone(),
        );
        r.register(
            "session_pool_size",
            "PKCS#11 sessions (worker threads) of each connected store",
            m.pool_size.clone(),
        );
        r.register(
            "session_pool_in_use",
            "PKCS#11 sessions busy with an operation",
            m.pool_in_use.clone(),
        );
        r.register(
            "throttled_requests",
            "Cryptographic requests refused with ThrottlingException",
            m.throttled.clone(),
        );
        r.register(
            "store_requests",
            "Cryptographic requests each store's quota admitted",
            m.store_requests.clone(),
        );
        r.register(
            "store_hsm_errors",
            "Requests on each store whose HSM call failed (unreachable, timed out, or an HSM error)",
            m.store_hsm_errors.clone(),
        );
        r.register(
            "store_state",
            "1 for each store's current state (DEGRADED: CONNECTED but its HSM failed)",
            m.store_state.clone(),
        );
        r.register(
            "reconnects",
            "Automatic reconnection attempts after device errors, by outcome",
            m.reconnects.clone(),
        );
        r.register(
            "session_replacements",
            "PKCS#11 sessions replaced after a session-tier error",
            m.session_replacements.clone(),
        );
        r.register(
            "orphaned_key_material",
            "Key material left on a token because its store was unreachable at deletion",
            m.orphaned.clone(),
        );
        r.register(
            "session_wait_duration_seconds",
            "Time HSM operations waited in the queue for a free PKCS#11 session",
            m.session_waits.clone(),
        );
        r.register(
            "session_pool_needed",
            "Sessions the store's load of the last 10 s needed to run without waiting \
             (throughput x (wait + HSM time)); compare with session_pool_size",
            m.sessions_needed.clone(),
        );
        r.register(
            "aws_requests",
            "AWS protocol requests by stage: reading (body arriving, caller not yet known), \
             waiting (signed, for a request slot) and serving",
            m.aws_requests.clone(),
        );
        r.register(
            "unauthenticated_refusals_unrecorded",
            "Requests refused before authentication and left out of the audit trail by its \
             per-source and overall limits (counted in the next recorded line of the source)",
            m.refusals_unrecorded.clone(),
        );
        r.register(
            "connections_evicted",
            "Connections closed to make room because they had made no authenticated request",
            m.connections_evicted.clone(),
        );
        r.register(
            "key_lookup_failures",
            "Key token objects still missing or found more than once after every lookup",
            m.key_lookup_failures.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// The session-wait histogram and the sessions-needed gauge of a store, for its
    /// connection to hold (no label lookup per request).
    pub fn session_queue(&self, store: &str) -> (Histogram, Gauge) {
        let label = Store {
            custom_key_store_id: store.to_string(),
        };
        (
            self.session_waits.get_or_create(&label).clone(),
            self.sessions_needed.get_or_create(&label).clone(),
        )
    }

    /// Counts one AWS protocol request in `stage` until the guard is dropped.
    pub fn aws_stage(&self, stage: &'static str) -> StageGuard {
        let gauge = self.aws_requests.get_or_create(&Stage { stage }).clone();
        gauge.inc();
        StageGuard(gauge)
    }

    pub fn key_lookup_failed(&self, reason: &'static str) {
        self.key_lookup_failures
            .get_or_create(&Reason { reason })
            .inc();
    }

    pub fn connection_evicted(&self) {
        self.connections_evicted.inc();
    }

    pub fn refusal_unrecorded(&self) {
        self.refusals_unrecorded.inc();
    }

    pub fn request(&self, operation: &'static str, outcome: &'static str, took: Duration) {
        self.requests
            .get_or_create(&Request { operation, outcome })
            .observe(took.as_secs_f64());
    }

    pub fn hsm_call(&self, function: &'static str, took: Duration) {
        self.hsm_calls
            .get_or_create(&HsmCall { function })
            .observe(took.as_secs_f64());
    }

    pub fn hsm_error(&self, function: &'static str, error: String) {
        self.hsm_errors
            .get_or_create(&HsmError { function, error })
            .inc();
    }

    pub fn throttled(&self, store: &str) {
        self.throttled
            .get_or_create(&Store {
                custom_key_store_id: store.to_string(),
            })
            .inc();
    }

    /// The counter of a store's cryptographic requests admitted by its quota (kept by the
    /// quota, so that counting one costs an increment).
    pub fn store_requests(&self, store: &str) -> Counter {
        self.store_requests
            .get_or_create(&Store {
                custom_key_store_id: store.to_string(),
            })
            .clone()
    }

    /// A request on a store whose HSM call failed (unreachable, timed out, or an error
    /// other than a ciphertext that does not authenticate).
    pub fn store_hsm_error(&self, store: &str) {
        self.store_hsm_errors
            .get_or_create(&Store {
                custom_key_store_id: store.to_string(),
            })
            .inc();
    }

    /// A store's (requests, throttled, HSM errors) since this process started.
    pub fn store_counts(&self, store: &str) -> (u64, u64, u64) {
        let label = Store {
            custom_key_store_id: store.to_string(),
        };
        let count = |f: &Family<Store, Counter>| f.get(&label).map(|c| c.get()).unwrap_or(0);
        (
            count(&self.store_requests),
            count(&self.throttled),
            count(&self.store_hsm_errors),
        )
    }

    pub fn reconnect(&self, store: &str, outcome: &'static str) {
        self.reconnects
            .get_or_create(&Reconnect {
                custom_key_store_id: store.to_string(),
                outcome,
            })
            .inc();
    }

    pub fn session_replaced(&self) {
        self.session_replacements.inc();
    }

    pub fn orphaned(&self) {
        self.orphaned.inc();
    }

    /// The text exposition of everything, with the state gauges set from `stores`.
    pub fn render(&self, stores: &[StoreSnapshot]) -> String {
        self.store_state.clear();
        self.pool_size.clear();
        self.pool_in_use.clear();
        for s in stores {
            let id = || s.id.clone();
            // The series operators alert on exist from the start, at zero, rather than
            // appearing with their first event.
            for family in [
                &self.throttled,
                &self.store_requests,
                &self.store_hsm_errors,
            ] {
                let _ = family.get_or_create(&Store {
                    custom_key_store_id: id(),
                });
            }
            for outcome in ["ok", "failed"] {
                let _ = self.reconnects.get_or_create(&Reconnect {
                    custom_key_store_id: id(),
                    outcome,
                });
            }
            self.store_state
                .get_or_create(&StoreState {
                    custom_key_store_id: id(),
                    state: s.state,
                })
                .set(1);
            if let Some((size, busy)) = s.pool {
                let store = Store {
                    custom_key_store_id: id(),
                };
                self.pool_size.get_or_create(&store).set(size as i64);
                self.pool_in_use.get_or_create(&store).set(busy as i64);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
