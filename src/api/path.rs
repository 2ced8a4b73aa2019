//! The request path every operation takes, whatever the transport: the caller as the
//! transport named them, the operation, then the audit record, the metrics and the failure
//! log around the domain call. A transport names the caller, maps its wire request to a
//! domain call and back, and turns a refusal into its own error form; nothing else.

use std::collections::BTreeMap;
use std::sync::Arc;

use tracing::Instrument;

use crate::audit::Audit;
use crate::kms::access::Caller;
use crate::kms::error::{ErrorKind, KmsError, KmsResult};
use crate::kms::op::Op;
use crate::kms::Kms;

use super::failures;

/// One request in flight: its operation, id, start time and caller.
pub struct Call {
    pub op: Op,
    pub started: std::time::Instant,
    /// The id of the request's audit line, given to the caller on a refusal.
    pub request_id: uuid::Uuid,
    /// Who is calling, or why the transport could not tell (answered as the refusal).
    pub caller: KmsResult<Caller>,
}

impl Call {
    pub fn new(op: Op, caller: KmsResult<Caller>) -> Call {
        Call {
            op,
            started: std::time::Instant::now(),
            request_id: request_id(),
            caller,
        }
    }
}

/// The domain and the audit trail, shared by every transport.
pub struct RequestPath {
    kms: Arc<Kms>,
    audit: Arc<Audit>,
}

impl RequestPath {
    pub fn new(kms: Arc<Kms>, audit: Arc<Audit>) -> RequestPath {
        RequestPath { kms, audit }
    }

    pub fn kms(&self) -> &Arc<Kms> {
        &self.kms
    }

    /// Runs `call` through `handle`: refuses it unless the audit trail can record it,
    /// records it (with `encryption_context` if the operation records one), answers only
    /// once its line is written, and counts and logs the outcome. The span is debug-level:
    /// an enabled span per request costs measurable throughput (bench), so failures name
    /// the operation in their own event instead.
    pub async fn run<T>(
        &self,
        call: &Call,
        encryption_context: Option<BTreeMap<String, String>>,
        handle: impl AsyncFnOnce(&Arc<Kms>, &Caller) -> KmsResult<T>,
    ) -> KmsResult<T> {
        let op = call.op.name();
        // Fail closed: nothing is done that the audit trail could not record.
        if !self.audit.available() {
            self.audit.refused();
            return Err(self.refused(call, unaudited()));
        }
        let outcome = async {
            let caller = call.caller.as_ref().map_err(Clone::clone)?;
            handle(&self.kms, caller).await
        }
        .instrument(tracing::debug_span!("kms", op))
        .await;
        let caller = call.caller.as_ref().ok();
        let receipt = self.audit.record(crate::audit::Entry {
            time_ms: crate::kms::now_ms(),
            request_id: call.request_id,
            principal: caller.map(|c| Arc::clone(&c.principal)),
            source: caller.and_then(|c| c.source),
            operation: op,
            resources: caller.map(|c| c.take_resources()).unwrap_or_default(),
            encryption_context: encryption_context.filter(|c| !c.is_empty()),
            outcome: match &outcome {
                Ok(_) => "allowed",
                Err(e) if e.kind == ErrorKind::AccessDenied => "denied",
                Err(_) => "failed",
            },
            error: outcome.as_ref().err().map(|e| e.kind.aws_name()),
        });
        // No answer before the request's line has reached the operating system.
        let outcome = if receipt.written().await {
            outcome
        } else {
            Err(unaudited())
        };
        match outcome {
            Ok(v) => {
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
        failures::note(op, e.kind.aws_name(), &e.message, &call.request_id);
        e
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
