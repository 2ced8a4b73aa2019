//! hsm-kms's own operations for operators (kms/operators.rs): wire <-> domain.

use std::sync::Arc;

use super::timestamp;
use crate::kms::fields::{KeyId, KeyStoreId};
use crate::kms::gate::{Gate, KeyNamed, Subject};
use crate::kms::{page_limit, Kms};
use crate::proto::*;
use model::error::KmsResult;

pub(super) async fn get_caller_identity(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    _r: GetCallerIdentityRequest,
) -> KmsResult<GetCallerIdentityResponse> {
    let auth = gate.authorize(kms, Subject::Caller).await?;
    let (arn, account, region) = kms.caller_identity(&auth);
    Ok(GetCallerIdentityResponse {
        arn,
        account,
        region,
    })
}

pub(super) async fn describe_custom_key_store_health(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: DescribeCustomKeyStoreHealthRequest,
) -> KmsResult<DescribeCustomKeyStoreHealthResponse> {
    let id = r.custom_key_store_id.as_deref().filter(|id| !id.is_empty());
    if let Some(id) = id {
        KeyStoreId::new(id)?;
    }
    let auth = gate.authorize(kms, Subject::KeyStore(id)).await?;
    let stores = kms.keystore_health(&auth, id).await?;
    Ok(DescribeCustomKeyStoreHealthResponse {
        custom_key_stores: stores
            .into_iter()
            .map(|h| CustomKeyStoreHealth {
                custom_key_store_id: h.store.id,
                custom_key_store_name: h.store.name,
                cloud_hsm_cluster_id: h.store.cluster_id,
                connection_state: h.store.connection_state.as_str().into(),
                connection_error_code: h.store.connection_error_code.map(|c| c.as_str().into()),
                health: h.health.into(),
                requests: h.requests,
                throttled: h.throttled,
                hsm_errors: h.hsm_errors,
                sessions: h.sessions.0 as u32,
                sessions_in_use: h.sessions.1 as u32,
            })
            .collect(),
        replica: kms.replica_id().to_string(),
        counting_since_date: timestamp(kms.started_ms()),
    })
}

pub(super) async fn list_key_audit_events(
    kms: &Arc<Kms>,
    gate: Gate<'_>,
    r: ListKeyAuditEventsRequest,
) -> KmsResult<ListKeyAuditEventsResponse> {
    let limit = page_limit(r.limit, 100, 25)?;
    let key_id = KeyId::new("KeyId", &r.key_id)?.get();
    let auth = gate
        .authorize(kms, Subject::Key(KeyNamed::id(key_id)))
        .await?;
    let (events, truncated) = kms.key_audit_events(&auth, limit).await?;
    Ok(ListKeyAuditEventsResponse {
        key_id: kms.scope.key_arn(&auth.key()?.id),
        events: events
            .into_iter()
            .map(|e| AuditEvent {
                event_time: e.time,
                request_id: e.request_id,
                principal: e.principal,
                source: e.source,
                operation: e.operation,
                outcome: e.outcome,
                error_code: e.error,
            })
            .collect(),
        truncated,
    })
}
