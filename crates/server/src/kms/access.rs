//! Access control: who is calling, and whether a key policy, the caller's identity (IAM)
//! policies and the key's grants allow what they ask, with the IAM evaluation rules: an
//! explicit Deny anywhere wins; otherwise some Allow is needed; nothing said means denied.
//!
//! A key policy statement that names the key's *account* (`"111122223333"` or
//! `arn:aws:iam::111122223333:root`) does not allow anyone by itself: it delegates to the
//! identity policies of that account's principals, as in AWS. The account root is the one
//! principal whose identity permissions are implicit.
//!
//! Policies are compiled once from documents `policy::validate` accepted; evaluation does no
//! JSON work and no allocation beyond the request's condition values.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use crate::iam::{
    decide_account, decide_key, denied, request_alias, Decision, Facts, Identities, Kind, Policy,
};
use model::context::Context;
use model::error::{ErrorKind, KmsError, KmsResult};
use model::op::Scope;
use model::principal::{Principal, Resource};

/// The calling side of one request: who, and from where. The domain notes here which
/// resources the request touched, for the audit trail.
#[derive(Debug)]
pub struct Caller {
    pub principal: Arc<Principal>,
    pub source: Option<SocketAddr>,
    resources: Mutex<Vec<Resource>>,
    /// The kinds of decision that allowed this request so far (`Allowed`).
    allowed: AtomicU8,
}

/// A kind of decision that allowed a request: by identity policies (the account, a store,
/// an alias ARN), by a key's policy or grants, or by a grant's own principals (RetireGrant).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Allowed {
    Identity = 1,
    Key = 2,
    GrantPrincipal = 4,
}

impl Caller {
    pub fn new(principal: Arc<Principal>, source: Option<SocketAddr>) -> Caller {
        Caller {
            principal,
            source,
            resources: Mutex::new(Vec::new()),
            allowed: AtomicU8::new(0),
        }
    }

    /// Records that a decision of `kind` allowed the request.
    pub fn allowed(&self, kind: Allowed) {
        self.allowed.fetch_or(kind as u8, Ordering::Relaxed);
    }

    /// Whether the decisions an operation of `scope` needs have all allowed this request.
    /// The request path checks it after every operation that succeeded, so an operation
    /// whose code forgot to authorize never answers success.
    pub fn authorized_for(&self, scope: Scope) -> bool {
        let needed = match scope {
            Scope::Account | Scope::KeyStore => Allowed::Identity as u8,
            Scope::Key => Allowed::Key as u8,
            Scope::Alias => Allowed::Identity as u8 | Allowed::Key as u8,
            Scope::Grant => Allowed::GrantPrincipal as u8,
            Scope::Caller => 0,
        };
        self.allowed.load(Ordering::Relaxed) & needed == needed
    }

    /// Records a resource the request acted on.
    pub fn note(&self, resource: Resource) {
        let mut r = self.resources.lock().unwrap_or_else(|p| p.into_inner());
        if !r.contains(&resource) {
            r.push(resource);
        }
    }

    /// The keys noted so far.
    pub fn noted_keys(&self) -> Vec<uuid::Uuid> {
        let r = self.resources.lock().unwrap_or_else(|p| p.into_inner());
        r.iter()
            .filter_map(|r| match r {
                Resource::Key(id) => Some(*id),
                _ => None,
            })
            .collect()
    }

    /// Hands over the noted resources (once, for the request's audit line).
    pub fn take_resources(&self) -> Vec<Resource> {
        std::mem::take(&mut *self.resources.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

/// Compiled key policies, by key; an entry is reused while the key's policy text is the same.
#[derive(Default)]
pub struct PolicyCache {
    by_key: std::sync::RwLock<HashMap<uuid::Uuid, (String, Arc<Policy>)>>,
}

/// Keys whose compiled policy is kept; past it the cache starts over (deleted keys' entries
/// go with it).
const POLICY_CACHE_LIMIT: usize = 10_000;

impl super::Kms {
    /// The service acting on its own behalf (resuming stores at start, dev set-up): the
    /// account root.
    pub fn service_caller(&self) -> Caller {
        Caller::new(
            Arc::new(Principal::root(
                &self.scope.partition,
                &self.scope.account_id,
            )),
            None,
        )
    }

    /// The request's condition keys that every operation on a key has.
    pub(super) fn facts<'a>(
        &self,
        caller: &'a Caller,
        ctx: &'a Context,
        key_ref: Option<&'a str>,
    ) -> Facts<'a> {
        Facts::of(&caller.principal)
            .context(ctx)
            .alias(key_ref.and_then(request_alias))
    }
}

/// Access evaluation's state: the identity policies, the default key policy, and compiled
/// key policies.
pub struct Access {
    /// Identity (IAM) policies by principal; replaced on configuration reload.
    identities: std::sync::RwLock<Arc<Identities>>,
    policies: PolicyCache,
    /// The policy of keys without a stored one.
    default_policy: Arc<Policy>,
}

impl Access {
    pub fn new(scope: &model::ids::ArnScope, identities: Identities) -> KmsResult<Access> {
        let default_policy = Policy::parse(
            &crate::iam::document::default_policy(&scope.partition, &scope.account_id),
            Kind::Key,
        )?;
        Ok(Access {
            identities: std::sync::RwLock::new(Arc::new(identities)),
            policies: PolicyCache::default(),
            default_policy: Arc::new(default_policy),
        })
    }

    fn compiled_policy(&self, key: &crate::metadata::KeyRecord) -> KmsResult<Arc<Policy>> {
        let Some(text) = &key.policy else {
            return Ok(Arc::clone(&self.default_policy));
        };
        let cached = self
            .policies
            .by_key
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key.id)
            .filter(|(t, _)| t == text)
            .map(|(_, p)| Arc::clone(p));
        if let Some(p) = cached {
            return Ok(p);
        }
        let p = Arc::new(Policy::parse(text, Kind::Key)?);
        let mut cache = self
            .policies
            .by_key
            .write()
            .unwrap_or_else(|p| p.into_inner());
        if cache.len() >= POLICY_CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key.id, (text.clone(), Arc::clone(&p)));
        Ok(p)
    }

    fn identities(&self) -> Arc<Identities> {
        Arc::clone(&self.identities.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Replaces the identity policies (configuration reload).
    pub fn set_identities(&self, ids: Identities) {
        *self.identities.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ids);
    }
}

impl super::Kms {
    /// Authorises `action` on `key` for the caller: key policy, identity policies, grants.
    /// The key's ARN is noted for the audit trail either way.
    pub(super) async fn authorize_key(
        &self,
        caller: &Caller,
        action: &'static str,
        key: &crate::metadata::KeyRecord,
        ctx: &Context,
        facts: &Facts<'_>,
    ) -> KmsResult<()> {
        // A grant for CreateGrant has rules of its own (see grants.rs).
        self.authorize_key_or(caller, action, key, facts, async || {
            action != model::op::Op::CreateGrant.action()
                && self.granted(caller, key, action, ctx).await
        })
        .await
    }

    /// As `authorize_key`, with `granted` deciding whether a grant allows the request.
    /// The grants are read only when the policies neither allow nor deny.
    pub(super) async fn authorize_key_or(
        &self,
        caller: &Caller,
        action: &'static str,
        key: &crate::metadata::KeyRecord,
        facts: &Facts<'_>,
        granted: impl AsyncFnOnce() -> bool,
    ) -> KmsResult<()> {
        caller.note(Resource::Key(key.id));
        let arn = self.scope.key_arn(&key.id);
        let policy = self.access.compiled_policy(key)?;
        let decision = decide_key(
            &policy,
            &self.access.identities(),
            &caller.principal,
            action,
            &arn,
            facts,
            || false,
        );
        match decision {
            Decision::Allow => {}
            Decision::NoAllow(_) if granted().await => {}
            d => return Err(denied(&caller.principal, action, &arn, d)),
        }
        caller.allowed(Allowed::Key);
        Ok(())
    }

    /// (explicit deny, allow) of the caller's identity policies alone.
    pub(super) fn identities_of(
        &self,
        caller: &Principal,
        action: &str,
        resource: &str,
        facts: &Facts,
    ) -> (bool, bool) {
        self.access
            .identities()
            .evaluate(caller, action, resource, facts)
    }

    /// Authorises an account-level operation (`resource` is `*`, or the store id / alias
    /// ARN noted for the audit trail).
    pub(super) fn authorize_account(
        &self,
        caller: &Caller,
        action: &'static str,
        resource: Option<&str>,
        facts: &Facts<'_>,
    ) -> KmsResult<()> {
        if let Some(r) = resource {
            caller.note(Resource::Named(r.to_string()));
        }
        let resource = resource.filter(|r| r.starts_with("arn:")).unwrap_or("*");
        match decide_account(
            &self.access.identities(),
            &caller.principal,
            &self.scope.account_id,
            action,
            resource,
            facts,
        ) {
            Decision::Allow => {
                caller.allowed(Allowed::Identity);
                Ok(())
            }
            d => Err(denied(&caller.principal, action, resource, d)),
        }
    }

    /// The policy lockout safety check of CreateKey and PutKeyPolicy: the new policy must let
    /// the caller change it again, else MalformedPolicyDocumentException.
    pub(super) fn check_lockout(
        &self,
        caller: &Caller,
        key_id: &uuid::Uuid,
        policy: &Policy,
    ) -> KmsResult<()> {
        let arn = self.scope.key_arn(key_id);
        let facts = Facts::of(&caller.principal);
        let d = decide_key(
            policy,
            &self.access.identities(),
            &caller.principal,
            model::op::Op::PutKeyPolicy.action(),
            &arn,
            &facts,
            || false,
        );
        if d == Decision::Allow {
            Ok(())
        } else {
            Err(KmsError::new(
                ErrorKind::MalformedPolicyDocument,
                format!(
                    "The new key policy will not allow you ({}) to update the key policy in the \
                     future; set BypassPolicyLockoutSafetyCheck to apply it anyway",
                    caller.principal.arn
                ),
            ))
        }
    }
}
