//! The authorization step of every request, before the domain runs.
//!
//! The request path gives each request one `Gate`, for its operation. The front's mapping
//! names what the request acts on (a `Subject`: the account, a key store, a key, the key of
//! a ciphertext, an alias, a grant) and passes it through the gate, which decides by the
//! operation's declared scope (`Op::scope`, an exhaustive table) and IAM actions. What
//! comes out, `Authorized`, is the only way to call a domain method: it cannot be built
//! elsewhere, so an operation that skips the decision does not compile.
//!
//! The decision reads what it needs (the key record, the alias's target, the grant) and
//! hands it on, so the domain does not read it again: one read and one HSM round trip per
//! operation, as before.

use super::access::{Allowed, Caller};
use super::Kms;
use crate::iam::{Decision, Facts};
use crate::metadata::{GrantRecord, KeyRecord};
use model::context::{Context, NO_CONTEXT};
use model::error::{ErrorKind, KmsError, KmsResult};
use model::op::{Op, Scope};
use model::principal::{Principal, Resource};

/// A key as a request names it.
#[derive(Clone, Copy)]
pub struct KeyNamed<'a> {
    /// The KeyId member as the request wrote it: key id or key ARN, or, where `aliases`,
    /// alias name or alias ARN.
    pub key_ref: &'a str,
    /// Whether an alias may name the key (DescribeKey and the cryptographic operations).
    pub aliases: bool,
    /// The encryption context the request uses with the key: its condition keys, and what
    /// grant constraints are checked against.
    pub ctx: &'a Context,
}

impl<'a> KeyNamed<'a> {
    /// A key by key id or key ARN, with no encryption context.
    pub fn id(key_ref: &'a str) -> KeyNamed<'a> {
        KeyNamed {
            key_ref,
            aliases: false,
            ctx: &NO_CONTEXT,
        }
    }

    /// A key by key id, key ARN, alias name or alias ARN, used with `ctx`.
    pub fn any(key_ref: &'a str, ctx: &'a Context) -> KeyNamed<'a> {
        KeyNamed {
            key_ref,
            aliases: true,
            ctx,
        }
    }
}

/// What a request acts on, as it names it. Each variant belongs to one scope.
pub enum Subject<'a> {
    /// `Scope::Account`: resource `*`, the caller's identity policies.
    Account,
    /// `Scope::Account` with the BypassPolicyLockoutSafetyCheck condition key (CreateKey).
    AccountBypassingLockout(bool),
    /// `Scope::KeyStore`: the store the request names, if any (noted for the audit trail).
    KeyStore(Option<&'a str>),
    /// `Scope::Key`: a key the request names.
    Key(KeyNamed<'a>),
    /// `Scope::Key`: PutKeyPolicy, with its BypassPolicyLockoutSafetyCheck condition key.
    KeyPolicy(KeyNamed<'a>, bool),
    /// `Scope::Key`: the key that encrypted `blob` (Decrypt). A KeyId the request names must
    /// be that key (IncorrectKeyException).
    Ciphertext {
        blob: &'a [u8],
        named: Option<&'a str>,
        ctx: &'a Context,
    },
    /// `Scope::Key`: ReEncrypt's two keys: the source's (kms:ReEncryptFrom), the
    /// destination (kms:ReEncryptTo).
    ReEncrypt {
        blob: &'a [u8],
        named: Option<&'a str>,
        source_ctx: &'a Context,
        destination: KeyNamed<'a>,
    },
    /// `Scope::Key`: CreateGrant of `child` on a key: the key policy with the grant's
    /// condition keys, or a grant of the caller that allows this child.
    NewGrant(&'a str, &'a GrantRecord),
    /// `Scope::Alias`: the alias, and the key it is to point to (CreateAlias, UpdateAlias).
    /// Its current key, if it has one, is authorized too.
    Alias {
        name: &'a str,
        target: Option<&'a str>,
    },
    /// `Scope::Key`: a key AWS KMS names in an XKS proxy request, with the request's
    /// metadata as condition keys (`xks:KmsKeyArn`, ...).
    XksKey(KeyNamed<'a>, &'a [(&'static str, &'a str)]),
    /// `Scope::Caller`: the caller itself; nothing is decided (GetCallerIdentity).
    Caller,
    /// `Scope::Grant`: a grant by its token, or by key and grant id (RetireGrant).
    Grant {
        token: Option<&'a str>,
        key_ref: Option<&'a str>,
        grant_id: Option<&'a str>,
    },
}

impl Subject<'_> {
    fn scope(&self) -> Scope {
        match self {
            Subject::Account | Subject::AccountBypassingLockout(_) => Scope::Account,
            Subject::KeyStore(_) => Scope::KeyStore,
            Subject::Key(_)
            | Subject::KeyPolicy(..)
            | Subject::Ciphertext { .. }
            | Subject::ReEncrypt { .. }
            | Subject::NewGrant(..)
            | Subject::XksKey(..) => Scope::Key,
            Subject::Alias { .. } => Scope::Alias,
            Subject::Grant { .. } => Scope::Grant,
            Subject::Caller => Scope::Caller,
        }
    }
}

/// One request's way to the domain: used once, for its operation.
pub struct Gate<'c> {
    caller: &'c Caller,
    op: Op,
}

/// A request whose operation was allowed on what it names, with what the decision read:
/// the key(s), the alias's current key, the grant.
pub struct Authorized<'c> {
    caller: &'c Caller,
    op: Op,
    key: Option<KeyRecord>,
    /// ReEncrypt's destination; UpdateAlias's new target.
    other: Option<KeyRecord>,
    grant: Option<GrantRecord>,
}

impl<'c> Authorized<'c> {
    pub fn caller(&self) -> &'c Caller {
        self.caller
    }

    pub fn op(&self) -> Op {
        self.op
    }

    /// The key the request names (Key scope; for aliases, the key the alias points to now,
    /// or the new target of CreateAlias).
    pub fn key(&self) -> KmsResult<&KeyRecord> {
        self.key.as_ref().ok_or_else(|| self.missing("key"))
    }

    /// ReEncrypt's destination key; UpdateAlias's new target.
    pub fn other_key(&self) -> KmsResult<&KeyRecord> {
        self.other
            .as_ref()
            .ok_or_else(|| self.missing("second key"))
    }

    /// RetireGrant's grant.
    pub fn grant(&self) -> KmsResult<&GrantRecord> {
        self.grant.as_ref().ok_or_else(|| self.missing("grant"))
    }

    fn missing(&self, what: &str) -> KmsError {
        KmsError::internal(format!(
            "{} asked for a {what} its authorization did not read",
            self.op.name()
        ))
    }
}

impl<'c> Gate<'c> {
    pub fn new(caller: &'c Caller, op: Op) -> Gate<'c> {
        Gate { caller, op }
    }

    /// Decides whether the caller may do the gate's operation on `subject`; NotFound and
    /// the other errors of reading what the subject names come first, as in AWS.
    pub async fn authorize(self, kms: &Kms, subject: Subject<'_>) -> KmsResult<Authorized<'c>> {
        let Gate { caller, op } = self;
        if subject.scope() != op.scope() {
            return Err(KmsError::internal(format!(
                "{} is authorized against {:?}, and its request named a {:?} subject",
                op.name(),
                op.scope(),
                subject.scope()
            )));
        }
        let mut done = Authorized {
            caller,
            op,
            key: None,
            other: None,
            grant: None,
        };
        let action = op.action();
        match subject {
            Subject::Caller => {}
            Subject::Account => {
                kms.authorize_account(caller, action, None, &Facts::of(&caller.principal))?;
            }
            Subject::AccountBypassingLockout(bypass) => {
                let facts =
                    Facts::of(&caller.principal).flag("kms:BypassPolicyLockoutSafetyCheck", bypass);
                kms.authorize_account(caller, action, None, &facts)?;
            }
            Subject::KeyStore(id) => {
                kms.authorize_account(caller, action, id, &Facts::of(&caller.principal))?;
            }
            Subject::Key(named) => {
                let key = kms.named_key(caller, named).await?;
                let facts = kms.facts(caller, named.ctx, named.aliases.then_some(named.key_ref));
                kms.authorize_key(caller, action, &key, named.ctx, &facts)
                    .await?;
                done.key = Some(key);
            }
            Subject::XksKey(named, metadata) => {
                let key = kms.named_key(caller, named).await?;
                let facts = metadata.iter().fold(
                    kms.facts(caller, &NO_CONTEXT, None),
                    |facts, (name, value)| facts.value(name, vec![value.to_string()]),
                );
                kms.authorize_key(caller, action, &key, &NO_CONTEXT, &facts)
                    .await?;
                done.key = Some(key);
            }
            Subject::KeyPolicy(named, bypass) => {
                let key = kms.named_key(caller, named).await?;
                let facts = kms
                    .facts(caller, &NO_CONTEXT, None)
                    .flag("kms:BypassPolicyLockoutSafetyCheck", bypass);
                kms.authorize_key(caller, action, &key, &NO_CONTEXT, &facts)
                    .await?;
                done.key = Some(key);
            }
            Subject::Ciphertext { blob, named, ctx } => {
                let key = kms.ciphertext_key(caller, blob, named).await?;
                let facts = kms.facts(caller, ctx, named);
                kms.authorize_key(caller, action, &key, ctx, &facts).await?;
                done.key = Some(key);
            }
            Subject::ReEncrypt {
                blob,
                named,
                source_ctx,
                destination,
            } => {
                let [from, to] = op.actions() else {
                    return Err(KmsError::internal("ReEncrypt has two actions"));
                };
                let source = kms.ciphertext_key(caller, blob, named).await?;
                let facts = kms.facts(caller, source_ctx, named);
                kms.authorize_key(caller, from, &source, source_ctx, &facts)
                    .await?;
                let dest = kms.named_key(caller, destination).await?;
                let facts = kms.facts(caller, destination.ctx, Some(destination.key_ref));
                kms.authorize_key(caller, to, &dest, destination.ctx, &facts)
                    .await?;
                done.key = Some(source);
                done.other = Some(dest);
            }
            Subject::NewGrant(key_ref, child) => {
                let key = kms.named_key(caller, KeyNamed::id(key_ref)).await?;
                // Condition keys of CreateGrant: the constraint's context, the operations
                // granted, and whether the grantee is an AWS service (never, here).
                let constraint = child
                    .context_equals
                    .as_ref()
                    .or(child.context_subset.as_ref())
                    .unwrap_or(&NO_CONTEXT);
                let facts = kms
                    .facts(caller, constraint, Some(key_ref))
                    .value("kms:GrantOperations", child.operations.clone())
                    .flag("kms:GrantIsForAWSResource", false)
                    .value(
                        "kms:GranteePrincipal",
                        vec![child.grantee_principal.clone()],
                    );
                kms.authorize_key_or(caller, action, &key, &facts, async || {
                    kms.grant_allows_child(caller, &key.id, child).await
                })
                .await?;
                done.key = Some(key);
            }
            Subject::Alias { name, target } => {
                // The new target is named by the request: a missing one is NotFound before
                // anything is decided; then the alias's current key, if it must exist.
                let target = match target {
                    Some(t) => Some(kms.named_key(caller, KeyNamed::id(t)).await?),
                    None => None,
                };
                let current = match op {
                    Op::CreateAlias => None,
                    _ => Some(kms.key_by_id(&kms.alias_target(name).await?).await?),
                };
                let facts = Facts::of(&caller.principal);
                kms.authorize_account(caller, action, Some(&kms.scope.alias_arn(name)), &facts)?;
                for key in current.iter().chain(target.iter()) {
                    kms.authorize_key(caller, action, key, &NO_CONTEXT, &facts)
                        .await?;
                }
                (done.key, done.other) = match current {
                    Some(c) => (Some(c), target),
                    None => (target, None),
                };
            }
            Subject::Grant {
                token,
                key_ref,
                grant_id,
            } => {
                let grant = kms.named_grant(caller, token, key_ref, grant_id).await?;
                kms.authorize_grant_principal(caller, &grant)?;
                done.grant = Some(grant);
            }
        }
        Ok(done)
    }
}

impl Kms {
    /// The key a request names; NotFoundException if there is none.
    async fn named_key(&self, caller: &Caller, named: KeyNamed<'_>) -> KmsResult<KeyRecord> {
        let id = if named.aliases {
            self.resolve(caller, named.key_ref).await?
        } else {
            self.scope
                .parse_key_ref(named.key_ref, &caller.principal.account)?
        };
        self.key_by_id(&id).await
    }

    /// The key that encrypted `blob`; `named`, the KeyId the request gave, must be it.
    async fn ciphertext_key(
        &self,
        caller: &Caller,
        blob: &[u8],
        named: Option<&str>,
    ) -> KmsResult<KeyRecord> {
        let blob = super::ciphertext::parse(blob)?;
        if let Some(want) = named {
            let want = self.resolve(caller, want).await?;
            if want != blob.key_id {
                // AWS's words (recorded: test_re_encrypt_incorrect_source_key).
                return Err(KmsError::new(
                    ErrorKind::IncorrectKey,
                    "The key ID in the request does not identify a CMK that can perform this \
                     operation.",
                ));
            }
        }
        match self.key_by_id(&blob.key_id).await {
            // A blob naming no key here is not a ciphertext of this service.
            Err(e) if e.kind == ErrorKind::NotFound && named.is_none() => Err(KmsError::new(
                ErrorKind::InvalidCiphertext,
                "The ciphertext refers to a KMS key that does not exist",
            )),
            other => other,
        }
    }

    /// RetireGrant is for the grant's retiring principal, its grantee when the grant
    /// includes RetireGrant, and the issuing account (its root, or a principal its identity
    /// policies allow kms:RetireGrant).
    fn authorize_grant_principal(&self, caller: &Caller, grant: &GrantRecord) -> KmsResult<()> {
        let key_arn = self.scope.key_arn(&grant.key_id);
        caller.note(Resource::Key(grant.key_id));
        let me = &caller.principal;
        let action = Op::RetireGrant.action();
        let (id_deny, id_allow) = self.identities_of(me, action, &key_arn, &Facts::of(me));
        let named = grant.retiring_principal.as_deref() == Some(me.arn.as_str())
            || (grant.grantee_principal == me.arn
                && grant.operations.iter().any(|o| o == "RetireGrant"));
        let issuer = Principal::parse(&grant.issuing_account)
            .is_some_and(|acct| acct.account == me.account)
            && id_allow;
        if id_deny || !(named || issuer) {
            return Err(crate::iam::denied(
                me,
                action,
                &key_arn,
                if id_deny {
                    Decision::ExplicitDeny("an identity-based policy")
                } else {
                    Decision::NoAllow("grant")
                },
            ));
        }
        caller.allowed(Allowed::GrantPrincipal);
        Ok(())
    }
}
