//! gRPC transport: the caller from the connection's certificate, the proto request mapped to
//! a domain call and the reply back (one file per operation family), and domain errors ->
//! gRPC statuses (`status`). Everything else a request goes through (audit, metrics, the
//! failure log) is the transport-neutral request path (`path`). No business rule lives here.
//!
//! Adding an operation: its proto rpc, its `Op` variant (kms/op.rs), its domain method, a
//! line in the table below, and its wire <-> domain mapping in its family's file.

mod aliases;
pub mod auth;
pub mod aws;
pub mod console;
mod crypto;
pub mod failures;
mod grants;
mod keys;
mod keystores;
mod operators;
pub mod path;
pub mod protocol;
pub mod status;
pub mod xks;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use prost_types::Timestamp;
use tonic::{Request, Response, Status};

use crate::audit::Audit;
use crate::kms::access::Caller;
use crate::kms::gate::Gate;
use crate::kms::Kms;
use crate::proto::key_management_service_server::KeyManagementService;
use crate::proto::*;
use model::context::check_context;
use model::error::KmsResult;
use model::op::{Op, Recorded};
use path::{Call, RequestPath};
use status::to_status;

/// The largest request message accepted, in bytes. The largest valid KMS request is a
/// CreateKey with a 32 KiB policy, an 8,192-character description and 50 tags of 128 + 256
/// characters: at most ~150 KiB even in 4-byte UTF-8 characters. tonic reserves a message's
/// announced length before its body arrives, so this also bounds that reservation.
pub const MAX_REQUEST_BYTES: usize = 192 * 1024;

pub struct Service {
    path: RequestPath,
    auth: Arc<auth::Authenticator>,
}

impl Service {
    pub fn new(kms: Arc<Kms>, auth: Arc<auth::Authenticator>, audit: Arc<Audit>) -> Service {
        Service {
            path: RequestPath::new(kms, audit),
            auth,
        }
    }

    /// The request path of one gRPC call: names the caller from the client certificate,
    /// records the request's encryption context when the operation's audit line has one,
    /// runs `handle` (the operation's wire <-> domain mapping) on the shared path, and
    /// answers a refusal as a status carrying the request id (`x-request-id`).
    async fn run<R: Audited + serde::Serialize, T>(
        &self,
        op: Op,
        req: Request<R>,
        handle: impl AsyncFnOnce(&Arc<Kms>, Gate<'_>, R) -> KmsResult<T>,
    ) -> Result<Response<T>, Status> {
        let leaf = req.peer_certs();
        let principal = self
            .auth
            .principal(leaf.as_ref().and_then(|c| c.first()).map(|c| c.as_ref()));
        let source = req.remote_addr();
        let call = Call::new(op, principal.map(|p| Caller::new(p, source)), source);
        let r = req.into_inner();
        let target = intent_target(op, &r);
        let ctx = match op.recorded() {
            Recorded::EncryptionContext => r.encryption_context().and_then(audited),
            // (XKS requests never come through gRPC.)
            Recorded::Resources | Recorded::RequestMetadata => None,
        };
        match self
            .path
            .run(&call, ctx, target, async |kms, gate| {
                // The AWS model's constraints, in AWS's words, as on the AWS front.
                aws::constraints::check_message(op, &r)?;
                handle(kms, gate, r).await
            })
            .await
        {
            Ok(v) => Ok(Response::new(v)),
            Err(e) => Err(refusal(&call, e)),
        }
    }
}

/// The status of a refused or failed request, with the request id to find it in the audit
/// trail. Not on successes: a unique header per response costs measurable throughput.
fn refusal(call: &Call, e: model::error::KmsError) -> Status {
    let mut status = to_status(e);
    let mut id_text = uuid::Uuid::encode_buffer();
    let id_text = call.request_id.hyphenated().encode_lower(&mut id_text);
    if let Ok(id) = tonic::metadata::MetadataValue::try_from(&*id_text) {
        status.metadata_mut().insert("x-request-id", id);
    }
    status
}

/// What a request's audit lines record of it. The encryption context it carries (ReEncrypt:
/// the destination's): only operations whose `Op::recorded` says so are asked. What it
/// names as the thing it changes (a key, a store, an alias), as the caller wrote it: the
/// `intent` line of an operation that `Op::changes_state` has it.
trait Audited {
    fn encryption_context(&self) -> Option<&HashMap<String, String>>;
    fn target(&self) -> Option<&str>;
}

/// A request member that names what the request changes.
trait Target {
    fn target(&self) -> Option<&str>;
}

impl Target for String {
    fn target(&self) -> Option<&str> {
        Some(self.as_str()).filter(|t| !t.is_empty())
    }
}

impl Target for Option<String> {
    fn target(&self) -> Option<&str> {
        self.as_deref().filter(|t| !t.is_empty())
    }
}

/// The target of a request that changes state, for its intent line, quoted as errors quote
/// caller input (cut to 128 characters).
fn intent_target<R: Audited>(op: Op, request: &R) -> Option<String> {
    op.changes_state()
        .then(|| request.target())
        .flatten()
        .map(|t| model::error::quoted(t).into_owned())
}

/// Declares every operation: its gRPC method, its `Op`, its request (and the field its audit
/// line records), its response, and the function that maps it. Expands to the tonic service,
/// to the AWS protocol front's dispatch (the same mapping, on the same messages in AWS's
/// JSON), and to each request's `Audited`.
macro_rules! operations {
    ($($method:ident: $op:ident($req:ident $([$ctx:ident])? $({$target:ident})?) -> $resp:ident = $family:ident::$handler:ident;)+) => {
        #[tonic::async_trait]
        impl KeyManagementService for Service {
            $(
                async fn $method(&self, req: Request<$req>) -> Result<Response<$resp>, Status> {
                    self.run(Op::$op, req, $family::$handler).await
                }
            )+
        }

        $(
            impl Audited for $req {
                fn encryption_context(&self) -> Option<&HashMap<String, String>> {
                    operations!(@context self $($ctx)?)
                }

                fn target(&self) -> Option<&str> {
                    operations!(@target self $($target)?)
                }
            }
        )+

        /// (operation, whether its request names an audited encryption context).
        #[cfg(test)]
        const AUDITED_CONTEXTS: &[(Op, bool)] = &[$((Op::$op, operations!(@has $($ctx)?)),)+];

        /// Runs `call` from its AWS JSON `body`; the response as AWS JSON.
        async fn aws_dispatch(path: &RequestPath, call: &Call, body: &[u8]) -> KmsResult<Vec<u8>> {
            match call.op {
                $(Op::$op => aws::call::<$req, $resp>(path, call, body, $family::$handler).await,)+
                op => match op.unserved() {
                    Some(how) => aws::unserved(path, call, body, how).await,
                    None => Err(model::error::KmsError::internal(format!(
                        "{} is served but has no line in operations!",
                        op.name()
                    ))),
                },
            }
        }

        /// Every member of `op`'s request message, as AWS JSON (the unset ones null).
        fn aws_request_members(op: Op) -> serde_json::Value {
            match op {
                $(Op::$op => serde_json::to_value($req::default()).unwrap_or_default(),)+
                _ => serde_json::Value::Null,
            }
        }

        /// Every top-level member of `op`'s response message, as AWS JSON.
        #[cfg(test)]
        fn aws_response_members(op: Op) -> serde_json::Value {
            match op {
                $(Op::$op => serde_json::to_value($resp::default()).unwrap_or_default(),)+
                _ => serde_json::Value::Null,
            }
        }
    };
    (@context $self:ident $ctx:ident) => { Some(&$self.$ctx) };
    (@context $self:ident) => { None };
    (@target $self:ident $target:ident) => { Target::target(&$self.$target) };
    (@target $self:ident) => { None };
    (@has $ctx:ident) => { true };
    (@has) => { false };
}

operations! {
    create_custom_key_store: CreateCustomKeyStore(CreateCustomKeyStoreRequest {custom_key_store_name}) -> CreateCustomKeyStoreResponse = keystores::create_custom_key_store;
    describe_custom_key_stores: DescribeCustomKeyStores(DescribeCustomKeyStoresRequest) -> DescribeCustomKeyStoresResponse = keystores::describe_custom_key_stores;
    update_custom_key_store: UpdateCustomKeyStore(UpdateCustomKeyStoreRequest {custom_key_store_id}) -> UpdateCustomKeyStoreResponse = keystores::update_custom_key_store;
    delete_custom_key_store: DeleteCustomKeyStore(DeleteCustomKeyStoreRequest {custom_key_store_id}) -> DeleteCustomKeyStoreResponse = keystores::delete_custom_key_store;
    connect_custom_key_store: ConnectCustomKeyStore(ConnectCustomKeyStoreRequest {custom_key_store_id}) -> ConnectCustomKeyStoreResponse = keystores::connect_custom_key_store;
    disconnect_custom_key_store: DisconnectCustomKeyStore(DisconnectCustomKeyStoreRequest {custom_key_store_id}) -> DisconnectCustomKeyStoreResponse = keystores::disconnect_custom_key_store;
    create_key: CreateKey(CreateKeyRequest {custom_key_store_id}) -> CreateKeyResponse = keys::create_key;
    describe_key: DescribeKey(DescribeKeyRequest) -> DescribeKeyResponse = keys::describe_key;
    list_keys: ListKeys(ListKeysRequest) -> ListKeysResponse = keys::list_keys;
    list_resource_tags: ListResourceTags(ListResourceTagsRequest) -> ListResourceTagsResponse = keys::list_resource_tags;
    enable_key: EnableKey(EnableKeyRequest {key_id}) -> EnableKeyResponse = keys::enable_key;
    disable_key: DisableKey(DisableKeyRequest {key_id}) -> DisableKeyResponse = keys::disable_key;
    update_key_description: UpdateKeyDescription(UpdateKeyDescriptionRequest {key_id}) -> UpdateKeyDescriptionResponse = keys::update_key_description;
    schedule_key_deletion: ScheduleKeyDeletion(ScheduleKeyDeletionRequest {key_id}) -> ScheduleKeyDeletionResponse = keys::schedule_key_deletion;
    cancel_key_deletion: CancelKeyDeletion(CancelKeyDeletionRequest {key_id}) -> CancelKeyDeletionResponse = keys::cancel_key_deletion;
    tag_resource: TagResource(TagResourceRequest {key_id}) -> TagResourceResponse = keys::tag_resource;
    untag_resource: UntagResource(UntagResourceRequest {key_id}) -> UntagResourceResponse = keys::untag_resource;
    create_alias: CreateAlias(CreateAliasRequest {alias_name}) -> CreateAliasResponse = aliases::create_alias;
    update_alias: UpdateAlias(UpdateAliasRequest {alias_name}) -> UpdateAliasResponse = aliases::update_alias;
    delete_alias: DeleteAlias(DeleteAliasRequest {alias_name}) -> DeleteAliasResponse = aliases::delete_alias;
    list_aliases: ListAliases(ListAliasesRequest) -> ListAliasesResponse = aliases::list_aliases;
    create_grant: CreateGrant(CreateGrantRequest {key_id}) -> CreateGrantResponse = grants::create_grant;
    list_grants: ListGrants(ListGrantsRequest) -> ListGrantsResponse = grants::list_grants;
    list_retirable_grants: ListRetirableGrants(ListRetirableGrantsRequest) -> ListGrantsResponse = grants::list_retirable_grants;
    retire_grant: RetireGrant(RetireGrantRequest {key_id}) -> RetireGrantResponse = grants::retire_grant;
    revoke_grant: RevokeGrant(RevokeGrantRequest {key_id}) -> RevokeGrantResponse = grants::revoke_grant;
    put_key_policy: PutKeyPolicy(PutKeyPolicyRequest {key_id}) -> PutKeyPolicyResponse = keys::put_key_policy;
    get_key_policy: GetKeyPolicy(GetKeyPolicyRequest) -> GetKeyPolicyResponse = keys::get_key_policy;
    list_key_policies: ListKeyPolicies(ListKeyPoliciesRequest) -> ListKeyPoliciesResponse = keys::list_key_policies;
    encrypt: Encrypt(EncryptRequest [encryption_context]) -> EncryptResponse = crypto::encrypt;
    decrypt: Decrypt(DecryptRequest [encryption_context]) -> DecryptResponse = crypto::decrypt;
    re_encrypt: ReEncrypt(ReEncryptRequest [destination_encryption_context]) -> ReEncryptResponse = crypto::re_encrypt;
    generate_data_key: GenerateDataKey(GenerateDataKeyRequest [encryption_context]) -> GenerateDataKeyResponse = crypto::generate_data_key;
    generate_data_key_without_plaintext: GenerateDataKeyWithoutPlaintext(GenerateDataKeyWithoutPlaintextRequest [encryption_context]) -> GenerateDataKeyWithoutPlaintextResponse = crypto::generate_data_key_without_plaintext;
    generate_random: GenerateRandom(GenerateRandomRequest) -> GenerateRandomResponse = crypto::generate_random;
    get_key_last_usage: GetKeyLastUsage(GetKeyLastUsageRequest) -> GetKeyLastUsageResponse = keys::get_key_last_usage;
    get_caller_identity: GetCallerIdentity(GetCallerIdentityRequest) -> GetCallerIdentityResponse = operators::get_caller_identity;
    describe_custom_key_store_health: DescribeCustomKeyStoreHealth(DescribeCustomKeyStoreHealthRequest) -> DescribeCustomKeyStoreHealthResponse = operators::describe_custom_key_store_health;
    list_key_audit_events: ListKeyAuditEvents(ListKeyAuditEventsRequest) -> ListKeyAuditEventsResponse = operators::list_key_audit_events;
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

/// An encryption context, within the service's bound (`model::context::check_context`).
fn context(field: &str, map: HashMap<String, String>) -> KmsResult<BTreeMap<String, String>> {
    let ctx = map.into_iter().collect();
    check_context(field, &ctx)?;
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every operation has one method, and the operations whose audit line records an
    /// encryption context are exactly those whose request names the one to record.
    #[test]
    fn every_operation_has_a_method_and_its_audited_context() {
        let ops: Vec<Op> = AUDITED_CONTEXTS.iter().map(|(op, _)| *op).collect();
        assert_eq!(ops, Op::served().collect::<Vec<_>>());
        for (op, has) in AUDITED_CONTEXTS {
            assert_eq!(*has, op.recorded() == Recorded::EncryptionContext, "{op:?}");
        }
    }
}
