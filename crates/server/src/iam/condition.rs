//! The request's condition keys (`Facts`) and policy conditions: the condition operators,
//! the ForAnyValue/ForAllValues qualifiers and the IfExists suffix, as IAM evaluates them.

use model::context::Context;
use model::principal::Principal;

use super::wildcard::glob;

/// The request's condition keys. Values are looked up when a condition asks for them, so a
/// policy without conditions (the default key policy) costs no allocation. IAM condition key
/// names are case-insensitive, the encryption context key part included.
#[derive(Default, Debug)]
pub struct Facts<'a> {
    principal: Option<&'a Principal>,
    ctx: Option<&'a Context>,
    alias: Option<&'a str>,
    /// Further keys (lower case) and values of particular operations.
    extra: Vec<(String, Vec<String>)>,
}

impl<'a> Facts<'a> {
    /// The keys every request has: aws:PrincipalArn and kms:CallerAccount.
    pub fn of(caller: &'a Principal) -> Facts<'a> {
        Facts {
            principal: Some(caller),
            ..Facts::default()
        }
    }

    /// kms:EncryptionContext:<key> for each pair and kms:EncryptionContextKeys. An empty
    /// context sets neither, so that Null and ...IfExists see the keys as absent.
    pub fn context(mut self, ctx: &'a Context) -> Facts<'a> {
        self.ctx = Some(ctx).filter(|c| !c.is_empty());
        self
    }

    /// kms:RequestAlias, when the request named its key by an alias.
    pub fn alias(mut self, alias: Option<&'a str>) -> Facts<'a> {
        self.alias = alias;
        self
    }

    pub fn value(mut self, key: &str, values: Vec<String>) -> Facts<'a> {
        self.extra.push((key.to_ascii_lowercase(), values));
        self
    }

    pub fn flag(self, key: &str, b: bool) -> Facts<'a> {
        self.value(key, vec![b.to_string()])
    }

    /// The values of a condition key (given in lower case), if the request has it.
    pub(super) fn get(&self, key: &str) -> Option<Vec<&str>> {
        let found: Vec<&str> = match key {
            "aws:principalarn" => self.principal.map(|p| p.arn.as_str()).into_iter().collect(),
            "kms:calleraccount" => self
                .principal
                .map(|p| p.account.as_str())
                .into_iter()
                .collect(),
            "kms:requestalias" => self.alias.into_iter().collect(),
            "kms:encryptioncontextkeys" => self
                .ctx
                .into_iter()
                .flatten()
                .map(|(k, _)| k.as_str())
                .collect(),
            _ => match key.strip_prefix("kms:encryptioncontext:") {
                Some(want) => self
                    .ctx
                    .into_iter()
                    .flatten()
                    .filter(|(k, _)| k.eq_ignore_ascii_case(want))
                    .map(|(_, v)| v.as_str())
                    .collect(),
                None => self
                    .extra
                    .iter()
                    .filter(|(k, _)| k == key)
                    .flat_map(|(_, v)| v.iter().map(String::as_str))
                    .collect(),
            },
        };
        (!found.is_empty()).then_some(found)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Operator {
    StringEquals,
    StringNotEquals,
    StringEqualsIgnoreCase,
    StringNotEqualsIgnoreCase,
    StringLike,
    StringNotLike,
    Bool,
    Null,
    /// Numeric, date, binary and IP operators: none of this service's condition keys has
    /// such a value, so they never match a present key.
    Unsupported,
}

impl Operator {
    pub(super) fn parse(name: &str) -> Operator {
        match name {
            "StringEquals" => Operator::StringEquals,
            "StringNotEquals" => Operator::StringNotEquals,
            "StringEqualsIgnoreCase" => Operator::StringEqualsIgnoreCase,
            "StringNotEqualsIgnoreCase" => Operator::StringNotEqualsIgnoreCase,
            // ARNs compare as strings with wildcards, as IAM does.
            "StringLike" | "ArnEquals" | "ArnLike" => Operator::StringLike,
            "StringNotLike" | "ArnNotEquals" | "ArnNotLike" => Operator::StringNotLike,
            "Bool" => Operator::Bool,
            "Null" => Operator::Null,
            _ => Operator::Unsupported,
        }
    }

    fn negated(self) -> bool {
        matches!(
            self,
            Operator::StringNotEquals
                | Operator::StringNotEqualsIgnoreCase
                | Operator::StringNotLike
        )
    }

    /// Whether one request value matches one policy value, for the positive form.
    fn one(self, policy: &str, request: &str) -> bool {
        match self {
            Operator::StringEquals | Operator::StringNotEquals => policy == request,
            Operator::StringEqualsIgnoreCase | Operator::StringNotEqualsIgnoreCase => {
                policy.eq_ignore_ascii_case(request)
            }
            Operator::StringLike | Operator::StringNotLike => glob(policy, request, false),
            Operator::Bool => policy.eq_ignore_ascii_case(request),
            Operator::Null | Operator::Unsupported => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Qualifier {
    AnyValue,
    AllValues,
}

#[derive(Debug)]
pub(super) struct Condition {
    pub(super) op: Operator,
    pub(super) set: Option<Qualifier>,
    pub(super) if_exists: bool,
    pub(super) key: String,
    pub(super) values: Vec<String>,
}

impl Condition {
    pub(super) fn holds(&self, facts: &Facts) -> bool {
        let present = facts.get(&self.key);
        if self.op == Operator::Null {
            // "true": the key must be absent; "false": present.
            let want_absent = self.values.iter().any(|v| v.eq_ignore_ascii_case("true"));
            return want_absent == present.is_none();
        }
        let Some(request) = present else {
            // An absent key: ForAllValues holds vacuously, ...IfExists holds, and a negated
            // operator holds (nothing equals); anything else does not.
            return self.set == Some(Qualifier::AllValues) || self.if_exists || self.op.negated();
        };
        let matches_any = |r: &&str| self.values.iter().any(|p| self.op.one(p, r));
        match (self.set, self.op.negated()) {
            // Negated: a request value "matches" when it equals none of the policy values.
            (Some(Qualifier::AllValues), false) => request.iter().all(matches_any),
            (Some(Qualifier::AllValues), true) => request.iter().all(|r| !matches_any(r)),
            (Some(Qualifier::AnyValue), true) => request.iter().any(|r| !matches_any(r)),
            (_, false) => request.iter().any(matches_any),
            (None, true) => !request.iter().any(matches_any),
        }
    }
}
