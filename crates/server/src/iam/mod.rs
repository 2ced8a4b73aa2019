//! IAM as AWS KMS applies it: principals (`model::principal`), policy documents checked
//! against the IAM grammar and compiled once (`document`, `policy`), conditions
//! (`condition`), wildcards (`wildcard`), and the decision on a request, with the IAM evaluation rules: an
//! explicit Deny anywhere wins; otherwise some Allow is needed; nothing said means denied.
//!
//! A key policy statement that names the key's *account* (`"111122223333"` or
//! `arn:aws:iam::111122223333:root`) does not allow anyone by itself: it delegates to the
//! identity policies of that account's principals, as in AWS. The account root is the one
//! principal whose identity permissions are implicit.
//!
//! A document is checked and compiled in one step (`Policy::parse`); evaluation does no
//! JSON work and no allocation beyond the request's condition values. The domain
//! (`kms::access`) holds the policies of keys and principals and asks here for decisions.

mod condition;
pub mod document;
mod policy;
mod wildcard;

use std::collections::HashMap;

use model::error::{ErrorKind, KmsError};
use model::principal::Principal;

pub use condition::Facts;
pub use policy::{Kind, Policy, Verdict};
pub use wildcard::glob;

/// The identity (IAM) policies of principals, from the configuration.
#[derive(Default)]
pub struct Identities {
    by_principal: HashMap<String, Vec<Policy>>,
}

impl Identities {
    pub fn load(entries: &[crate::config::IdentityPolicy]) -> anyhow::Result<Identities> {
        let mut by_principal: HashMap<String, Vec<Policy>> = HashMap::new();
        for e in entries {
            if Principal::parse(&e.principal).is_none() {
                anyhow::bail!(
                    "identity policy principal {} is not an IAM ARN such as \
                     arn:aws:iam::111122223333:user/alice",
                    e.principal
                );
            }
            let p = Policy::parse(&e.policy, Kind::Identity).map_err(|err| {
                anyhow::anyhow!(
                    "identity policy of {}: {}: {}",
                    e.principal,
                    err.kind.aws_name(),
                    err.message
                )
            })?;
            by_principal.entry(e.principal.clone()).or_default().push(p);
        }
        Ok(Identities { by_principal })
    }

    /// (explicit deny, allow) over the principal's identity policies. The account root is
    /// allowed everything and has no identity policies.
    pub fn evaluate(
        &self,
        caller: &Principal,
        action: &str,
        resource: &str,
        facts: &Facts,
    ) -> (bool, bool) {
        if caller.is_root() {
            return (false, true);
        }
        let mut deny = false;
        let mut allow = false;
        for p in self.by_principal.get(&caller.arn).into_iter().flatten() {
            let v = p.evaluate(caller, action, resource, facts);
            deny |= v.deny;
            allow |= v.allow;
        }
        (deny, allow)
    }
}

/// The decision on one request, with the reason for a refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    ExplicitDeny(&'static str),
    NoAllow(&'static str),
}

/// The IAM rule for an operation on a key: an explicit Deny in the key policy or the
/// caller's identity policies wins; then the key policy must allow the caller directly, or
/// allow the caller's account with an identity policy allowing too; else a grant
/// (`granted`, asked only then) must allow it.
pub fn decide_key(
    key_policy: &Policy,
    identities: &Identities,
    caller: &Principal,
    action: &str,
    key_arn: &str,
    facts: &Facts,
    granted: impl FnOnce() -> bool,
) -> Decision {
    let kp = key_policy.evaluate(caller, action, key_arn, facts);
    if kp.deny {
        return Decision::ExplicitDeny("a resource-based policy");
    }
    let delegated = kp.account_allow && caller.owns(key_arn);
    let (id_deny, id_allow) = if caller.owns(key_arn) {
        identities.evaluate(caller, action, key_arn, facts)
    } else {
        (false, false)
    };
    if id_deny {
        return Decision::ExplicitDeny("an identity-based policy");
    }
    if kp.allow || (delegated && id_allow) || granted() {
        Decision::Allow
    } else if kp.account_allow {
        Decision::NoAllow("identity-based policy")
    } else {
        Decision::NoAllow("resource-based policy")
    }
}

/// An account-level operation (CreateKey, ListKeys, the custom key store operations...):
/// identity policies alone decide, and the caller must be of this service's account.
pub fn decide_account(
    identities: &Identities,
    caller: &Principal,
    account: &str,
    action: &str,
    resource: &str,
    facts: &Facts,
) -> Decision {
    if caller.account != account {
        return Decision::NoAllow("identity-based policy");
    }
    match identities.evaluate(caller, action, resource, facts) {
        (true, _) => Decision::ExplicitDeny("an identity-based policy"),
        (false, true) => Decision::Allow,
        (false, false) => Decision::NoAllow("identity-based policy"),
    }
}

/// The AWS wording of a refusal.
pub fn denied(caller: &Principal, action: &str, resource: &str, d: Decision) -> KmsError {
    let why = match d {
        Decision::Allow => return KmsError::internal("denied() called for an allowed request"),
        Decision::ExplicitDeny(w) => format!("with an explicit deny in {w}"),
        Decision::NoAllow(w) => format!("because no {w} allows the {action} action"),
    };
    KmsError::new(
        ErrorKind::AccessDenied,
        format!(
            "User: {} is not authorized to perform: {action} on resource: {resource} {why}",
            caller.arn
        ),
    )
}

/// Whether a KeyId parameter names its key by an alias (for kms:RequestAlias): the alias
/// name, as AWS gives it.
pub fn request_alias(key_ref: &str) -> Option<&str> {
    if key_ref.starts_with("alias/") {
        return Some(key_ref);
    }
    key_ref
        .strip_prefix("arn:")
        .and_then(|_| key_ref.find(":alias/"))
        .map(|i| &key_ref[i + 1..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use model::context::Context;

    /// AWS's wording, word for word: "because no identity-based policy allows the <action>
    /// action", "with an explicit deny in a resource-based policy".
    #[test]
    fn refusals_read_as_awss() {
        let bob = Principal::parse("arn:aws:iam::111122223333:user/bob").unwrap();
        let key = "arn:aws:kms:us-east-1:111122223333:key/k";
        let e = denied(
            &bob,
            "kms:ListKeys",
            "*",
            Decision::NoAllow("identity-based policy"),
        );
        assert_eq!(
            e.message,
            "User: arn:aws:iam::111122223333:user/bob is not authorized to perform: kms:ListKeys \
             on resource: * because no identity-based policy allows the kms:ListKeys action"
        );
        let e = denied(
            &bob,
            "kms:Decrypt",
            key,
            Decision::ExplicitDeny("a resource-based policy"),
        );
        assert!(e.message.ends_with(&format!(
            "on resource: {key} with an explicit deny in a resource-based policy"
        )));
    }

    const ALICE: &str = "arn:aws:iam::111122223333:user/alice";
    const KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    fn who(arn: &str) -> Principal {
        Principal::parse(arn).unwrap()
    }

    fn verdict(doc: &str, caller: &str, action: &str, facts: Facts) -> Verdict {
        Policy::parse(doc, Kind::Key)
            .unwrap()
            .evaluate(&who(caller), action, KEY, &facts)
    }

    fn ctx(pairs: &[(&str, &str)]) -> Context {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn default_policy_delegates_to_the_account() {
        let doc = document::default_policy("aws", "111122223333");
        let v = verdict(&doc, ALICE, "kms:Encrypt", Facts::default());
        assert_eq!(
            v,
            Verdict {
                deny: false,
                allow: false,
                account_allow: true
            }
        );
        let root = verdict(
            &doc,
            "arn:aws:iam::111122223333:root",
            "kms:Encrypt",
            Facts::default(),
        );
        assert!(root.allow);
        let other = verdict(
            &doc,
            "arn:aws:iam::444455556666:user/eve",
            "kms:Encrypt",
            Facts::default(),
        );
        assert_eq!(other, Verdict::default());
    }

    #[test]
    fn conditions() {
        let doc = r#"{"Statement":[{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:user/alice"},
            "Action":"kms:*","Resource":"*",
            "Condition":{"StringEquals":{"kms:EncryptionContext:Tenant":"blue"}}}]}"#;
        let p = who(ALICE);
        // Leaked: each Facts borrows its context; a test may.
        let f = |c: &[(&str, &str)]| Facts::of(&p).context(Box::leak(Box::new(ctx(c))));
        assert!(verdict(doc, ALICE, "kms:Encrypt", f(&[("tenant", "blue")])).allow);
        assert!(!verdict(doc, ALICE, "kms:Encrypt", f(&[("tenant", "Blue")])).allow);
        assert!(!verdict(doc, ALICE, "kms:Encrypt", f(&[])).allow);

        let like = r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:Decrypt","Resource":"*",
            "Condition":{"StringLike":{"kms:EncryptionContext:app":"pay*"},
                         "StringNotEquals":{"kms:CallerAccount":"444455556666"}}}}"#;
        assert!(verdict(like, ALICE, "kms:Decrypt", f(&[("app", "payroll")])).allow);
        assert!(!verdict(like, ALICE, "kms:Decrypt", f(&[("app", "hr")])).allow);
        assert!(!verdict(like, ALICE, "kms:Encrypt", f(&[("app", "payroll")])).allow);

        let all = r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*",
            "Condition":{"ForAllValues:StringEquals":{"kms:EncryptionContextKeys":["a","b"]}}}}"#;
        assert!(verdict(all, ALICE, "kms:Encrypt", f(&[("a", "1")])).allow);
        assert!(verdict(all, ALICE, "kms:Encrypt", f(&[])).allow, "vacuous");
        assert!(!verdict(all, ALICE, "kms:Encrypt", f(&[("a", "1"), ("c", "1")])).allow);

        let any = r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*",
            "Condition":{"ForAnyValue:StringEquals":{"kms:EncryptionContextKeys":["a","b"]}}}}"#;
        assert!(verdict(any, ALICE, "kms:Encrypt", f(&[("c", "1"), ("b", "1")])).allow);
        assert!(!verdict(any, ALICE, "kms:Encrypt", f(&[])).allow);

        let null = r#"{"Statement":{"Effect":"Deny","Principal":"*","Action":"*","Resource":"*",
            "Condition":{"Null":{"kms:EncryptionContextKeys":"true"}}}}"#;
        assert!(verdict(null, ALICE, "kms:Encrypt", f(&[])).deny);
        assert!(!verdict(null, ALICE, "kms:Encrypt", f(&[("a", "1")])).deny);

        let if_exists = r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*",
            "Condition":{"StringEqualsIfExists":{"kms:EncryptionContext:a":"1"}}}}"#;
        assert!(verdict(if_exists, ALICE, "kms:Encrypt", f(&[])).allow);
        assert!(!verdict(if_exists, ALICE, "kms:Encrypt", f(&[("a", "2")])).allow);

        let who_and_what = r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:CreateGrant","Resource":"*",
            "Condition":{"StringLike":{"aws:PrincipalArn":"arn:aws:iam::111122223333:user/*"},
                         "ForAllValues:StringEquals":{"kms:GrantOperations":["Encrypt","Decrypt"]}}}}"#;
        let ops = |o: &[&str]| {
            Facts::of(&p).value(
                "kms:GrantOperations",
                o.iter().map(|s| s.to_string()).collect(),
            )
        };
        assert!(verdict(who_and_what, ALICE, "kms:CreateGrant", ops(&["Decrypt"])).allow);
        assert!(
            !verdict(
                who_and_what,
                ALICE,
                "kms:CreateGrant",
                ops(&["Decrypt", "CreateGrant"])
            )
            .allow
        );
        let role = "arn:aws:iam::111122223333:role/app";
        let role_principal = who(role);
        let role_facts =
            Facts::of(&role_principal).value("kms:GrantOperations", vec!["Decrypt".into()]);
        assert!(!verdict(who_and_what, role, "kms:CreateGrant", role_facts).allow);

        let boolean = r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"kms:CreateGrant","Resource":"*",
            "Condition":{"Bool":{"kms:GrantIsForAWSResource":true}}}}"#;
        let g = |b| Facts::of(&p).flag("kms:GrantIsForAWSResource", b);
        assert!(verdict(boolean, ALICE, "kms:CreateGrant", g(true)).allow);
        assert!(!verdict(boolean, ALICE, "kms:CreateGrant", g(false)).allow);
    }

    #[test]
    fn not_elements_and_deny() {
        let doc = r#"{"Statement":[
            {"Effect":"Allow","Principal":"*","NotAction":"kms:Decrypt","Resource":"*"},
            {"Effect":"Deny","NotPrincipal":{"AWS":"arn:aws:iam::111122223333:user/alice"},"Action":"kms:Encrypt","Resource":"*"}]}"#;
        let bob = "arn:aws:iam::111122223333:user/bob";
        assert!(verdict(doc, ALICE, "kms:Encrypt", Facts::default()).allow);
        assert!(!verdict(doc, ALICE, "kms:Encrypt", Facts::default()).deny);
        assert!(verdict(doc, bob, "kms:Encrypt", Facts::default()).deny);
        assert!(!verdict(doc, ALICE, "kms:Decrypt", Facts::default()).allow);

        // NotPrincipal naming the account exempts the account (its root), no one else.
        let root = "arn:aws:iam::111122223333:root";
        for named in [root, "111122223333"] {
            let doc = format!(
                r#"{{"Statement":[{{"Effect":"Deny","NotPrincipal":{{"AWS":"{named}"}},"Action":"kms:*","Resource":"*"}}]}}"#
            );
            assert!(
                verdict(&doc, ALICE, "kms:Encrypt", Facts::default()).deny,
                "{named}"
            );
            assert!(
                !verdict(&doc, root, "kms:Encrypt", Facts::default()).deny,
                "{named}"
            );
        }
        // A policy naming a hostile "user ... :root" names that string, not the account.
        let doc = r#"{"Statement":[{"Effect":"Allow","Principal":{"AWS":"arn:aws:iam::111122223333:user/x:root"},"Action":"kms:*","Resource":"*"}]}"#;
        let v = verdict(doc, ALICE, "kms:Encrypt", Facts::default());
        assert!(!v.allow && !v.account_allow);
        // NotAction and NotResource.
        let doc = r#"{"Statement":[{"Effect":"Deny","Principal":"*","Action":"kms:*","NotResource":"arn:aws:kms:us-east-1:111122223333:key/*"}]}"#;
        assert!(!verdict(doc, ALICE, "kms:Encrypt", Facts::default()).deny);
        let doc = r#"{"Statement":[{"Effect":"Deny","Principal":"*","Action":"kms:*","NotResource":"arn:aws:kms:eu-west-1:*"}]}"#;
        assert!(verdict(doc, ALICE, "kms:Encrypt", Facts::default()).deny);
    }

    #[test]
    fn decisions() {
        let ids = Identities::load(&[crate::config::IdentityPolicy {
            principal: ALICE.into(),
            policy: r#"{"Statement":[{"Effect":"Allow","Action":"kms:Encrypt","Resource":"*"},
                {"Effect":"Deny","Action":"kms:Decrypt","Resource":"*"}]}"#
                .into(),
        }])
        .unwrap();
        let default =
            Policy::parse(&document::default_policy("aws", "111122223333"), Kind::Key).unwrap();
        let p = who(ALICE);
        let d = |action| decide_key(&default, &ids, &p, action, KEY, &Facts::of(&p), || false);
        assert_eq!(d("kms:Encrypt"), Decision::Allow);
        assert!(matches!(d("kms:Decrypt"), Decision::ExplicitDeny(_)));
        assert!(matches!(d("kms:DescribeKey"), Decision::NoAllow(_)));
        let granted = decide_key(
            &default,
            &ids,
            &p,
            "kms:DescribeKey",
            KEY,
            &Facts::of(&p),
            || true,
        );
        assert_eq!(granted, Decision::Allow);
        let denied_despite_grant = decide_key(
            &default,
            &ids,
            &p,
            "kms:Decrypt",
            KEY,
            &Facts::of(&p),
            || true,
        );
        assert!(matches!(denied_despite_grant, Decision::ExplicitDeny(_)));
        assert_eq!(
            decide_account(&ids, &p, "111122223333", "kms:Encrypt", "*", &Facts::of(&p)),
            Decision::Allow
        );
        assert!(matches!(
            decide_account(
                &ids,
                &p,
                "111122223333",
                "kms:CreateKey",
                "*",
                &Facts::of(&p)
            ),
            Decision::NoAllow(_)
        ));
    }
}
