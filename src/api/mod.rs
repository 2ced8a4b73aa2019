//! gRPC transport: request validation (the AWS field limits), proto <-> domain mapping, and
//! domain errors -> gRPC statuses (`status`). No business rule lives here.

pub mod auth;
pub mod failures;
pub mod protocol;
pub mod status;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prost_types::Timestamp;
use tonic::{Request, Response, Status};
use tracing::Instrument;
use zeroize::Zeroizing;

use crate::audit::Audit;
use crate::kms::access::Caller;
use crate::kms::aliases::AliasView;
use crate::kms::crypto::{check_context, data_key_len, SYMMETRIC_DEFAULT};
use crate::kms::error::{ErrorKind, KmsError, KmsResult};
use crate::kms::grants::{check_grant_tokens, CreateGrant, GrantView};
use crate::kms::keys::{CreateKey, KeyView};
use crate::kms::keystores::{CreateStore, Password, StoreView, UpdateStore};
use crate::kms::op::Op;
use crate::kms::Kms;
use crate::proto::key_management_service_server::KeyManagementService;
use crate::proto::*;
use status::to_status;

/// The largest request message accepted, in bytes. The largest valid KMS request is a
/// CreateKey with a 32 KiB policy, an 8,192-character description and 50 tags of 128 + 256
/// characters: at most ~150 KiB even in 4-byte UTF-8 characters. tonic reserves a message's
/// announced length before its body arrives, so this also bounds that reservation.
pub const MAX_REQUEST_BYTES: usize = 192 * 1024;

pub struct Service {
    kms: Arc<Kms>,
    auth: Arc<auth::Authenticator>,
    audit: Arc<Audit>,
}

impl Service {
    pub fn new(kms: Arc<Kms>, auth: Arc<auth::Authenticator>, audit: Arc<Audit>) -> Service {
        Service { kms, auth, audit }
    }

    /// Names the caller of a request (the refusal, if any, is answered by `finish`).
    fn call<R>(&self, op: Op, req: &Request<R>) -> Call {
        let leaf = req.peer_certs();
        let principal = self
            .auth
            .principal(leaf.as_ref().and_then(|c| c.first()).map(|c| c.as_ref()));
        Call {
            op,
            started: std::time::Instant::now(),
            request_id: request_id(),
            caller: principal.map(|p| Caller::new(p, req.remote_addr())),
        }
    }

    /// Runs one operation: turns its error into a status, records it in the metrics and the
    /// audit trail, and gives the request id of a failure to the caller (`x-request-id`). The span is
    /// debug-level: an enabled span per request costs measurable throughput (bench), so
    /// failures name the operation in their own event instead.
    /// The request path every operation runs: names the caller, then `handle` maps the wire
    /// request to the domain call and its reply back (all that an operation writes), and
    /// `finish` does the rest. `context` picks what the audit line records of the request.
    async fn run<R, T>(
        &self,
        op: Op,
        req: Request<R>,
        context: impl FnOnce(&R) -> Option<BTreeMap<String, String>>,
        handle: impl AsyncFnOnce(&Caller, R) -> KmsResult<T>,
    ) -> Result<Response<T>, Status> {
        let call = self.call(op, &req);
        let r = req.into_inner();
        let ctx = context(&r);
        self.finish(&call, ctx, async {
            let caller = call.who()?;
            handle(caller, r).await
        })
        .await
    }

    async fn finish<T>(
        &self,
        call: &Call,
        encryption_context: Option<BTreeMap<String, String>>,
        fut: impl std::future::Future<Output = KmsResult<T>>,
    ) -> Result<Response<T>, Status> {
        let op = call.op.name();
        // Fail closed: nothing is done that the audit trail could not record.
        if !self.audit.available() {
            self.audit.refused();
            return Err(self.refuse(call, unaudited()));
        }
        let outcome = fut.instrument(tracing::debug_span!("kms", op)).await;
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
                Ok(Response::new(v))
            }
            Err(e) => Err(self.refuse(call, e)),
        }
    }

    /// The status of a refused or failed request, counted in the metrics and logged.
    fn refuse(&self, call: &Call, e: KmsError) -> Status {
        let op = call.op.name();
        crate::metrics::get().request(op, e.kind.aws_name(), call.started.elapsed());
        failures::note(op, e.kind.aws_name(), &e.message, &call.request_id);
        let mut status = to_status(e);
        // The id of a refused or failed request, to find it in the audit trail. Not
        // on successes: a unique header per response costs measurable throughput.
        let mut id_text = uuid::Uuid::encode_buffer();
        let id_text = call.request_id.hyphenated().encode_lower(&mut id_text);
        if let Ok(id) = tonic::metadata::MetadataValue::try_from(&*id_text) {
            status.metadata_mut().insert("x-request-id", id);
        }
        status
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

/// One request in flight: its operation, id, start time and caller.
struct Call {
    op: Op,
    started: std::time::Instant,
    request_id: uuid::Uuid,
    caller: KmsResult<Caller>,
}

impl Call {
    fn who(&self) -> KmsResult<&Caller> {
        self.caller.as_ref().map_err(Clone::clone)
    }
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

/// The encryption context as the audit trail records it: none when empty, or when over the
/// bound (the request is then refused, and its line must stay small).
fn audited(ctx: &HashMap<String, String>) -> Option<BTreeMap<String, String>> {
    let ctx: BTreeMap<String, String> = ctx.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    (!ctx.is_empty() && check_context("EncryptionContext", &ctx).is_ok()).then_some(ctx)
}

fn timestamp(ms: i64) -> Option<Timestamp> {
    Some(Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    })
}

/// KeyId-style fields: 1..2048 characters.
fn key_id_field<'a>(field: &str, v: &'a str) -> KmsResult<&'a str> {
    let n = v.chars().count();
    if !(1..=2048).contains(&n) {
        return Err(KmsError::validation(format!(
            "{field} must be 1 to 2048 characters long"
        )));
    }
    Ok(v)
}

fn opt_key_id<'a>(field: &str, v: &'a Option<String>) -> KmsResult<Option<&'a str>> {
    v.as_deref().map(|s| key_id_field(field, s)).transpose()
}

fn plaintext_field(v: Vec<u8>) -> KmsResult<Zeroizing<Vec<u8>>> {
    let v = Zeroizing::new(v);
    if v.is_empty() || v.len() > 4096 {
        return Err(KmsError::validation(format!(
            "Plaintext must be 1 to 4096 bytes long, got {}",
            v.len()
        )));
    }
    Ok(v)
}

fn ciphertext_field(v: &[u8]) -> KmsResult<&[u8]> {
    if v.is_empty() || v.len() > 6144 {
        return Err(KmsError::validation(format!(
            "CiphertextBlob must be 1 to 6144 bytes long, got {}",
            v.len()
        )));
    }
    Ok(v)
}

/// An encryption context, within the service's bound (`crypto::check_context`).
fn context(field: &str, map: HashMap<String, String>) -> KmsResult<BTreeMap<String, String>> {
    let ctx = map.into_iter().collect();
    check_context(field, &ctx)?;
    Ok(ctx)
}

fn store_id_field(field: &str, v: &str) -> KmsResult<()> {
    let n = v.chars().count();
    if !(1..=64).contains(&n) {
        return Err(KmsError::validation(format!(
            "{field} must be 1 to 64 characters long"
        )));
    }
    Ok(())
}

fn password(v: Option<String>) -> KmsResult<Option<Password>> {
    v.map(Password::new).transpose()
}

fn key_metadata(k: KeyView) -> KeyMetadata {
    KeyMetadata {
        enabled: k.enabled(),
        aws_account_id: k.account_id,
        key_id: k.key_id.to_string(),
        arn: k.arn,
        creation_date: timestamp(k.creation_date_ms),
        description: k.description,
        key_usage: "ENCRYPT_DECRYPT".into(),
        key_state: k.key_state.as_str().into(),
        deletion_date: k.deletion_date_ms.and_then(timestamp),
        origin: "AWS_CLOUDHSM".into(),
        custom_key_store_id: k.custom_key_store_id,
        cloud_hsm_cluster_id: k.cloud_hsm_cluster_id,
        key_manager: "CUSTOMER".into(),
        customer_master_key_spec: SYMMETRIC_DEFAULT.into(),
        key_spec: SYMMETRIC_DEFAULT.into(),
        encryption_algorithms: vec![SYMMETRIC_DEFAULT.into()],
        multi_region: false,
        pending_deletion_window_in_days: k.pending_window_days,
    }
}

fn store_entry(s: StoreView) -> CustomKeyStoresListEntry {
    CustomKeyStoresListEntry {
        custom_key_store_id: s.id,
        custom_key_store_name: s.name,
        cloud_hsm_cluster_id: s.cluster_id,
        trust_anchor_certificate: s.trust_anchor,
        connection_state: s.connection_state.as_str().into(),
        connection_error_code: s.connection_error_code.map(|c| c.as_str().into()),
        creation_date: timestamp(s.creation_date_ms),
        custom_key_store_type: "AWS_CLOUDHSM".into(),
    }
}

fn alias_entry(a: AliasView) -> AliasListEntry {
    AliasListEntry {
        alias_name: a.name,
        alias_arn: a.arn,
        target_key_id: a.target_key_id.to_string(),
        creation_date: timestamp(a.creation_date_ms),
        last_updated_date: timestamp(a.last_updated_ms),
    }
}

fn grant_page(page: crate::kms::keystores::Page<GrantView>) -> ListGrantsResponse {
    let entry = |g: GrantView| {
        let r = g.record;
        let map = |m: Option<BTreeMap<String, String>>| -> HashMap<String, String> {
            m.unwrap_or_default().into_iter().collect()
        };
        let constraints =
            (r.context_subset.is_some() || r.context_equals.is_some()).then(|| GrantConstraints {
                encryption_context_subset: map(r.context_subset),
                encryption_context_equals: map(r.context_equals),
            });
        GrantListEntry {
            key_id: g.key_arn,
            grant_id: r.grant_id,
            name: r.name,
            creation_date: timestamp(r.creation_date_ms),
            grantee_principal: r.grantee_principal,
            retiring_principal: r.retiring_principal,
            issuing_account: r.issuing_account,
            operations: r.operations,
            constraints,
        }
    };
    ListGrantsResponse {
        grants: page.items.into_iter().map(entry).collect(),
        truncated: page.next_marker.is_some(),
        next_marker: page.next_marker,
    }
}

fn marker_field(m: &Option<String>) -> KmsResult<Option<&str>> {
    match m.as_deref() {
        Some(s) if s.is_empty() || s.chars().count() > 1024 => Err(KmsError::validation(
            "Marker must be 1 to 1024 characters long",
        )),
        other => Ok(other),
    }
}

#[tonic::async_trait]
impl KeyManagementService for Service {
    async fn create_custom_key_store(
        &self,
        req: Request<CreateCustomKeyStoreRequest>,
    ) -> Result<Response<CreateCustomKeyStoreResponse>, Status> {
        self.run(
            Op::CreateCustomKeyStore,
            req,
            |_| None,
            async |caller, r| {
                let id = self
                    .kms
                    .create_custom_key_store(
                        caller,
                        CreateStore {
                            name: r.custom_key_store_name,
                            cluster_id: r.cloud_hsm_cluster_id,
                            trust_anchor: r.trust_anchor_certificate,
                            password: password(r.key_store_password)?,
                            store_type: r.custom_key_store_type,
                        },
                    )
                    .await?;
                Ok(CreateCustomKeyStoreResponse {
                    custom_key_store_id: id,
                })
            },
        )
        .await
    }

    async fn describe_custom_key_stores(
        &self,
        req: Request<DescribeCustomKeyStoresRequest>,
    ) -> Result<Response<DescribeCustomKeyStoresResponse>, Status> {
        self.run(
            Op::DescribeCustomKeyStores,
            req,
            |_| None,
            async |caller, r| {
                if let Some(id) = &r.custom_key_store_id {
                    store_id_field("CustomKeyStoreId", id)?;
                }
                let page = self
                    .kms
                    .describe_custom_key_stores(
                        caller,
                        r.custom_key_store_id.as_deref(),
                        r.custom_key_store_name.as_deref(),
                        r.limit,
                        marker_field(&r.marker)?,
                    )
                    .await?;
                Ok(DescribeCustomKeyStoresResponse {
                    custom_key_stores: page.items.into_iter().map(store_entry).collect(),
                    truncated: page.next_marker.is_some(),
                    next_marker: page.next_marker,
                })
            },
        )
        .await
    }

    async fn update_custom_key_store(
        &self,
        req: Request<UpdateCustomKeyStoreRequest>,
    ) -> Result<Response<UpdateCustomKeyStoreResponse>, Status> {
        self.run(
            Op::UpdateCustomKeyStore,
            req,
            |_| None,
            async |caller, r| {
                store_id_field("CustomKeyStoreId", &r.custom_key_store_id)?;
                self.kms
                    .update_custom_key_store(
                        caller,
                        UpdateStore {
                            id: r.custom_key_store_id,
                            new_name: r.new_custom_key_store_name,
                            password: password(r.key_store_password)?,
                            cluster_id: r.cloud_hsm_cluster_id,
                        },
                    )
                    .await?;
                Ok(UpdateCustomKeyStoreResponse {})
            },
        )
        .await
    }

    async fn delete_custom_key_store(
        &self,
        req: Request<DeleteCustomKeyStoreRequest>,
    ) -> Result<Response<DeleteCustomKeyStoreResponse>, Status> {
        self.run(
            Op::DeleteCustomKeyStore,
            req,
            |_| None,
            async |caller, r| {
                store_id_field("CustomKeyStoreId", &r.custom_key_store_id)?;
                self.kms
                    .delete_custom_key_store(caller, &r.custom_key_store_id)
                    .await?;
                Ok(DeleteCustomKeyStoreResponse {})
            },
        )
        .await
    }

    async fn connect_custom_key_store(
        &self,
        req: Request<ConnectCustomKeyStoreRequest>,
    ) -> Result<Response<ConnectCustomKeyStoreResponse>, Status> {
        self.run(
            Op::ConnectCustomKeyStore,
            req,
            |_| None,
            async |caller, r| {
                store_id_field("CustomKeyStoreId", &r.custom_key_store_id)?;
                self.kms
                    .connect_custom_key_store(caller, &r.custom_key_store_id)
                    .await?;
                Ok(ConnectCustomKeyStoreResponse {})
            },
        )
        .await
    }

    async fn disconnect_custom_key_store(
        &self,
        req: Request<DisconnectCustomKeyStoreRequest>,
    ) -> Result<Response<DisconnectCustomKeyStoreResponse>, Status> {
        self.run(
            Op::DisconnectCustomKeyStore,
            req,
            |_| None,
            async |caller, r| {
                store_id_field("CustomKeyStoreId", &r.custom_key_store_id)?;
                self.kms
                    .disconnect_custom_key_store(caller, &r.custom_key_store_id)
                    .await?;
                Ok(DisconnectCustomKeyStoreResponse {})
            },
        )
        .await
    }

    async fn create_key(
        &self,
        req: Request<CreateKeyRequest>,
    ) -> Result<Response<CreateKeyResponse>, Status> {
        self.run(
            Op::CreateKey,
            req,
            |_| None,
            async |caller, r| {
                if let Some(id) = &r.custom_key_store_id {
                    store_id_field("CustomKeyStoreId", id)?;
                }
                let key = self
                    .kms
                    .create_key(
                        caller,
                        CreateKey {
                            description: r.description,
                            key_usage: r.key_usage,
                            customer_master_key_spec: r.customer_master_key_spec,
                            key_spec: r.key_spec,
                            origin: r.origin,
                            custom_key_store_id: r.custom_key_store_id,
                            tags: r
                                .tags
                                .into_iter()
                                .map(|t| (t.tag_key, t.tag_value))
                                .collect(),
                            multi_region: r.multi_region,
                            policy: r.policy,
                            bypass_policy_lockout_safety_check: r
                                .bypass_policy_lockout_safety_check
                                .unwrap_or(false),
                        },
                    )
                    .await?;
                Ok(CreateKeyResponse {
                    key_metadata: Some(key_metadata(key)),
                })
            },
        )
        .await
    }

    async fn describe_key(
        &self,
        req: Request<DescribeKeyRequest>,
    ) -> Result<Response<DescribeKeyResponse>, Status> {
        self.run(
            Op::DescribeKey,
            req,
            |_| None,
            async |caller, r| {
                check_grant_tokens(&r.grant_tokens)?;
                let key = self
                    .kms
                    .describe_key(caller, key_id_field("KeyId", &r.key_id)?)
                    .await?;
                Ok(DescribeKeyResponse {
                    key_metadata: Some(key_metadata(key)),
                })
            },
        )
        .await
    }

    async fn list_keys(
        &self,
        req: Request<ListKeysRequest>,
    ) -> Result<Response<ListKeysResponse>, Status> {
        self.run(
            Op::ListKeys,
            req,
            |_| None,
            async |caller, r| {
                let page = self
                    .kms
                    .list_keys(caller, r.limit, marker_field(&r.marker)?)
                    .await?;
                Ok(ListKeysResponse {
                    keys: page
                        .items
                        .into_iter()
                        .map(|(id, arn)| KeyListEntry {
                            key_id: id.to_string(),
                            key_arn: arn,
                        })
                        .collect(),
                    truncated: page.next_marker.is_some(),
                    next_marker: page.next_marker,
                })
            },
        )
        .await
    }

    async fn list_resource_tags(
        &self,
        req: Request<ListResourceTagsRequest>,
    ) -> Result<Response<ListResourceTagsResponse>, Status> {
        self.run(
            Op::ListResourceTags,
            req,
            |_| None,
            async |caller, r| {
                let page = self
                    .kms
                    .list_resource_tags(
                        caller,
                        key_id_field("KeyId", &r.key_id)?,
                        r.limit,
                        marker_field(&r.marker)?,
                    )
                    .await?;
                Ok(ListResourceTagsResponse {
                    tags: page
                        .items
                        .into_iter()
                        .map(|(tag_key, tag_value)| Tag { tag_key, tag_value })
                        .collect(),
                    truncated: page.next_marker.is_some(),
                    next_marker: page.next_marker,
                })
            },
        )
        .await
    }

    async fn enable_key(
        &self,
        req: Request<EnableKeyRequest>,
    ) -> Result<Response<EnableKeyResponse>, Status> {
        self.run(
            Op::EnableKey,
            req,
            |_| None,
            async |caller, r| {
                self.kms
                    .set_key_enabled(caller, key_id_field("KeyId", &r.key_id)?, true)
                    .await?;
                Ok(EnableKeyResponse {})
            },
        )
        .await
    }

    async fn disable_key(
        &self,
        req: Request<DisableKeyRequest>,
    ) -> Result<Response<DisableKeyResponse>, Status> {
        self.run(
            Op::DisableKey,
            req,
            |_| None,
            async |caller, r| {
                self.kms
                    .set_key_enabled(caller, key_id_field("KeyId", &r.key_id)?, false)
                    .await?;
                Ok(DisableKeyResponse {})
            },
        )
        .await
    }

    async fn update_key_description(
        &self,
        req: Request<UpdateKeyDescriptionRequest>,
    ) -> Result<Response<UpdateKeyDescriptionResponse>, Status> {
        self.run(
            Op::UpdateKeyDescription,
            req,
            |_| None,
            async |caller, r| {
                self.kms
                    .update_key_description(
                        caller,
                        key_id_field("KeyId", &r.key_id)?,
                        &r.description,
                    )
                    .await?;
                Ok(UpdateKeyDescriptionResponse {})
            },
        )
        .await
    }

    async fn schedule_key_deletion(
        &self,
        req: Request<ScheduleKeyDeletionRequest>,
    ) -> Result<Response<ScheduleKeyDeletionResponse>, Status> {
        self.run(
            Op::ScheduleKeyDeletion,
            req,
            |_| None,
            async |caller, r| {
                let k = self
                    .kms
                    .schedule_key_deletion(
                        caller,
                        key_id_field("KeyId", &r.key_id)?,
                        r.pending_window_in_days,
                    )
                    .await?;
                Ok(ScheduleKeyDeletionResponse {
                    key_id: k.arn,
                    deletion_date: k.deletion_date_ms.and_then(timestamp),
                    key_state: k.key_state.as_str().into(),
                    pending_window_in_days: k.pending_window_days.unwrap_or_default(),
                })
            },
        )
        .await
    }

    async fn cancel_key_deletion(
        &self,
        req: Request<CancelKeyDeletionRequest>,
    ) -> Result<Response<CancelKeyDeletionResponse>, Status> {
        self.run(
            Op::CancelKeyDeletion,
            req,
            |_| None,
            async |caller, r| {
                let id = self
                    .kms
                    .cancel_key_deletion(caller, key_id_field("KeyId", &r.key_id)?)
                    .await?;
                Ok(CancelKeyDeletionResponse {
                    key_id: self.kms.scope.key_arn(&id),
                })
            },
        )
        .await
    }

    async fn tag_resource(
        &self,
        req: Request<TagResourceRequest>,
    ) -> Result<Response<TagResourceResponse>, Status> {
        self.run(
            Op::TagResource,
            req,
            |_| None,
            async |caller, r| {
                let tags: Vec<(String, String)> = r
                    .tags
                    .into_iter()
                    .map(|t| (t.tag_key, t.tag_value))
                    .collect();
                self.kms
                    .tag_resource(caller, key_id_field("KeyId", &r.key_id)?, &tags)
                    .await?;
                Ok(TagResourceResponse {})
            },
        )
        .await
    }

    async fn untag_resource(
        &self,
        req: Request<UntagResourceRequest>,
    ) -> Result<Response<UntagResourceResponse>, Status> {
        self.run(
            Op::UntagResource,
            req,
            |_| None,
            async |caller, r| {
                self.kms
                    .untag_resource(caller, key_id_field("KeyId", &r.key_id)?, &r.tag_keys)
                    .await?;
                Ok(UntagResourceResponse {})
            },
        )
        .await
    }

    async fn create_alias(
        &self,
        req: Request<CreateAliasRequest>,
    ) -> Result<Response<CreateAliasResponse>, Status> {
        self.run(
            Op::CreateAlias,
            req,
            |_| None,
            async |caller, r| {
                self.kms
                    .create_alias(
                        caller,
                        &r.alias_name,
                        key_id_field("TargetKeyId", &r.target_key_id)?,
                    )
                    .await?;
                Ok(CreateAliasResponse {})
            },
        )
        .await
    }

    async fn update_alias(
        &self,
        req: Request<UpdateAliasRequest>,
    ) -> Result<Response<UpdateAliasResponse>, Status> {
        self.run(
            Op::UpdateAlias,
            req,
            |_| None,
            async |caller, r| {
                self.kms
                    .update_alias(
                        caller,
                        &r.alias_name,
                        key_id_field("TargetKeyId", &r.target_key_id)?,
                    )
                    .await?;
                Ok(UpdateAliasResponse {})
            },
        )
        .await
    }

    async fn delete_alias(
        &self,
        req: Request<DeleteAliasRequest>,
    ) -> Result<Response<DeleteAliasResponse>, Status> {
        self.run(
            Op::DeleteAlias,
            req,
            |_| None,
            async |caller, r| {
                self.kms.delete_alias(caller, &r.alias_name).await?;
                Ok(DeleteAliasResponse {})
            },
        )
        .await
    }

    async fn list_aliases(
        &self,
        req: Request<ListAliasesRequest>,
    ) -> Result<Response<ListAliasesResponse>, Status> {
        self.run(
            Op::ListAliases,
            req,
            |_| None,
            async |caller, r| {
                let page = self
                    .kms
                    .list_aliases(
                        caller,
                        opt_key_id("KeyId", &r.key_id)?,
                        r.limit,
                        marker_field(&r.marker)?,
                    )
                    .await?;
                Ok(ListAliasesResponse {
                    aliases: page.items.into_iter().map(alias_entry).collect(),
                    truncated: page.next_marker.is_some(),
                    next_marker: page.next_marker,
                })
            },
        )
        .await
    }

    async fn create_grant(
        &self,
        req: Request<CreateGrantRequest>,
    ) -> Result<Response<CreateGrantResponse>, Status> {
        self.run(
            Op::CreateGrant,
            req,
            |_| None,
            async |caller, r| {
                check_grant_tokens(&r.grant_tokens)?;
                let constraints = r.constraints.unwrap_or_default();
                let nonempty =
                    |m: HashMap<String, String>| (!m.is_empty()).then(|| m.into_iter().collect());
                let (grant_id, grant_token) = self
                    .kms
                    .create_grant(
                        caller,
                        CreateGrant {
                            key_id: key_id_field("KeyId", &r.key_id)?.to_string(),
                            grantee_principal: r.grantee_principal,
                            retiring_principal: r.retiring_principal,
                            operations: r.operations,
                            context_subset: nonempty(constraints.encryption_context_subset),
                            context_equals: nonempty(constraints.encryption_context_equals),
                            name: r.name,
                            dry_run: r.dry_run.unwrap_or(false),
                        },
                    )
                    .await?;
                Ok(CreateGrantResponse {
                    grant_token,
                    grant_id,
                })
            },
        )
        .await
    }

    async fn list_grants(
        &self,
        req: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        self.run(
            Op::ListGrants,
            req,
            |_| None,
            async |caller, r| {
                let page = self
                    .kms
                    .list_grants(
                        caller,
                        key_id_field("KeyId", &r.key_id)?,
                        r.grant_id.as_deref(),
                        r.grantee_principal.as_deref(),
                        r.limit,
                        marker_field(&r.marker)?,
                    )
                    .await?;
                Ok(grant_page(page))
            },
        )
        .await
    }

    async fn list_retirable_grants(
        &self,
        req: Request<ListRetirableGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        self.run(
            Op::ListRetirableGrants,
            req,
            |_| None,
            async |caller, r| {
                let page = self
                    .kms
                    .list_retirable_grants(
                        caller,
                        &r.retiring_principal,
                        r.limit,
                        marker_field(&r.marker)?,
                    )
                    .await?;
                Ok(grant_page(page))
            },
        )
        .await
    }

    async fn retire_grant(
        &self,
        req: Request<RetireGrantRequest>,
    ) -> Result<Response<RetireGrantResponse>, Status> {
        self.run(
            Op::RetireGrant,
            req,
            |_| None,
            async |caller, r| {
                self.kms
                    .retire_grant(
                        caller,
                        r.grant_token.as_deref(),
                        opt_key_id("KeyId", &r.key_id)?,
                        r.grant_id.as_deref(),
                        r.dry_run.unwrap_or(false),
                    )
                    .await?;
                Ok(RetireGrantResponse {})
            },
        )
        .await
    }

    async fn revoke_grant(
        &self,
        req: Request<RevokeGrantRequest>,
    ) -> Result<Response<RevokeGrantResponse>, Status> {
        self.run(
            Op::RevokeGrant,
            req,
            |_| None,
            async |caller, r| {
                self.kms
                    .revoke_grant(
                        caller,
                        key_id_field("KeyId", &r.key_id)?,
                        &r.grant_id,
                        r.dry_run.unwrap_or(false),
                    )
                    .await?;
                Ok(RevokeGrantResponse {})
            },
        )
        .await
    }

    async fn put_key_policy(
        &self,
        req: Request<PutKeyPolicyRequest>,
    ) -> Result<Response<PutKeyPolicyResponse>, Status> {
        self.run(
            Op::PutKeyPolicy,
            req,
            |_| None,
            async |caller, r| {
                self.kms
                    .put_key_policy(
                        caller,
                        key_id_field("KeyId", &r.key_id)?,
                        r.policy_name.as_deref(),
                        &r.policy,
                        r.bypass_policy_lockout_safety_check.unwrap_or(false),
                    )
                    .await?;
                Ok(PutKeyPolicyResponse {})
            },
        )
        .await
    }

    async fn get_key_policy(
        &self,
        req: Request<GetKeyPolicyRequest>,
    ) -> Result<Response<GetKeyPolicyResponse>, Status> {
        self.run(
            Op::GetKeyPolicy,
            req,
            |_| None,
            async |caller, r| {
                let policy = self
                    .kms
                    .get_key_policy(
                        caller,
                        key_id_field("KeyId", &r.key_id)?,
                        r.policy_name.as_deref(),
                    )
                    .await?;
                Ok(GetKeyPolicyResponse {
                    policy,
                    policy_name: "default".into(),
                })
            },
        )
        .await
    }

    async fn list_key_policies(
        &self,
        req: Request<ListKeyPoliciesRequest>,
    ) -> Result<Response<ListKeyPoliciesResponse>, Status> {
        self.run(
            Op::ListKeyPolicies,
            req,
            |_| None,
            async |caller, r| {
                let page = self
                    .kms
                    .list_key_policies(
                        caller,
                        key_id_field("KeyId", &r.key_id)?,
                        r.limit,
                        marker_field(&r.marker)?,
                    )
                    .await?;
                Ok(ListKeyPoliciesResponse {
                    policy_names: page.items,
                    truncated: false,
                    next_marker: None,
                })
            },
        )
        .await
    }

    async fn encrypt(
        &self,
        req: Request<EncryptRequest>,
    ) -> Result<Response<EncryptResponse>, Status> {
        self.run(
            Op::Encrypt,
            req,
            |r| audited(&r.encryption_context),
            async |caller, r| {
                check_grant_tokens(&r.grant_tokens)?;
                let out = self
                    .kms
                    .encrypt(
                        caller,
                        key_id_field("KeyId", &r.key_id)?,
                        plaintext_field(r.plaintext)?,
                        &context("EncryptionContext", r.encryption_context)?,
                        r.encryption_algorithm.as_deref(),
                        r.dry_run.unwrap_or(false),
                    )
                    .await?;
                Ok(EncryptResponse {
                    ciphertext_blob: out.ciphertext_blob,
                    key_id: out.key_arn,
                    encryption_algorithm: SYMMETRIC_DEFAULT.into(),
                })
            },
        )
        .await
    }

    async fn decrypt(
        &self,
        req: Request<DecryptRequest>,
    ) -> Result<Response<DecryptResponse>, Status> {
        self.run(
            Op::Decrypt,
            req,
            |r| audited(&r.encryption_context),
            async |caller, r| {
                check_grant_tokens(&r.grant_tokens)?;
                let out = self
                    .kms
                    .decrypt(
                        caller,
                        ciphertext_field(&r.ciphertext_blob)?,
                        &context("EncryptionContext", r.encryption_context)?,
                        opt_key_id("KeyId", &r.key_id)?,
                        r.encryption_algorithm.as_deref(),
                        r.dry_run.unwrap_or(false),
                    )
                    .await?;
                Ok(DecryptResponse {
                    key_id: out.key_arn,
                    plaintext: out.plaintext.0.to_vec(),
                    encryption_algorithm: SYMMETRIC_DEFAULT.into(),
                })
            },
        )
        .await
    }

    async fn re_encrypt(
        &self,
        req: Request<ReEncryptRequest>,
    ) -> Result<Response<ReEncryptResponse>, Status> {
        self.run(
            Op::ReEncrypt,
            req,
            |r| audited(&r.destination_encryption_context),
            async |caller, r| {
                check_grant_tokens(&r.grant_tokens)?;
                let out = self
                    .kms
                    .re_encrypt(
                        caller,
                        ciphertext_field(&r.ciphertext_blob)?,
                        &context("SourceEncryptionContext", r.source_encryption_context)?,
                        opt_key_id("SourceKeyId", &r.source_key_id)?,
                        key_id_field("DestinationKeyId", &r.destination_key_id)?,
                        &context(
                            "DestinationEncryptionContext",
                            r.destination_encryption_context,
                        )?,
                        r.source_encryption_algorithm.as_deref(),
                        r.destination_encryption_algorithm.as_deref(),
                        r.dry_run.unwrap_or(false),
                    )
                    .await?;
                Ok(ReEncryptResponse {
                    ciphertext_blob: out.ciphertext_blob,
                    source_key_id: out.source_key_arn,
                    key_id: out.key_arn,
                    source_encryption_algorithm: SYMMETRIC_DEFAULT.into(),
                    destination_encryption_algorithm: SYMMETRIC_DEFAULT.into(),
                })
            },
        )
        .await
    }

    async fn generate_data_key(
        &self,
        req: Request<GenerateDataKeyRequest>,
    ) -> Result<Response<GenerateDataKeyResponse>, Status> {
        self.run(
            Op::GenerateDataKey,
            req,
            |r| audited(&r.encryption_context),
            async |caller, r| {
                check_grant_tokens(&r.grant_tokens)?;
                let key_id = key_id_field("KeyId", &r.key_id)?;
                let len = data_key_len(r.key_spec.as_deref(), r.number_of_bytes)?;
                let out = self
                    .kms
                    .generate_data_key(
                        caller,
                        Op::GenerateDataKey,
                        key_id,
                        &context("EncryptionContext", r.encryption_context)?,
                        len,
                        r.dry_run.unwrap_or(false),
                    )
                    .await?;
                Ok(GenerateDataKeyResponse {
                    ciphertext_blob: out.ciphertext_blob,
                    plaintext: out.plaintext.0.to_vec(),
                    key_id: out.key_arn,
                })
            },
        )
        .await
    }

    async fn generate_data_key_without_plaintext(
        &self,
        req: Request<GenerateDataKeyWithoutPlaintextRequest>,
    ) -> Result<Response<GenerateDataKeyWithoutPlaintextResponse>, Status> {
        self.run(
            Op::GenerateDataKeyWithoutPlaintext,
            req,
            |r| audited(&r.encryption_context),
            async |caller, r| {
                check_grant_tokens(&r.grant_tokens)?;
                let key_id = key_id_field("KeyId", &r.key_id)?;
                let len = data_key_len(r.key_spec.as_deref(), r.number_of_bytes)?;
                let out = self
                    .kms
                    .generate_data_key(
                        caller,
                        Op::GenerateDataKeyWithoutPlaintext,
                        key_id,
                        &context("EncryptionContext", r.encryption_context)?,
                        len,
                        r.dry_run.unwrap_or(false),
                    )
                    .await?;
                Ok(GenerateDataKeyWithoutPlaintextResponse {
                    ciphertext_blob: out.ciphertext_blob,
                    key_id: out.key_arn,
                })
            },
        )
        .await
    }

    async fn generate_random(
        &self,
        req: Request<GenerateRandomRequest>,
    ) -> Result<Response<GenerateRandomResponse>, Status> {
        self.run(
            Op::GenerateRandom,
            req,
            |_| None,
            async |caller, r| {
                if let Some(id) = &r.custom_key_store_id {
                    store_id_field("CustomKeyStoreId", id)?;
                }
                let bytes = self
                    .kms
                    .generate_random(caller, r.number_of_bytes, r.custom_key_store_id.as_deref())
                    .await?;
                Ok(GenerateRandomResponse {
                    plaintext: bytes.0.to_vec(),
                })
            },
        )
        .await
    }
}
