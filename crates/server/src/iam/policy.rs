//! A policy document compiled for evaluation: its statements, with principals parsed by
//! IAM's grammar and conditions parsed once, so that evaluating a request does no JSON work.

use serde_json::Value;

use model::error::{ErrorKind, KmsError, KmsResult};
use model::principal::Principal;

use super::condition::{Condition, Facts, Operator, Qualifier};
use super::document;
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
    /// Reads a document of `kind`: checked against the IAM policy grammar
    /// (MalformedPolicyDocumentException says what is wrong and where), then compiled. The
    /// one way to a `Policy`, so no unchecked document is ever evaluated.
    pub fn parse(doc: &str, kind: Kind) -> KmsResult<Policy> {
        match kind {
            Kind::Key => document::validate(doc)?,
            Kind::Identity => document::validate_identity(doc)?,
        }
        Policy::compile(doc)
    }

    /// Compiles a document the grammar accepted.
    fn compile(doc: &str) -> KmsResult<Policy> {
        let bad = |m: &str| KmsError::new(ErrorKind::MalformedPolicyDocument, m.to_string());
        let value: Value = serde_json::from_str(doc).map_err(|e| bad(&e.to_string()))?;
        let statements = match value.get("Statement") {
            Some(Value::Array(a)) => a.iter().collect(),
            Some(v @ Value::Object(_)) => vec![v],
            _ => return Err(bad("The policy has no Statement")),
        };
        let mut out = Vec::new();
        for st in statements {
            let field = |a: &str, b: &str| -> (Option<Vec<String>>, bool) {
                match (st.get(a), st.get(b)) {
                    (Some(v), _) => (Some(string_list(v)), false),
                    (None, Some(v)) => (Some(string_list(v)), true),
                    (None, None) => (None, false),
                }
            };
            let (principals, not_principal) = match (st.get("Principal"), st.get("NotPrincipal")) {
                (None, None) => (None, false),
                (p, np) => (
                    Some(
                        principal_list(p.or(np).unwrap_or(&Value::Null))
                            .into_iter()
                            .map(Named::parse)
                            .collect(),
                    ),
                    np.is_some(),
                ),
            };
            let (actions, not_action) = field("Action", "NotAction");
            let (resources, not_resource) = field("Resource", "NotResource");
            let mut conditions = Vec::new();
            if let Some(Value::Object(ops)) = st.get("Condition") {
                for (name, block) in ops {
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
                    let op = Operator::parse(base);
                    for (key, v) in block.as_object().into_iter().flatten() {
                        conditions.push(Condition {
                            op,
                            set,
                            if_exists,
                            key: key.to_ascii_lowercase(),
                            values: string_list(v),
                        });
                    }
                }
            }
            out.push(Statement {
                allow: st.get("Effect").and_then(Value::as_str) == Some("Allow"),
                principals,
                not_principal,
                actions: actions.unwrap_or_default(),
                not_action,
                resources: resources.unwrap_or_else(|| vec!["*".into()]),
                not_resource,
                conditions,
            });
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

/// Values of a policy element: a string, number or boolean, or a list of them.
fn string_list(v: &Value) -> Vec<String> {
    let one = |x: &Value| match x {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    };
    match v {
        Value::Array(a) => a.iter().filter_map(one).collect(),
        x => one(x).into_iter().collect(),
    }
}

/// `"*"` or `{"AWS": ...}`; other principal types (services, federated) never match a caller
/// of this service.
fn principal_list(v: &Value) -> Vec<String> {
    match v {
        Value::String(s) => vec![s.clone()],
        Value::Object(m) => m.get("AWS").map(string_list).unwrap_or_default(),
        _ => Vec::new(),
    }
}
