//! A policy document compiled for evaluation: its statements, with principals parsed by
//! IAM's grammar and conditions parsed once, so that evaluating a request does no JSON work.

use model::error::{KmsError, KmsResult};
use model::principal::Principal;

use super::condition::{Condition, Facts, Operator, Qualifier};
use super::document::{self, OneOrMany, PrincipalElement};
use super::wildcard::glob;

/// Which grammar a document follows: key policies name principals; identity policies do not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Key,
    Identity,
}

#[derive(Debug)]
struct Statement {
    allow: bool,
    /// None in identity policies, which have no Principal element.
    principals: Option<Vec<Named>>,
    not_principal: bool,
    actions: Vec<String>,
    not_action: bool,
    resources: Vec<String>,
    not_resource: bool,
    conditions: Vec<Condition>,
}

/// One entry of a Principal or NotPrincipal element, parsed once by IAM's grammar.
#[derive(Debug)]
enum Named {
    /// `*`
    Any,
    /// An account: its 12-digit id or exactly `arn:<partition>:iam::<account>:root`.
    Account(String),
    /// Any other ARN, compared exactly (one that IAM's grammar rejects matches no caller).
    Arn(String),
}

impl Named {
    fn parse(s: String) -> Named {
        if s == "*" {
            return Named::Any;
        }
        if s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit()) {
            return Named::Account(s);
        }
        match Principal::parse(&s) {
            Some(p) if p.is_root() => Named::Account(p.account),
            _ => Named::Arn(s),
        }
    }
}

/// How a key policy statement's Principal element matched the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PrincipalMatch {
    No,
    /// Named directly, or `*`.
    Direct,
    /// Through the caller's account: delegates to identity policies when allowing.
    Account,
}

impl Statement {
    fn principal(&self, caller: &Principal) -> PrincipalMatch {
        let Some(list) = &self.principals else {
            return PrincipalMatch::Direct;
        };
        if self.not_principal {
            // NotPrincipal exempts exactly the principals it names: naming an account names
            // its root, not every principal of the account.
            let named = list.iter().any(|n| match n {
                Named::Any => true,
                Named::Arn(arn) => *arn == caller.arn,
                Named::Account(a) => *a == caller.account && caller.is_root(),
            });
            return if named {
                PrincipalMatch::No
            } else {
                PrincipalMatch::Direct
            };
        }
        let mut best = PrincipalMatch::No;
        for n in list {
            match n {
                Named::Any => return PrincipalMatch::Direct,
                Named::Arn(arn) if *arn == caller.arn => return PrincipalMatch::Direct,
                // The account's own root is the account.
                Named::Account(a) if *a == caller.account && caller.is_root() => {
                    return PrincipalMatch::Direct
                }
                Named::Account(a) if *a == caller.account => best = PrincipalMatch::Account,
                _ => {}
            }
        }
        best
    }

    fn applies(&self, action: &str, resource: &str, facts: &Facts) -> bool {
        let action_hit = self.actions.iter().any(|a| glob(a, action, true));
        let resource_hit = self.resources.iter().any(|r| glob(r, resource, false));
        action_hit != self.not_action
            && resource_hit != self.not_resource
            && self.conditions.iter().all(|c| c.holds(facts))
    }
}

/// A compiled policy document.
#[derive(Debug)]
pub struct Policy {
    statements: Vec<Statement>,
}

/// What one policy says about one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    pub deny: bool,
    /// Allowed by a statement naming the caller (or `*`).
    pub allow: bool,
    /// Allowed by a statement naming the caller's account: needs an identity policy too.
    pub account_allow: bool,
}

impl Policy {
    /// Reads a document of `kind` once (serde, `document::Document`) and compiles it,
    /// checking the rest of IAM's grammar on the way: MalformedPolicyDocumentException says
    /// what is wrong and where. The one way to a `Policy`, so no unchecked document is ever
    /// evaluated.
    pub fn parse(doc: &str, kind: Kind) -> KmsResult<Policy> {
        let doc = document::read(doc)?;
        match doc.version.as_deref() {
            None | Some("2012-10-17") | Some("2008-10-17") => {}
            Some(v) => {
                return Err(malformed(format!(
                    "Version must be 2012-10-17 or 2008-10-17, not {v}"
                )))
            }
        }
        let statements = doc.statement.into_vec();
        if statements.is_empty() {
            return Err(malformed("Statement must not be empty".into()));
        }
        let mut sids = std::collections::HashSet::new();
        let mut out = Vec::with_capacity(statements.len());
        for (i, st) in statements.into_iter().enumerate() {
            let n = i + 1;
            if let Some(sid) = &st.sid {
                if !sids.insert(sid.clone()) {
                    return Err(malformed(format!(
                        "Statement ids must be unique: {sid} repeats"
                    )));
                }
            }
            out.push(Statement::compile(n, st, kind)?);
        }
        Ok(Policy { statements: out })
    }

    pub fn evaluate(
        &self,
        caller: &Principal,
        action: &str,
        resource: &str,
        facts: &Facts,
    ) -> Verdict {
        let mut v = Verdict::default();
        for st in &self.statements {
            let who = st.principal(caller);
            if who == PrincipalMatch::No || !st.applies(action, resource, facts) {
                continue;
            }
            match (st.allow, who) {
                (false, _) => v.deny = true,
                (true, PrincipalMatch::Direct) => v.allow = true,
                (true, _) => v.account_allow = true,
            }
        }
        v
    }
}

impl Statement {
    /// Statement `n` of a document of `kind`, checked against the rest of IAM's grammar.
    fn compile(n: usize, st: document::Statement, kind: Kind) -> KmsResult<Statement> {
        let (principals, not_principal) = match (kind, st.principal, st.not_principal) {
            (Kind::Identity, None, None) => (None, false),
            (Kind::Identity, _, _) => {
                return Err(malformed(format!(
                    "Statement {n}: an identity policy has no Principal; it applies to its \
                     principal"
                )))
            }
            (Kind::Key, Some(p), None) => (Some(principals(n, p)?), false),
            (Kind::Key, None, Some(p)) => (Some(principals(n, p)?), true),
            (Kind::Key, p, _) => return Err(one_of(n, "Principal", "NotPrincipal", p.is_some())),
        };
        let (actions, not_action) = exactly_one(n, "Action", st.action, st.not_action)?;
        for a in &actions {
            let ok = a == "*"
                || a.split_once(':').is_some_and(|(svc, op)| {
                    !svc.is_empty()
                        && svc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !op.is_empty()
                        && op
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'*' || b == b'?')
                });
            if !ok {
                return Err(malformed(format!(
                    "Statement {n}: action {a} is not of the form service:Action (e.g. \
                     kms:Encrypt)"
                )));
            }
        }
        let (resources, not_resource) = exactly_one(n, "Resource", st.resource, st.not_resource)?;
        if let Some(r) = resources
            .iter()
            .find(|r| *r != "*" && !r.starts_with("arn:"))
        {
            return Err(malformed(format!(
                "Statement {n}: resource {r} must be * or an ARN"
            )));
        }
        let mut conditions = Vec::new();
        for (name, block) in st.condition.unwrap_or_default() {
            let (set, rest) = if let Some(r) = name.strip_prefix("ForAnyValue:") {
                (Some(Qualifier::AnyValue), r)
            } else if let Some(r) = name.strip_prefix("ForAllValues:") {
                (Some(Qualifier::AllValues), r)
            } else {
                (None, name.as_str())
            };
            let (base, if_exists) = match rest.strip_suffix("IfExists") {
                Some(b) if rest != "Null" => (b, true),
                _ => (rest, false),
            };
            if !document::CONDITION_OPERATORS.contains(&base) {
                return Err(malformed(format!(
                    "Statement {n}: unknown condition operator {name}"
                )));
            }
            if block.is_empty() {
                return Err(malformed(format!(
                    "Statement {n}: condition {name} must map condition keys to values"
                )));
            }
            let op = Operator::parse(base);
            for (key, values) in block {
                let values: Vec<String> = values.into_vec().into_iter().map(|v| v.0).collect();
                if key.is_empty() || values.is_empty() {
                    return Err(malformed(format!(
                        "Statement {n}: condition {name} needs a condition key and at least \
                         one value"
                    )));
                }
                conditions.push(Condition {
                    op,
                    set,
                    if_exists,
                    key: key.to_ascii_lowercase(),
                    values,
                });
            }
        }
        Ok(Statement {
            allow: st.effect == document::Effect::Allow,
            principals,
            not_principal,
            actions,
            not_action,
            resources,
            not_resource,
            conditions,
        })
    }
}

fn malformed(msg: String) -> KmsError {
    document::malformed(msg)
}

fn one_of(n: usize, a: &str, b: &str, both: bool) -> KmsError {
    malformed(if both {
        format!("Statement {n}: use {a} or {b}, not both")
    } else {
        format!("Statement {n}: {a} (or {b}) is missing")
    })
}

/// The one of `a` and `Not<a>` a statement has, as a non-empty list; whether it was `Not`.
fn exactly_one(
    n: usize,
    a: &str,
    plain: Option<OneOrMany<String>>,
    not: Option<OneOrMany<String>>,
) -> KmsResult<(Vec<String>, bool)> {
    let (list, negated) = match (plain, not) {
        (Some(v), None) => (v.into_vec(), false),
        (None, Some(v)) => (v.into_vec(), true),
        (p, _) => return Err(one_of(n, a, &format!("Not{a}"), p.is_some())),
    };
    if list.is_empty() {
        return Err(malformed(format!(
            "Statement {n}: {a} must be a string or a non-empty list of strings"
        )));
    }
    Ok((list, negated))
}

/// A Principal element: `*`, or principals by type. Only AWS principals can be callers of
/// this service; the other types are checked for form and never match.
fn principals(n: usize, p: PrincipalElement) -> KmsResult<Vec<Named>> {
    let by_type = match p {
        PrincipalElement::Star => return Ok(vec![Named::Any]),
        PrincipalElement::ByType(m) if m.is_empty() => {
            return Err(malformed(format!(
                "Statement {n}: Principal must be \"*\" or an object such as {{\"AWS\": \"<ARN>\"}}"
            )))
        }
        PrincipalElement::ByType(m) => m,
    };
    let mut out = Vec::new();
    for (kind, ids) in by_type {
        if !matches!(
            kind.as_str(),
            "AWS" | "Service" | "Federated" | "CanonicalUser"
        ) {
            return Err(malformed(format!(
                "Statement {n}: unknown principal type {kind}"
            )));
        }
        let ids = ids.into_vec();
        if ids.is_empty() {
            return Err(malformed(format!(
                "Statement {n}: Principal must be a string or a non-empty list of strings"
            )));
        }
        for id in ids {
            let ok = match kind.as_str() {
                "AWS" => {
                    id == "*"
                        || (id.len() == 12 && id.bytes().all(|b| b.is_ascii_digit()))
                        || id.starts_with("arn:")
                }
                _ => !id.is_empty(),
            };
            if !ok {
                return Err(malformed(format!(
                    "Statement {n}: {id} is not a valid {kind} principal"
                )));
            }
            if kind == "AWS" {
                out.push(Named::parse(id));
            }
        }
    }
    Ok(out)
}
