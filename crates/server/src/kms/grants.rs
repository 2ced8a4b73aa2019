//! Grants: CreateGrant, ListGrants, ListRetirableGrants, RetireGrant, RevokeGrant, and the
//! check that lets a grant allow a request no policy allows.
//!
//! Grants take effect at once here (one metadata database, no eventual consistency), so grant
//! tokens are checked for form (the API layer does so for every request that carries them)
//! and, in RetireGrant, looked up; a request never waits for one.

use std::collections::BTreeMap;

use uuid::Uuid;

use super::access::Caller;
use super::fields;
use super::gate::Authorized;
use super::{decode_marker, page_limit, Kms, Page};
use crate::metadata::{Failure, GrantRecord};
use model::context::Context;
use model::error::{ErrorKind, KmsError, KmsResult};
use model::op::Op;
use model::states::KeyState;

/// The other grant operations AWS defines (asymmetric and HMAC keys): ValidationException
/// for a symmetric key, as AWS answers.
const OTHER_OPERATIONS: &[&str] = &[
    "Sign",
    "Verify",
    "GetPublicKey",
    "GenerateDataKeyPair",
    "GenerateDataKeyPairWithoutPlaintext",
    "GenerateMac",
    "VerifyMac",
    "DeriveSharedSecret",
];

/// AWS's quotas: grants on one key, and grants on one key for one grantee principal
/// (LimitExceededException past them).
pub const GRANTS_PER_KEY: usize = 50_000;
pub const GRANTS_PER_GRANTEE: usize = 500;

const TOKEN_PREFIX: &str = "hsmkms-grant-token-v1.";

pub struct CreateGrant {
    pub grantee_principal: String,
    pub retiring_principal: Option<String>,
    pub operations: Vec<String>,
    pub context_subset: Option<Context>,
    pub context_equals: Option<Context>,
    pub name: Option<String>,
}

pub struct GrantView {
    pub record: GrantRecord,
    pub key_arn: String,
}

/// PrincipalIdType: 1..256 characters of `[\w+=,.@:/-]`.
pub fn check_principal_id(field: &str, v: &str) -> KmsResult<()> {
    let ok = fields::PRINCIPAL_CHARS.contains(&v.chars().count())
        && v.chars()
            .all(|c| c.is_alphanumeric() || c == '_' || "+=,.@:/-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(KmsError::validation(format!(
            "{field} must be 1 to 256 characters of letters, digits and _+=,.@:/-"
        )))
    }
}

/// GrantTokens: at most 10, each 1..8192 characters, each one this service issued.
pub fn check_grant_tokens(tokens: &[String]) -> KmsResult<()> {
    if tokens.len() > fields::GRANT_TOKENS_PER_REQUEST {
        return Err(KmsError::validation(
            "GrantTokens may hold at most 10 tokens",
        ));
    }
    for t in tokens {
        if !fields::GRANT_TOKEN_CHARS.contains(&t.chars().count()) {
            return Err(KmsError::validation(
                "Each grant token must be 1 to 8192 characters long",
            ));
        }
        if !is_token(t) {
            return Err(KmsError::new(
                ErrorKind::InvalidGrantToken,
                "The grant token is not one this service issued",
            ));
        }
    }
    Ok(())
}

fn is_token(t: &str) -> bool {
    t.strip_prefix(TOKEN_PREFIX)
        .is_some_and(|rest| rest.len() == 128 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

fn check_grant_id(id: &str) -> KmsResult<()> {
    if id.is_empty() || id.chars().count() > 128 {
        return Err(KmsError::validation(
            "GrantId must be 1 to 128 characters long",
        ));
    }
    if id.len() != 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(KmsError::new(
            ErrorKind::InvalidGrantId,
            format!("{id} is not a grant id this service issued"),
        ));
    }
    Ok(())
}

fn check_constraint(field: &str, ctx: &Context) -> KmsResult<()> {
    if ctx.len() > 8 {
        return Err(KmsError::validation(format!(
            "{field} may hold at most 8 encryption context pairs"
        )));
    }
    if ctx.values().any(|v| v.chars().count() > 384) {
        return Err(KmsError::validation(format!(
            "{field} values may be at most 384 characters long"
        )));
    }
    Ok(())
}

/// Whether a grant's encryption context constraint admits a request's context.
fn constraint_holds(g: &GrantRecord, ctx: &Context) -> bool {
    let subset_ok = g
        .context_subset
        .as_ref()
        .is_none_or(|want| want.iter().all(|(k, v)| ctx.get(k) == Some(v)));
    let equals_ok = g.context_equals.as_ref().is_none_or(|want| want == ctx);
    subset_ok && equals_ok
}

fn random_hex(bytes: usize) -> KmsResult<String> {
    let mut b = vec![0u8; bytes];
    getrandom::fill(&mut b).map_err(KmsError::internal)?;
    Ok(hex::encode(b))
}

impl Kms {
    /// Whether one of the key's grants lets the caller do `action` with this encryption
    /// context. Grants do not constrain DescribeKey and RetireGrant, which have no context.
    pub(super) async fn granted(
        &self,
        caller: &Caller,
        key: &crate::metadata::KeyRecord,
        action: &str,
        ctx: &Context,
    ) -> bool {
        let Some(op) = action.strip_prefix("kms:") else {
            return false;
        };
        let grants = match self.meta.key_grants(&key.id).await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "reading grants failed");
                return false;
            }
        };
        let no_context = matches!(op, "DescribeKey" | "RetireGrant");
        grants.iter().any(|g| {
            g.grantee_principal == caller.principal.arn
                && g.operations.iter().any(|o| o == op)
                && (no_context || constraint_holds(g, ctx))
        })
    }

    /// A grantee's CreateGrant: only what its own grants allow, with constraints at least
    /// as strict as theirs.
    pub(super) async fn grant_allows_child(
        &self,
        caller: &Caller,
        key: &Uuid,
        child: &GrantRecord,
    ) -> bool {
        let Ok(grants) = self.meta.key_grants(key).await else {
            return false;
        };
        grants.iter().any(|g| {
            g.grantee_principal == caller.principal.arn
                && g.operations.iter().any(|o| o == "CreateGrant")
                && child.operations.iter().all(|o| g.operations.contains(o))
                && g.context_subset.as_ref().is_none_or(|want| {
                    let have = child
                        .context_equals
                        .as_ref()
                        .or(child.context_subset.as_ref());
                    have.is_some_and(|h| want.iter().all(|(k, v)| h.get(k) == Some(v)))
                })
                && g.context_equals
                    .as_ref()
                    .is_none_or(|want| child.context_equals.as_ref() == Some(want))
        })
    }

    /// The grant a CreateGrant request describes, checked, before anything is decided or
    /// read (its key id is set once the key is known: `create_grant`).
    pub fn new_grant(&self, req: CreateGrant) -> KmsResult<GrantRecord> {
        check_principal_id("GranteePrincipal", &req.grantee_principal)?;
        if let Some(r) = &req.retiring_principal {
            check_principal_id("RetiringPrincipal", r)?;
        }
        if let Some(n) = &req.name {
            let ok = fields::GRANT_NAME_CHARS.contains(&n.len())
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b":/_-".contains(&b));
            if !ok {
                return Err(KmsError::validation(
                    "Name must be 1 to 256 characters of letters, digits and : / _ -",
                ));
            }
        }
        if req.operations.is_empty() {
            return Err(KmsError::validation(
                "Operations must name at least one operation",
            ));
        }
        let mut ops: Vec<String> = Vec::new();
        for o in &req.operations {
            if OTHER_OPERATIONS.contains(&o.as_str()) {
                return Err(KmsError::validation(format!(
                    "Operation {o} is not valid for a symmetric encryption KMS key"
                )));
            }
            if !model::op::grant_operations().any(|g| g == o) {
                return Err(KmsError::validation(format!(
                    "Operation '{o}' is not one of {}, {}",
                    model::op::grant_operations().collect::<Vec<_>>().join(", "),
                    OTHER_OPERATIONS.join(", ")
                )));
            }
            if !ops.contains(o) {
                ops.push(o.clone());
            }
        }
        ops.sort();
        for (field, c) in [
            ("EncryptionContextSubset", &req.context_subset),
            ("EncryptionContextEquals", &req.context_equals),
        ] {
            if let Some(c) = c {
                check_constraint(field, c)?;
            }
        }
        let grant_id = random_hex(32)?;
        Ok(GrantRecord {
            token: format!("{TOKEN_PREFIX}{grant_id}{}", random_hex(32)?),
            grant_id,
            key_id: Uuid::nil(),
            name: req.name,
            grantee_principal: req.grantee_principal,
            retiring_principal: req.retiring_principal,
            issuing_account: format!(
                "arn:{}:iam::{}:root",
                self.scope.partition, self.scope.account_id
            ),
            operations: ops,
            context_subset: req.context_subset.map(BTreeMap::from_iter),
            context_equals: req.context_equals.map(BTreeMap::from_iter),
            creation_date_ms: self.now(),
        })
    }

    /// Saves `record` (from `new_grant`, authorized as `Subject::NewGrant`) on the key.
    pub async fn create_grant(
        &self,
        auth: &Authorized<'_>,
        mut record: GrantRecord,
        dry_run: bool,
    ) -> KmsResult<(String, String)> {
        let key = auth.key()?;
        record.key_id = key.id;
        if dry_run {
            return Err(super::crypto::dry_run());
        }
        let op = Op::CreateGrant;
        let saved = self
            .meta
            .insert_grant(
                &record,
                KeyState::accepted_by(op),
                GRANTS_PER_KEY,
                GRANTS_PER_GRANTEE,
            )
            .await
            .map_err(|f| self.refused(op, &key.id, f))?;
        tracing::info!(key_arn = %self.scope.key_arn(&key.id), grant_id = %saved.grant_id, grantee = %saved.grantee_principal, "grant created");
        Ok((saved.grant_id, saved.token))
    }

    pub async fn list_grants(
        &self,
        auth: &Authorized<'_>,
        grant_id: Option<&str>,
        grantee: Option<&str>,
        limit: Option<i32>,
        marker: Option<&str>,
    ) -> KmsResult<Page<GrantView>> {
        let limit = page_limit(limit, 1000, 50)?;
        if let Some(id) = grant_id {
            check_grant_id(id)?;
        }
        if let Some(g) = grantee {
            check_principal_id("GranteePrincipal", g)?;
        }
        let after = marker.map(decode_marker).transpose()?;
        let key = auth.key()?;
        let grants = self.meta.key_grants(&key.id).await?;
        let matching = grants.iter().filter(|g| {
            grant_id.is_none_or(|id| g.grant_id == id)
                && grantee.is_none_or(|p| g.grantee_principal == p)
                && after.as_deref().is_none_or(|a| g.grant_id.as_str() > a)
        });
        self.grant_page(matching.cloned().collect(), limit)
    }

    fn grant_page(&self, rows: Vec<GrantRecord>, limit: usize) -> KmsResult<Page<GrantView>> {
        Ok(Page::of(
            rows,
            limit,
            |g| g.grant_id.clone(),
            |g| GrantView {
                key_arn: self.scope.key_arn(&g.key_id),
                record: g,
            },
        ))
    }

    pub async fn list_retirable_grants(
        &self,
        _: &Authorized<'_>,
        retiring_principal: &str,
        limit: Option<i32>,
        marker: Option<&str>,
    ) -> KmsResult<Page<GrantView>> {
        let limit = page_limit(limit, 1000, 50)?;
        check_principal_id("RetiringPrincipal", retiring_principal)?;
        let after = marker.map(decode_marker).transpose()?;
        let rows = self
            .meta
            .retirable_grants(retiring_principal, after.as_deref(), limit + 1)
            .await?;
        self.grant_page(rows, limit)
    }

    /// The grant a RetireGrant request names: by grant token, or by key and grant id.
    pub(super) async fn named_grant(
        &self,
        caller: &Caller,
        token: Option<&str>,
        key_ref: Option<&str>,
        grant_id: Option<&str>,
    ) -> KmsResult<GrantRecord> {
        match (token, key_ref, grant_id) {
            (Some(t), _, _) => {
                check_grant_tokens(std::slice::from_ref(&t.to_string()))?;
                let g = self.meta.grant_by_token(t).await?.ok_or_else(|| {
                    KmsError::new(
                        ErrorKind::NotFound,
                        "The grant of this grant token does not exist",
                    )
                })?;
                if let Some(id) = grant_id {
                    if id != g.grant_id {
                        return Err(KmsError::new(
                            ErrorKind::InvalidGrantId,
                            "GrantId does not match the grant token",
                        ));
                    }
                }
                Ok(g)
            }
            (None, Some(k), Some(id)) => {
                check_grant_id(id)?;
                let key = self.key_record(caller, k).await?;
                self.meta
                    .key_grants(&key.id)
                    .await?
                    .iter()
                    .find(|g| g.grant_id == id)
                    .cloned()
                    .ok_or_else(|| grant_missing(id, &self.scope.key_arn(&key.id)))
            }
            _ => Err(KmsError::validation(
                "Specify GrantToken, or both KeyId and GrantId",
            )),
        }
    }

    /// RetireGrant of the grant its authorization found (`gate::Subject::Grant`).
    pub async fn retire_grant(&self, auth: &Authorized<'_>, dry_run: bool) -> KmsResult<()> {
        let grant = auth.grant()?;
        let key_arn = self.scope.key_arn(&grant.key_id);
        if dry_run {
            return Err(super::crypto::dry_run());
        }
        self.meta
            .delete_grant(&grant.key_id, &grant.grant_id)
            .await
            .map_err(|f| match f {
                Failure::NotFound => grant_missing(&grant.grant_id, &key_arn),
                f => f.into(),
            })?;
        tracing::info!(%key_arn, grant_id = %grant.grant_id, "grant retired");
        Ok(())
    }

    pub async fn revoke_grant(
        &self,
        auth: &Authorized<'_>,
        grant_id: &str,
        dry_run: bool,
    ) -> KmsResult<()> {
        check_grant_id(grant_id)?;
        let key = auth.key()?;
        let key_arn = self.scope.key_arn(&key.id);
        if !self
            .meta
            .key_grants(&key.id)
            .await?
            .iter()
            .any(|g| g.grant_id == grant_id)
        {
            return Err(grant_missing(grant_id, &key_arn));
        }
        if dry_run {
            return Err(super::crypto::dry_run());
        }
        self.meta
            .delete_grant(&key.id, grant_id)
            .await
            .map_err(|f| match f {
                Failure::NotFound => grant_missing(grant_id, &key_arn),
                f => f.into(),
            })?;
        tracing::info!(%key_arn, %grant_id, "grant revoked");
        Ok(())
    }
}

fn grant_missing(id: &str, key_arn: &str) -> KmsError {
    KmsError::new(
        ErrorKind::NotFound,
        format!("Grant {id} of {key_arn} does not exist"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(subset: Option<&[(&str, &str)]>, equals: Option<&[(&str, &str)]>) -> GrantRecord {
        let m = |p: &[(&str, &str)]| {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        GrantRecord {
            grant_id: "g".into(),
            key_id: Uuid::nil(),
            name: None,
            grantee_principal: "p".into(),
            retiring_principal: None,
            issuing_account: "a".into(),
            operations: vec!["Decrypt".into()],
            context_subset: subset.map(m),
            context_equals: equals.map(m),
            creation_date_ms: 0,
            token: "t".into(),
        }
    }

    #[test]
    fn constraints() {
        let ctx = |p: &[(&str, &str)]| -> Context {
            p.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let sub = grant(Some(&[("Department", "IT")]), None);
        assert!(constraint_holds(&sub, &ctx(&[("Department", "IT")])));
        assert!(constraint_holds(
            &sub,
            &ctx(&[("Department", "IT"), ("x", "y")])
        ));
        assert!(!constraint_holds(&sub, &ctx(&[("Department", "it")])));
        assert!(!constraint_holds(&sub, &ctx(&[])));
        let eq = grant(None, Some(&[("Department", "IT")]));
        assert!(constraint_holds(&eq, &ctx(&[("Department", "IT")])));
        assert!(!constraint_holds(
            &eq,
            &ctx(&[("Department", "IT"), ("x", "y")])
        ));
        assert!(constraint_holds(&grant(None, None), &ctx(&[])));
    }

    #[test]
    fn tokens_and_ids() {
        let t = format!("{TOKEN_PREFIX}{}", "ab".repeat(64));
        assert!(check_grant_tokens(std::slice::from_ref(&t)).is_ok());
        assert_eq!(
            check_grant_tokens(&["garbage".into()]).unwrap_err().kind,
            ErrorKind::InvalidGrantToken
        );
        assert_eq!(
            check_grant_tokens(&vec![t; 11]).unwrap_err().kind,
            ErrorKind::Validation
        );
        assert!(check_grant_id(&"0f".repeat(32)).is_ok());
        assert_eq!(
            check_grant_id("nope").unwrap_err().kind,
            ErrorKind::InvalidGrantId
        );
    }
}
