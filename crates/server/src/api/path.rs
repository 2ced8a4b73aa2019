//! The request path every operation takes, whatever the transport: the caller as the
//! transport named them, the operation, then the audit record, the metrics and the failure
//! log around the domain call. A transport names the caller, maps its wire request to a
//! domain call and back, and turns a refusal into its own error form; nothing else.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing::Instrument;

use crate::audit::Audit;
use crate::kms::access::Caller;
use crate::kms::gate::Gate;
use crate::kms::Kms;
use model::error::{ErrorKind, KmsError, KmsResult};
use model::op::Op;

use super::failures;

/// One request in flight: its operation, id, start time and caller.
pub struct Call {
    pub op: Op,
    pub started: std::time::Instant,
    /// The id of the request's audit line, given to the caller on a refusal.
    pub request_id: uuid::Uuid,
    /// Who is calling, or why the transport could not tell (answered as the refusal).
    pub caller: KmsResult<Caller>,
    /// Where the request came from, known even when the caller is not.
    pub source: Option<SocketAddr>,
}

impl Call {
    pub fn new(op: Op, caller: KmsResult<Caller>, source: Option<SocketAddr>) -> Call {
        Call {
            op,
            started: std::time::Instant::now(),
            request_id: request_id(),
            caller,
            source,
        }
    }
}

/// The domain and the audit trail, shared by every transport.
pub struct RequestPath {
    kms: Arc<Kms>,
    audit: Arc<Audit>,
    refusals: Refusals,
}

impl RequestPath {
    pub fn new(kms: Arc<Kms>, audit: Arc<Audit>) -> RequestPath {
        RequestPath {
            kms,
            audit,
            refusals: Refusals::default(),
        }
    }

    pub fn kms(&self) -> &Arc<Kms> {
        &self.kms
    }

    /// Runs `call` through `handle` with the request's `Gate`: refuses it unless the audit
    /// trail can record it,
    /// records it (with `encryption_context` if the operation records one), answers only
    /// once its line is written, and counts and logs the outcome. An operation that changes
    /// state first has an `intent` line written (naming `target`, what the request names),
    /// and runs only once that line has reached the operating system: a replica that dies
    /// between making the change and writing its outcome leaves the change in the trail. The span is debug-level:
    /// an enabled span per request costs measurable throughput (bench), so failures name
    /// the operation in their own event instead.
    pub async fn run<T>(
        &self,
        call: &Call,
        encryption_context: Option<BTreeMap<String, String>>,
        target: Option<String>,
        handle: impl AsyncFnOnce(&Arc<Kms>, Gate<'_>) -> KmsResult<T>,
    ) -> KmsResult<T> {
        let op = call.op.name();
        // Fail closed: nothing is done that the audit trail could not record.
        if !self.audit.available() {
            self.audit.refused();
            return Err(self.refused(call, unaudited()));
        }
        if let (Ok(caller), true) = (&call.caller, call.op.changes_state()) {
            let intent = self.audit.record(crate::audit::Entry {
                time_ms: model::now_ms(),
                request_id: call.request_id,
                principal: Some(Arc::clone(&caller.principal)),
                source: call.source,
                operation: op,
                resources: target
                    .map(model::principal::Resource::Named)
                    .into_iter()
                    .collect(),
                encryption_context: None,
                request_metadata: None,
                outcome: INTENT,
                error: None,
                unrecorded_refusals: None,
            });
            if !intent.written().await {
                return Err(self.refused(call, unaudited()));
            }
        }
        let outcome = async {
            let caller = call.caller.as_ref().map_err(Clone::clone)?;
            // The request's one gate: the front's mapping names what the request acts on,
            // and the gate decides by the operation's scope before any domain method runs
            // (a domain method takes the `Authorized` only the gate makes).
            let done = handle(&self.kms, Gate::new(caller, call.op)).await?;
            // A mapping that answered success without passing its gate is a defect, and
            // is not answered as a success.
            if !caller.authorized_for(call.op.scope()) {
                return Err(KmsError::internal(format!(
                    "{op} succeeded without the authorization its scope ({:?}) needs",
                    call.op.scope()
                )));
            }
            // Access taken away is in force on every live replica before the caller hears
            // that it is (see metadata::postgres::cache).
            if call.op.revokes_access() {
                tokio::time::sleep(self.kms.revocation_fence()).await;
            }
            Ok(done)
        }
        .instrument(tracing::debug_span!("kms", op))
        .await;
        let caller = call.caller.as_ref().ok();
        // A request refused before anyone is known to be calling: its content is the
        // attacker's to choose, so none is recorded, and its lines are limited per source
        // (`Refusals`), so that no one without credentials can fill the audit disk.
        let unrecorded_refusals = match caller {
            Some(_) => None,
            None => match self.refusals.admit(call.source) {
                Some(left_out) => Some(left_out),
                None => return Err(self.refused(call, outcome.err().unwrap_or_else(unaudited))),
            },
        };
        // The keys of a successful cryptographic operation, for GetKeyLastUsage.
        let used = match (caller, &outcome) {
            (Some(c), Ok(_)) if call.op.cryptographic() => c.noted_keys(),
            _ => Vec::new(),
        };
        // What the operation records of its request: its encryption context, or an XKS
        // request's requestMetadata (only of a known caller: a refused request's content is
        // the attacker's to choose).
        let recorded = encryption_context.filter(|c| caller.is_some() && !c.is_empty());
        let (encryption_context, request_metadata) =
            match call.op.recorded() == model::op::Recorded::RequestMetadata {
                true => (None, recorded),
                false => (recorded, None),
            };
        let receipt = self.audit.record(crate::audit::Entry {
            time_ms: model::now_ms(),
            request_id: call.request_id,
            principal: caller.map(|c| Arc::clone(&c.principal)),
            source: call.source,
            operation: op,
            resources: caller.map(|c| c.take_resources()).unwrap_or_default(),
            encryption_context,
            request_metadata,
            outcome: match &outcome {
                Ok(_) => "allowed",
                Err(e) if e.kind == ErrorKind::AccessDenied => "denied",
                Err(_) => "failed",
            },
            error: outcome.as_ref().err().map(|e| e.kind.aws_name()),
            unrecorded_refusals: unrecorded_refusals.filter(|n| *n > 0),
        });
        // No answer before the request's line has reached the operating system.
        let outcome = if receipt.written().await {
            outcome
        } else {
            Err(unaudited())
        };
        match outcome {
            Ok(v) => {
                if !used.is_empty() {
                    self.kms.note_key_use(&used, call.op, call.request_id);
                }
                crate::metrics::get().request(op, "ok", call.started.elapsed());
                Ok(v)
            }
            Err(e) => Err(self.refused(call, e)),
        }
    }

    /// Counts and logs a refused or failed request.
    fn refused(&self, call: &Call, e: KmsError) -> KmsError {
        let op = call.op.name();
        crate::metrics::get().request(op, e.kind.aws_name(), call.started.elapsed());
        failures::note(
            op,
            e.kind.aws_name(),
            &e.message,
            &call.request_id,
            call.source,
        );
        e
    }
}

/// The outcome of the line written before a state change runs; its outcome line (same
/// `request_id`) follows, unless the replica died in between.
pub const INTENT: &str = "intent";

/// How many refusals before authentication are recorded one by one: per source address,
/// `PER_SOURCE_BURST` at once and `PER_SOURCE_RATE` a second after that; over all sources,
/// `ALL_BURST` and `ALL_RATE` (addresses are cheap on loopback and in IPv6). The rest are
/// counted, in the metrics and in the next recorded line of the same source. So refusals
/// cost the audit file at most ALL_RATE lines a second (about 400 bytes each) after a burst.
const PER_SOURCE_RATE: f64 = 5.0;
const PER_SOURCE_BURST: f64 = 20.0;
const ALL_RATE: f64 = 50.0;
const ALL_BURST: f64 = 200.0;
/// Sources remembered at most; past it, the quietest are forgotten.
const SOURCES: usize = 4096;

/// A token bucket: `tokens` at `at`.
#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    fn refill(&mut self, rate: f64, burst: f64, now: Instant) {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(burst);
        self.at = now;
    }
}

/// The per-source and overall budgets of recorded refusals before authentication.
#[derive(Default)]
struct Refusals {
    state: Mutex<RefusalState>,
}

#[derive(Default)]
struct RefusalState {
    all: Option<Bucket>,
    /// Each source's bucket and the refusals left out since its last recorded one.
    sources: HashMap<Option<IpAddr>, (Bucket, u64)>,
}

impl Refusals {
    /// Whether a refusal from `source` is recorded: Some(refusals of that source left out
    /// since its last recorded one), or None (left out, and counted).
    fn admit(&self, source: Option<SocketAddr>) -> Option<u64> {
        let now = Instant::now();
        let ip = source.map(|s| s.ip());
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.sources.len() >= SOURCES && !state.sources.contains_key(&ip) {
            // Forget the sources that have been quiet long enough to have a full bucket (what
            // they had left out stays counted in the metrics).
            state.sources.retain(|_, (b, _)| {
                b.refill(PER_SOURCE_RATE, PER_SOURCE_BURST, now);
                b.tokens < PER_SOURCE_BURST
            });
            if state.sources.len() >= SOURCES {
                crate::metrics::get().refusal_unrecorded();
                return None;
            }
        }
        let all = state.all.get_or_insert(Bucket::full(ALL_BURST, now));
        all.refill(ALL_RATE, ALL_BURST, now);
        let all_ok = all.tokens >= 1.0;
        let (bucket, left) = state
            .sources
            .entry(ip)
            .or_insert((Bucket::full(PER_SOURCE_BURST, now), 0));
        bucket.refill(PER_SOURCE_RATE, PER_SOURCE_BURST, now);
        if bucket.tokens >= 1.0 && all_ok {
            bucket.tokens -= 1.0;
            let left = std::mem::take(left);
            if let Some(all) = state.all.as_mut() {
                all.tokens -= 1.0;
            }
            Some(left)
        } else {
            *left += 1;
            crate::metrics::get().refusal_unrecorded();
            None
        }
    }
}

/// The answer when the audit trail cannot record a request: KMSInternalException, which AWS
/// SDKs retry.
fn unaudited() -> KmsError {
    KmsError::new(
        ErrorKind::KmsInternal,
        "The request was refused because the audit trail cannot be written",
    )
}

/// A request id: a version-4 UUID from a per-process random prefix and a counter, unique
/// without a system call per request.
pub(crate) fn request_id() -> uuid::Uuid {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::LazyLock;
    static PREFIX: LazyLock<u64> = LazyLock::new(|| {
        let mut b = [0u8; 8];
        // Without the OS RNG the ids are still unique in this process (the counter).
        let _ = getrandom::fill(&mut b);
        u64::from_le_bytes(b)
    });
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&PREFIX.to_be_bytes());
    bytes[8..].copy_from_slice(&n.to_be_bytes());
    // Sets the version and variant bits: the counter's top bits, untouched for 2^62 ids.
    uuid::Builder::from_random_bytes(bytes).into_uuid()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood of refusals from one source, then from many: each source gets its burst, and
    /// all sources together no more than theirs; what is left out is counted in the next
    /// recorded line of the source.
    #[test]
    fn refusals_are_recorded_within_their_budgets() {
        let r = Refusals::default();
        let one: SocketAddr = "127.0.0.2:1000".parse().unwrap();
        let recorded = (0..1000).filter(|_| r.admit(Some(one)).is_some()).count();
        assert_eq!(recorded, PER_SOURCE_BURST as usize);
        let mut recorded = 0;
        for i in 0..10_000u32 {
            let ip = std::net::Ipv4Addr::from(0x7f00_0000 + 16 + i);
            if r.admit(Some(SocketAddr::from((ip, 1)))).is_some() {
                recorded += 1;
            }
        }
        // The overall burst, less what the first source took (and a little refill).
        assert!(recorded <= ALL_BURST as usize, "{recorded}");
        assert!(
            recorded >= ALL_BURST as usize - PER_SOURCE_BURST as usize - 5,
            "{recorded}"
        );
        // After a second's refill, the first source's next line says how many were left out.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let left_out = r.admit(Some(one)).expect("recorded after the refill");
        assert_eq!(left_out, 1000 - PER_SOURCE_BURST as u64);
        assert_eq!(r.admit(Some(one)), Some(0));
    }
}
