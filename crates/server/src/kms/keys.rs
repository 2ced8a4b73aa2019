//! KMS keys: creation (crash-safe), description, listing, tags and key states.

use std::sync::Arc;

use uuid::Uuid;

use super::access::Caller;
use super::fields::{self, check_description};
use super::gate::Authorized;
use super::{decode_marker, page_limit, Kms, Page};
use crate::config::GcmIvMode;
use crate::hsm::{Connection, HsmError};
use crate::iam::document as policy;
use crate::iam::{Kind, Policy};
use crate::metadata::{Failure, KeyRecord, KeyStoreRecord, Precondition, Removal};
use model::error::{ErrorKind, KmsError, KmsResult};
use model::ids::KeyRef;
use model::op::{Op, Unserved};
use model::states::{ConnectionState, KeyState, StateSet};

pub struct CreateKey {
    pub description: Option<String>,
    pub key_usage: Option<String>,
    pub customer_master_key_spec: Option<String>,
    pub key_spec: Option<String>,
    pub origin: Option<String>,
    pub custom_key_store_id: Option<String>,
    pub tags: Vec<(String, String)>,
    pub multi_region: Option<bool>,
    pub policy: Option<String>,
    pub bypass_policy_lockout_safety_check: bool,
}

/// Everything DescribeKey says of a key.
#[derive(Clone, Debug)]
pub struct KeyView {
    pub account_id: String,
    pub key_id: Uuid,
    pub arn: String,
    pub creation_date_ms: i64,
    pub description: String,
    pub key_state: KeyState,
    pub custom_key_store_id: String,
    pub cloud_hsm_cluster_id: String,
    pub deletion_date_ms: Option<i64>,
    pub pending_window_days: Option<i32>,
}

impl KeyView {
    pub fn enabled(&self) -> bool {
        self.key_state == KeyState::Enabled
    }
}

/// A key that passed every condition for a cryptographic operation.
pub struct UsableKey {
    pub id: Uuid,
    pub arn: String,
    pub store_id: String,
    pub cluster_id: String,
    pub conn: Arc<Connection>,
    pub iv_mode: GcmIvMode,
}

const KEY_SPECS: &[&str] = &[
    "RSA_2048",
    "RSA_3072",
    "RSA_4096",
    "ECC_NIST_P256",
    "ECC_NIST_P384",
    "ECC_NIST_P521",
    "ECC_SECG_P256K1",
    "SYMMETRIC_DEFAULT",
    "HMAC_224",
    "HMAC_256",
    "HMAC_384",
    "HMAC_512",
    "SM2",
    "ML_DSA_44",
    "ML_DSA_65",
    "ML_DSA_87",
    "ECC_NIST_EDWARDS25519",
];
const KEY_USAGES: &[&str] = &[
    "SIGN_VERIFY",
    "ENCRYPT_DECRYPT",
    "GENERATE_VERIFY_MAC",
    "KEY_AGREEMENT",
];
const ORIGINS: &[&str] = &["AWS_KMS", "EXTERNAL", "AWS_CLOUDHSM", "EXTERNAL_KEY_STORE"];

fn unsupported(msg: impl Into<String>) -> KmsError {
    KmsError::new(ErrorKind::UnsupportedOperation, msg)
}

/// AWS enum values: a known value other than the supported one is UnsupportedOperation, an
/// unknown one is ValidationException.
fn check_enum(field: &str, value: &str, known: &[&str], supported: &str) -> KmsResult<()> {
    if value == supported {
        Ok(())
    } else if known.contains(&value) {
        Err(unsupported(format!(
            "{field} {value} is not supported in a custom key store; use {supported}"
        )))
    } else {
        Err(KmsError::validation(format!(
            "{field} '{value}' is not one of {}",
            known.join(", ")
        )))
    }
}

/// AWS's tag rules beyond the model's constraints (which `api::aws::constraints` checks
/// first: tag key 1 to 128 characters, value at most 256), as TagException in AWS's words:
/// at most 50 tags, no `aws:` prefix, no duplicate keys (each recorded from real AWS:
/// LocalStack's KMS snapshot). Characters outside letters, digits, spaces and
/// `_ . : / = + - @` are refused too (TagException, hsm-kms's words: not recorded).
pub fn check_tags(tags: &[(String, String)]) -> KmsResult<()> {
    let tag_err = |m: &str| KmsError::new(ErrorKind::Tag, m.to_string());
    if tags.len() > fields::TAGS_PER_KEY {
        return Err(tag_err("Too many tags"));
    }
    let allowed = |c: char| c.is_alphanumeric() || c.is_whitespace() || "_.:/=+-@".contains(c);
    let mut seen = std::collections::HashSet::new();
    for (k, v) in tags {
        if k.to_ascii_lowercase().starts_with("aws:") {
            return Err(tag_err("Tags beginning with aws: are reserved"));
        }
        if !k.chars().all(allowed) || !v.chars().all(allowed) {
            return Err(tag_err(&format!(
                "Tag '{}' contains characters tags may not contain",
                model::error::quoted(k)
            )));
        }
        if !seen.insert(k.as_str()) {
            return Err(tag_err("Duplicate tag keys"));
        }
    }
    Ok(())
}

pub(super) fn timed_out(store_id: &str, limit: std::time::Duration) -> KmsError {
    KmsError::new(
        ErrorKind::DependencyTimeout,
        format!("The HSM of custom key store {store_id} did not answer within {limit:?}"),
    )
}

/// Maps an HSM failure of a store-level operation (`what`: CreateKey's key generation,
/// GenerateRandom) to the AWS exception the caller gets.
pub(super) fn store_hsm_error(store_id: &str, what: &str, e: HsmError) -> KmsError {
    crate::metrics::get().store_hsm_error(store_id);
    match e {
        HsmError::Unavailable(d) => KmsError::new(
            ErrorKind::CustomKeyStoreInvalidState,
            format!("Custom key store {store_id} cannot reach its cluster: {d}"),
        ),
        HsmError::Timeout(limit) => timed_out(store_id, limit),
        other => KmsError::internal(format!("{what} in {store_id}: {other:?}")),
    }
}

impl Kms {
    pub async fn create_key(&self, auth: &Authorized<'_>, req: CreateKey) -> KmsResult<KeyView> {
        let caller = auth.caller();
        let bypass = req.bypass_policy_lockout_safety_check;
        if let Some(d) = &req.description {
            check_description(d)?;
        }
        if req.key_spec.is_some() && req.customer_master_key_spec.is_some() {
            return Err(KmsError::validation(
                "Specify KeySpec or CustomerMasterKeySpec (deprecated), not both",
            ));
        }
        if let Some(spec) = req.key_spec.as_deref() {
            check_enum("KeySpec", spec, KEY_SPECS, "SYMMETRIC_DEFAULT")?;
        }
        if let Some(spec) = req.customer_master_key_spec.as_deref() {
            check_enum(
                "CustomerMasterKeySpec",
                spec,
                &KEY_SPECS[..13],
                "SYMMETRIC_DEFAULT",
            )?;
        }
        if let Some(usage) = req.key_usage.as_deref() {
            check_enum("KeyUsage", usage, KEY_USAGES, "ENCRYPT_DECRYPT")?;
        }
        if req.multi_region == Some(true) {
            return Err(unsupported(
                "Multi-Region keys are not supported in a custom key store",
            ));
        }
        let store_id = match (req.origin.as_deref(), req.custom_key_store_id) {
            (Some(o), _) if !ORIGINS.contains(&o) => {
                return Err(KmsError::validation(format!(
                    "Origin '{o}' is not one of {}",
                    ORIGINS.join(", ")
                )))
            }
            (Some("EXTERNAL"), _) => {
                return Err(unsupported(
                    "Imported key material (Origin EXTERNAL) is not supported",
                ))
            }
            (Some("EXTERNAL_KEY_STORE"), _) => {
                return Err(unsupported("External key stores are not supported"))
            }
            // Tools that know only AWS KMS name no store: the configured default takes them.
            (None | Some("AWS_KMS") | Some("AWS_CLOUDHSM"), None)
                if self.default_keystore.is_some() =>
            {
                self.default_keystore_id().await?
            }
            (None | Some("AWS_KMS"), None) => {
                return Err(unsupported(
                    "hsm-kms creates keys only in custom key stores: name one with \
                     CustomKeyStoreId (and Origin AWS_CLOUDHSM), or set \
                     kms.default_custom_key_store in the service's configuration to the name \
                     or id of the store that takes keys created without one",
                ))
            }
            (Some("AWS_KMS"), Some(_)) => {
                return Err(KmsError::validation(
                    "A key in a custom key store must have Origin AWS_CLOUDHSM",
                ))
            }
            (_, None) => {
                return Err(KmsError::validation(
                    "CustomKeyStoreId is required when Origin is AWS_CLOUDHSM",
                ))
            }
            (_, Some(id)) => id,
        };
        check_tags(&req.tags)?;
        let id = Uuid::new_v4();
        // No policy given: the key has the default key policy, kept as `None` (GetKeyPolicy
        // writes it out), so 10,000 default keys do not carry 10,000 copies of its text.
        if let Some(p) = &req.policy {
            let parsed = Policy::parse(p, Kind::Key)?;
            if !bypass {
                self.check_lockout(caller, &id, &parsed)?;
            }
        }

        let store = self.keystore(&store_id).await?;
        require_connected_for_create(&store)?;
        // Connected through another replica, or before this one started: log in here first.
        self.connection_or_attach(&store_id).await;
        let lock = self.lifecycle_lock(&store_id);
        let _guard = lock.read().await;
        // Re-read under the lock: a disconnect may have finished while we waited.
        let store = self.keystore(&store_id).await?;
        require_connected_for_create(&store)?;
        let cluster = self.cluster(&store.cluster_id).ok_or_else(|| {
            KmsError::new(
                ErrorKind::CloudHsmClusterInvalidConfiguration,
                format!("Cluster {} is not configured", store.cluster_id),
            )
        })?;
        if !cluster.has_two_zones() {
            return Err(KmsError::new(
                ErrorKind::CloudHsmClusterInvalidConfiguration,
                format!(
                    "Cluster {} must contain at least two active HSMs in different availability \
                     zones to create keys; it has {} active",
                    store.cluster_id,
                    cluster.active_hsms()
                ),
            ));
        }
        let conn = self.connection(&store_id).ok_or_else(|| {
            KmsError::new(
                ErrorKind::CustomKeyStoreInvalidState,
                format!("Custom key store {store_id} is not connected"),
            )
        })?;

        // Crash safety: the row exists (invisible, `Creating`) before the token object, and
        // becomes usable only after it; reconnect reconciles rows left in `Creating`.
        let arn = self.scope.key_arn(&id);
        let rec = KeyRecord {
            id,
            custom_key_store_id: store_id.clone(),
            creation_date_ms: self.now(),
            description: req.description.unwrap_or_default(),
            key_state: KeyState::Creating,
            deletion_date_ms: None,
            pending_window_days: None,
            policy: req.policy,
        };
        self.meta.insert_key(&rec, &req.tags).await?;
        if let Err(e) = conn.generate_key(id, arn.clone()).await {
            if matches!(e, HsmError::Timeout(_)) {
                // The HSM may still make the object after the deadline: the row stays
                // `Creating` and the periodic sweep removes both once the call is long over.
                tracing::warn!(key_arn = %arn, "key generation timed out; the half-made key is left for the sweep");
            } else if let Err(db) = self.meta.delete_key(&id).await {
                tracing::error!(key_arn = %arn, error = %db, "removing a half-made key row failed; reconnect reconciles it");
            }
            return Err(store_hsm_error(
                &store_id,
                &format!("generating key material for {arn}"),
                e,
            ));
        }
        // Only a row still `Creating` becomes Enabled: one claimed or removed meanwhile by
        // a sweep (this CreateKey outlasted the creation cutoff) means the key does not
        // exist, whatever the HSM made.
        let creating = StateSet::of(&[KeyState::Creating]);
        if let Err(f) = self
            .meta
            .set_key_state(&id, creating, KeyState::Enabled)
            .await
        {
            if let Failure::Internal(_) | Failure::Unavailable(_) = f {
                // The database failed under the change: it may have been made (and only
                // its answer lost, as when the server restarts at that moment), so the
                // material may belong to an Enabled key and must stay. A row still
                // `Creating` is left, with its material, for the sweep.
                tracing::warn!(key_arn = %arn, "finishing a key creation failed; a half-made key is left for the sweep");
            } else {
                // The row is gone or claimed by a sweep: the key does not exist, so no
                // material may stay. The sweep may have looked for it before the HSM made
                // it, so this destroys too; only a sweep that looks at the same moment can
                // also find it (both then call C_DestroyObject, and one fails).
                if let Err(h) = conn.destroy_key(id).await {
                    tracing::error!(key_arn = %arn, error = ?h, "rollback left orphaned key material");
                }
                let _ = self.meta.delete_key(&id).await;
            }
            return Err(KmsError::internal(format!(
                "finishing the creation of {arn}: {f}"
            )));
        }
        tracing::info!(key_arn = %arn, custom_key_store_id = %store_id, "created key");
        caller.note(model::principal::Resource::Key(id));
        Ok(self.view(
            KeyRecord {
                key_state: KeyState::Enabled,
                ..rec
            },
            &store,
        ))
    }

    /// The id of the configured default custom key store (given by name or id).
    async fn default_keystore_id(&self) -> KmsResult<String> {
        let wanted = self.default_keystore.as_deref().unwrap_or_default();
        if model::ids::is_store_id(wanted) {
            return Ok(wanted.to_string());
        }
        match self.meta.keystore_by_name(wanted).await? {
            Some(rec) => Ok(rec.id),
            None => Err(KmsError::new(
                ErrorKind::CustomKeyStoreNotFound,
                format!(
                    "The default custom key store {} (kms.default_custom_key_store) does not exist",
                    model::error::quoted(wanted)
                ),
            )),
        }
    }

    /// Removes keys whose creation never finished: rows still `Creating` made before
    /// `created_before_ms` (so that no CreateKey can still be working on them) with any token
    /// object they got, and such removals that another sweeper claimed and did not finish.
    /// Runs on connect and from the periodic sweep. Every key is claimed first, with a lease,
    /// as due deletions are: with several replicas sweeping, one destroys its material, and
    /// one frozen past its lease does not destroy it after another took it over.
    pub(super) async fn reconcile_creating_keys(
        &self,
        store_id: &str,
        conn: &Arc<Connection>,
        created_before_ms: i64,
    ) {
        let ids = match self
            .meta
            .abandoned_creations(store_id, created_before_ms)
            .await
        {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(custom_key_store_id = %store_id, error = %e, "listing half-made keys failed");
                return;
            }
        };
        let removal = Removal::Abandoned { created_before_ms };
        for id in ids {
            let arn = self.scope.key_arn(&id);
            let Some(until) = self.claim_removal(&id, &arn, removal).await else {
                continue;
            };
            if let Err(e) = conn.destroy_key_before(id, Some(until)).await {
                // The row stays claimed (`Deleting`); the next pass takes it again.
                tracing::error!(key_arn = %arn, error = ?e, "could not clean up a half-made key");
                continue;
            }
            match self.meta.delete_key(&id).await {
                Ok(()) => {
                    tracing::warn!(key_arn = %arn, "removed a key whose creation was interrupted")
                }
                Err(e) => {
                    tracing::error!(key_arn = %arn, error = %e, "removing a half-made key row failed")
                }
            }
        }
    }

    fn view(&self, rec: KeyRecord, store: &KeyStoreRecord) -> KeyView {
        KeyView {
            account_id: self.scope.account_id.clone(),
            key_id: rec.id,
            arn: self.scope.key_arn(&rec.id),
            creation_date_ms: rec.creation_date_ms,
            description: rec.description,
            key_state: rec.key_state.seen(store.connection_state),
            custom_key_store_id: store.id.clone(),
            cloud_hsm_cluster_id: store.cluster_id.clone(),
            deletion_date_ms: rec.deletion_date_ms,
            pending_window_days: rec.pending_window_days,
        }
    }

    /// The key a KeyId names, aliases included (for cryptographic operations and DescribeKey).
    pub(super) async fn resolve(&self, caller: &Caller, key_ref: &str) -> KmsResult<Uuid> {
        match self.scope.parse_ref(key_ref, &caller.principal.account)? {
            KeyRef::Key(id) => Ok(id),
            KeyRef::Alias(name) => self.alias_target(&name).await,
        }
    }

    /// The AWS exception for `op`'s change to `key` that the metadata database refused; a
    /// refused key state answers as the key-state table says.
    pub(super) fn refused(&self, op: Op, key: &Uuid, f: Failure) -> KmsError {
        let arn = self.scope.key_arn(key);
        match f {
            Failure::NotFound => self.key_not_found(key),
            Failure::Precondition(Precondition::KeyState(state)) => match state.check(op) {
                Err(refusal) => refusal.error(&arn),
                // A race: the conditional change found the key in a state that refuses it,
                // and another change moved it on before the state was read back. The
                // refusal stands (it is what happened at the change's moment); it is not an
                // internal error.
                Ok(()) => KmsError::new(
                    ErrorKind::KmsInvalidState,
                    format!(
                        "{arn} was in a state that does not allow {} when the request ran (it \
                         has changed since: {state}); retry the request",
                        op.name()
                    ),
                ),
            },
            Failure::Precondition(Precondition::Limit(n)) => KmsError::new(
                ErrorKind::Tag,
                format!("{arn} would carry more than {n} tags"),
            ),
            Failure::Precondition(Precondition::GrantLimit { per_grantee, limit }) => {
                KmsError::new(
                    ErrorKind::LimitExceeded,
                    if per_grantee {
                        format!("{arn} already has {limit} grants for this grantee principal")
                    } else {
                        format!("{arn} already has {limit} grants")
                    },
                )
            }
            other => KmsError::internal(format!("{op:?} on {arn}: {other}")),
        }
    }

    fn key_not_found(&self, id: &Uuid) -> KmsError {
        KmsError::new(
            ErrorKind::NotFound,
            format!("Key '{}' does not exist", self.scope.key_arn(id)),
        )
    }

    /// The key row named by a key id or ARN; NotFoundException if there is none.
    pub(super) async fn key_record(&self, caller: &Caller, key_ref: &str) -> KmsResult<KeyRecord> {
        let id = self
            .scope
            .parse_key_ref(key_ref, &caller.principal.account)?;
        self.key_by_id(&id).await
    }

    pub(super) async fn key_by_id(&self, id: &Uuid) -> KmsResult<KeyRecord> {
        match self.meta.key(id).await? {
            Some(k) if k.key_state.visible() => Ok(k),
            _ => Err(self.key_not_found(id)),
        }
    }

    async fn keystore_of(&self, key: &KeyRecord) -> KmsResult<KeyStoreRecord> {
        self.meta
            .keystore(&key.custom_key_store_id)
            .await?
            .ok_or_else(|| KmsError::internal(format!("key {} has no key store", key.id)))
    }

    pub async fn describe_key(&self, auth: &Authorized<'_>) -> KmsResult<KeyView> {
        let key = auth.key()?;
        let store = self.keystore_of(key).await?;
        Ok(self.view(key.clone(), &store))
    }

    pub async fn list_keys(
        &self,
        _: &Authorized<'_>,
        limit: Option<i32>,
        marker: Option<&str>,
    ) -> KmsResult<Page<(Uuid, String)>> {
        let limit = page_limit(limit, 1000, 100)?;
        let after = match marker {
            Some(m) => Some(Uuid::try_parse(&decode_marker(m)?).map_err(|_| {
                KmsError::new(
                    ErrorKind::InvalidMarker,
                    "The marker is not one this service issued",
                )
            })?),
            None => None,
        };
        let rows = self.meta.list_keys(after.as_ref(), limit + 1).await?;
        Ok(Page::of(
            rows,
            limit,
            |r| r.id.to_string(),
            |r| (r.id, self.scope.key_arn(&r.id)),
        ))
    }

    pub async fn list_resource_tags(
        &self,
        auth: &Authorized<'_>,
        limit: Option<i32>,
        marker: Option<&str>,
    ) -> KmsResult<Page<(String, String)>> {
        let limit = page_limit(limit, 50, 50)?;
        let key = auth.key()?;
        let after = marker.map(decode_marker).transpose()?;
        let rows = self
            .meta
            .list_tags(&key.id, after.as_deref(), limit + 1)
            .await?;
        Ok(Page::of(rows, limit, |(k, _)| k.clone(), |t| t))
    }

    /// EnableKey / DisableKey. On a key of a disconnected store the change is recorded and
    /// shows once the store reconnects (the key reads Unavailable meanwhile), as in AWS.
    pub async fn set_key_enabled(&self, auth: &Authorized<'_>) -> KmsResult<()> {
        let op = auth.op();
        let to = match op {
            Op::EnableKey => KeyState::Enabled,
            Op::DisableKey => KeyState::Disabled,
            other => {
                return Err(KmsError::internal(format!(
                    "{} does not enable or disable keys",
                    other.name()
                )))
            }
        };
        let key = auth.key()?;
        self.meta
            .set_key_state(&key.id, KeyState::accepted_by(op), to)
            .await
            .map_err(|f| self.refused(op, &key.id, f))?;
        tracing::info!(key_arn = %self.scope.key_arn(&key.id), state = %to, "key state set");
        Ok(())
    }

    pub async fn update_key_description(
        &self,
        auth: &Authorized<'_>,
        description: &str,
    ) -> KmsResult<()> {
        let op = Op::UpdateKeyDescription;
        check_description(description)?;
        let key = auth.key()?;
        self.meta
            .set_description(&key.id, KeyState::accepted_by(op), description)
            .await
            .map_err(|f| self.refused(op, &key.id, f))
    }

    /// Schedules deletion after `window_days` (7..30, default 30); returns the key's view.
    pub async fn schedule_key_deletion(
        &self,
        auth: &Authorized<'_>,
        window_days: Option<i32>,
    ) -> KmsResult<KeyView> {
        let op = Op::ScheduleKeyDeletion;
        let days = window_days.unwrap_or(30);
        if !(7..=30).contains(&days) {
            return Err(KmsError::validation(format!(
                "PendingWindowInDays must be between 7 and 30, got {days}"
            )));
        }
        let key = auth.key()?;
        let date = self.now() + i64::from(days) * 86_400_000;
        self.meta
            .schedule_deletion(&key.id, KeyState::accepted_by(op), date, days)
            .await
            .map_err(|f| self.refused(op, &key.id, f))?;
        tracing::info!(key_arn = %self.scope.key_arn(&key.id), days, "key deletion scheduled");
        let key = self.key_by_id(&key.id).await?;
        let store = self.keystore_of(&key).await?;
        Ok(self.view(key, &store))
    }

    /// Cancels a scheduled deletion; the key comes back Disabled.
    pub async fn cancel_key_deletion(&self, auth: &Authorized<'_>) -> KmsResult<Uuid> {
        let op = Op::CancelKeyDeletion;
        let key = auth.key()?;
        self.meta
            .cancel_deletion(&key.id, KeyState::accepted_by(op), KeyState::Disabled)
            .await
            .map_err(|f| self.refused(op, &key.id, f))?;
        tracing::info!(key_arn = %self.scope.key_arn(&key.id), "key deletion cancelled");
        Ok(key.id)
    }

    pub async fn tag_resource(
        &self,
        auth: &Authorized<'_>,
        tags: &[(String, String)],
    ) -> KmsResult<()> {
        let op = Op::TagResource;
        if tags.is_empty() {
            return Err(KmsError::validation("Tags must not be empty"));
        }
        check_tags(tags)?;
        let key = auth.key()?;
        self.meta
            .tag_key(
                &key.id,
                KeyState::accepted_by(op),
                tags,
                fields::TAGS_PER_KEY,
            )
            .await
            .map_err(|f| self.refused(op, &key.id, f))
    }

    pub async fn untag_resource(
        &self,
        auth: &Authorized<'_>,
        tag_keys: &[String],
    ) -> KmsResult<()> {
        let op = Op::UntagResource;
        if tag_keys.is_empty() {
            return Err(KmsError::validation("TagKeys must not be empty"));
        }
        let key = auth.key()?;
        self.meta
            .untag_key(&key.id, KeyState::accepted_by(op), tag_keys)
            .await
            .map_err(|f| self.refused(op, &key.id, f))
    }

    pub async fn put_key_policy(
        &self,
        auth: &Authorized<'_>,
        name: Option<&str>,
        doc: &str,
        bypass_lockout_check: bool,
    ) -> KmsResult<()> {
        let op = Op::PutKeyPolicy;
        policy::check_policy_name(name)?;
        let parsed = Policy::parse(doc, Kind::Key)?;
        let key = auth.key()?;
        if !bypass_lockout_check {
            self.check_lockout(auth.caller(), &key.id, &parsed)?;
        }
        self.meta
            .set_policy(&key.id, KeyState::accepted_by(op), doc)
            .await
            .map_err(|f| self.refused(op, &key.id, f))?;
        tracing::info!(key_arn = %self.scope.key_arn(&key.id), "key policy replaced");
        Ok(())
    }

    pub async fn get_key_policy(
        &self,
        auth: &Authorized<'_>,
        name: Option<&str>,
    ) -> KmsResult<String> {
        policy::check_policy_name(name)?;
        let key = auth.key()?;
        Ok(key.policy.clone().unwrap_or_else(|| {
            policy::default_policy(&self.scope.partition, &self.scope.account_id)
        }))
    }

    pub async fn list_key_policies(
        &self,
        _: &Authorized<'_>,
        limit: Option<i32>,
        marker: Option<&str>,
    ) -> KmsResult<Page<String>> {
        page_limit(limit, 1000, 100)?;
        if marker.is_some() {
            // There is one page, so no marker this service issued can follow it.
            return Err(KmsError::new(
                ErrorKind::InvalidMarker,
                "The marker is not one this service issued",
            ));
        }
        Ok(Page {
            items: vec![policy::DEFAULT_POLICY_NAME.to_string()],
            next_marker: None,
        })
    }

    /// Checks every condition of a cryptographic operation on an authorized key: the
    /// key-state table (with the state the caller sees), an active HSM and a live
    /// connection. Key material presence is checked by the HSM call itself.
    pub(super) async fn usable_key(&self, key: &KeyRecord, op: Op) -> KmsResult<UsableKey> {
        let store = self.keystore_of(key).await?;
        let arn = self.scope.key_arn(&key.id);
        if let Err(refusal) = key.key_state.seen(store.connection_state).check(op) {
            tracing::debug!(key_arn = %arn, custom_key_store_id = %store.id, state = %store.connection_state, ?refusal, "refused by the key state");
            return Err(refusal.error(&arn));
        }
        let cluster = self.cluster(&store.cluster_id);
        let active = cluster.as_ref().map(|c| c.active_hsms()).unwrap_or(0);
        if active == 0 {
            return Err(KmsError::invalid_state(format!(
                "{arn} is unusable: cluster {} of custom key store {} has no active HSM",
                store.cluster_id, store.id
            )));
        }
        // CONNECTED for the service but not yet logged in here (connected through another
        // replica, or before this one started): log in now. Without a live connection
        // after that, or with one whose HSM failed (reconnecting): unavailable, as AWS
        // says it.
        let conn = self
            .connection_or_attach(&store.id)
            .await
            .filter(|c| !c.is_degraded());
        let Some(conn) = conn else {
            tracing::debug!(key_arn = %arn, custom_key_store_id = %store.id, "no usable HSM connection");
            return Err(model::states::Refusal::Unavailable.error(&arn));
        };
        Ok(UsableKey {
            id: key.id,
            arn,
            store_id: store.id,
            cluster_id: store.cluster_id,
            conn,
            iv_mode: cluster.map(|c| c.settings.gcm_iv).unwrap_or_default(),
        })
    }
}

impl Kms {
    /// An operation hsm-kms does not serve, on the key its authorization found: the
    /// key-state table first (a disabled key is DisabledException for Sign as for Encrypt),
    /// then the refusal AWS gives for a key in a CloudHSM key store. Never succeeds.
    pub async fn unserved(&self, auth: &Authorized<'_>, how: Unserved) -> KmsResult<()> {
        let key = auth.key()?;
        let store = self.keystore_of(key).await?;
        let arn = self.scope.key_arn(&key.id);
        if let Err(refusal) = key.key_state.seen(store.connection_state).check(auth.op()) {
            return Err(refusal.error(&arn));
        }
        Err(how.error(auth.op(), &arn))
    }
}

fn require_connected_for_create(store: &KeyStoreRecord) -> KmsResult<()> {
    if store.connection_state != ConnectionState::Connected {
        return Err(KmsError::new(
            ErrorKind::CustomKeyStoreInvalidState,
            format!(
                "Custom key store {} is {}; CreateKey requires it to be CONNECTED",
                store.id, store.connection_state
            ),
        ));
    }
    Ok(())
}
