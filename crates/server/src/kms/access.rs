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

use serde_json::Value;

use super::context::Context;
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

    /// Hands over the noted resources (once, for the request's audit line).
    pub fn take_resources(&self) -> Vec<Resource> {
        std::mem::take(&mut *self.resources.lock().unwrap_or_else(|p| p.into_inner()))
    }
}

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
    fn get(&self, key: &str) -> Option<Vec<&str>> {
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
enum Op {
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

impl Op {
    fn parse(name: &str) -> Op {
        match name {
            "StringEquals" => Op::StringEquals,
            "StringNotEquals" => Op::StringNotEquals,
            "StringEqualsIgnoreCase" => Op::StringEqualsIgnoreCase,
            "StringNotEqualsIgnoreCase" => Op::StringNotEqualsIgnoreCase,
            // ARNs compare as strings with wildcards, as IAM does.
            "StringLike" | "ArnEquals" | "ArnLike" => Op::StringLike,
            "StringNotLike" | "ArnNotEquals" | "ArnNotLike" => Op::StringNotLike,
            "Bool" => Op::Bool,
            "Null" => Op::Null,
            _ => Op::Unsupported,
        }
    }

    fn negated(self) -> bool {
        matches!(
            self,
            Op::StringNotEquals | Op::StringNotEqualsIgnoreCase | Op::StringNotLike
        )
    }

    /// Whether one request value matches one policy value, for the positive form.
    fn one(self, policy: &str, request: &str) -> bool {
        match self {
            Op::StringEquals | Op::StringNotEquals => policy == request,
            Op::StringEqualsIgnoreCase | Op::StringNotEqualsIgnoreCase => {
                policy.eq_ignore_ascii_case(request)
            }
            Op::StringLike | Op::StringNotLike => glob(policy, request, false),
            Op::Bool => policy.eq_ignore_ascii_case(request),
            Op::Null | Op::Unsupported => false,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SetOp {
    AnyValue,
    AllValues,
}

#[derive(Debug)]
struct Condition {
    op: Op,
    set: Option<SetOp>,
    if_exists: bool,
    key: String,
    values: Vec<String>,
}

impl Condition {
    fn holds(&self, facts: &Facts) -> bool {
        let present = facts.get(&self.key);
        if self.op == Op::Null {
            // "true": the key must be absent; "false": present.
            let want_absent = self.values.iter().any(|v| v.eq_ignore_ascii_case("true"));
            return want_absent == present.is_none();
        }
        let Some(request) = present else {
            // An absent key: ForAllValues holds vacuously, ...IfExists holds, and a negated
            // operator holds (nothing equals); anything else does not.
            return self.set == Some(SetOp::AllValues) || self.if_exists || self.op.negated();
        };
        let matches_any = |r: &&str| self.values.iter().any(|p| self.op.one(p, r));
        match (self.set, self.op.negated()) {
            // Negated: a request value "matches" when it equals none of the policy values.
            (Some(SetOp::AllValues), false) => request.iter().all(matches_any),
            (Some(SetOp::AllValues), true) => request.iter().all(|r| !matches_any(r)),
            (Some(SetOp::AnyValue), true) => request.iter().any(|r| !matches_any(r)),
            (_, false) => request.iter().any(matches_any),
            (None, true) => !request.iter().any(matches_any),
        }
    }
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
    /// Compiles a document `policy::validate` accepted (key policies have Principal elements,
    /// identity policies do not).
    pub fn compile(doc: &str) -> KmsResult<Policy> {
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
                        (Some(SetOp::AnyValue), r)
                    } else if let Some(r) = name.strip_prefix("ForAllValues:") {
                        (Some(SetOp::AllValues), r)
                    } else {
                        (None, name.as_str())
                    };
                    let (base, if_exists) = match rest.strip_suffix("IfExists") {
                        Some(b) if rest != "Null" => (b, true),
                        _ => (rest, false),
                    };
                    let op = Op::parse(base);
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

/// IAM wildcard matching: `*` any run of characters, `?` any one character.
///
/// Its cost is linear in the text for any pattern: the common shapes (no wildcard, one
/// trailing `*`) are compared directly, and every other pattern runs as a bit-parallel
/// automaton, O(text x pattern / 64) with no backtracking. (The classic backtracking
/// matcher took pattern x text steps: a 30,000-character `StringLike` against a large
/// encryption context value stalled the server for most of a minute.)
pub fn glob(pattern: &str, text: &str, ignore_case: bool) -> bool {
    let eq = |a: &str, b: &str| {
        if ignore_case {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    };
    match pattern.find(['*', '?']) {
        None => eq(pattern, text),
        Some(i) if i + 1 == pattern.len() && pattern.ends_with('*') => {
            text.get(..i).is_some_and(|head| eq(&pattern[..i], head))
        }
        Some(_) => Automaton::new(pattern, ignore_case).matches(text),
    }
}

/// A wildcard pattern as a set of positions: bit `i` set means "the first `i` tokens have
/// matched the text read so far". Runs of `*` are collapsed, so a star's bit never feeds
/// another star.
struct Automaton {
    ignore_case: bool,
    /// Tokens in the pattern; bit `tokens` is the accepting position.
    tokens: usize,
    /// Characters the pattern needs at least (its tokens that are not `*`).
    min_len: usize,
    any: Vec<u64>,
    star: Vec<u64>,
    chars: HashMap<char, Vec<u64>>,
}

impl Automaton {
    fn new(pattern: &str, ignore_case: bool) -> Automaton {
        enum Tok {
            Star,
            Any,
            Char(char),
        }
        let mut toks: Vec<Tok> = Vec::new();
        for c in pattern.chars() {
            match c {
                '*' if matches!(toks.last(), Some(Tok::Star)) => {}
                '*' => toks.push(Tok::Star),
                '?' => toks.push(Tok::Any),
                c if ignore_case => toks.push(Tok::Char(c.to_ascii_lowercase())),
                c => toks.push(Tok::Char(c)),
            }
        }
        let words = (toks.len() + 1).div_ceil(64);
        let (mut any, mut star) = (vec![0u64; words], vec![0u64; words]);
        let mut chars: HashMap<char, Vec<u64>> = HashMap::new();
        let set = |v: &mut Vec<u64>, i: usize| v[i / 64] |= 1 << (i % 64);
        for (i, t) in toks.iter().enumerate() {
            match t {
                Tok::Star => set(&mut star, i),
                Tok::Any => set(&mut any, i),
                Tok::Char(c) => set(chars.entry(*c).or_insert_with(|| vec![0; words]), i),
            }
        }
        Automaton {
            ignore_case,
            tokens: toks.len(),
            min_len: toks.iter().filter(|t| !matches!(t, Tok::Star)).count(),
            any,
            star,
            chars,
        }
    }

    fn matches(&self, text: &str) -> bool {
        if text.chars().count() < self.min_len {
            return false;
        }
        let words = self.any.len();
        let mut state = vec![0u64; words];
        let mut next = vec![0u64; words];
        state[0] = 1;
        self.close(&mut state);
        for c in text.chars() {
            let c = if self.ignore_case {
                c.to_ascii_lowercase()
            } else {
                c
            };
            let exact = self.chars.get(&c);
            let mut carry = 0u64;
            let mut alive = 0u64;
            for w in 0..words {
                let hit = self.any[w] | exact.map_or(0, |m| m[w]);
                let moved = state[w] & hit;
                next[w] = (moved << 1) | carry | (state[w] & self.star[w]);
                carry = moved >> 63;
                alive |= next[w];
            }
            if alive == 0 {
                return false;
            }
            std::mem::swap(&mut state, &mut next);
            self.close(&mut state);
        }
        state[self.tokens / 64] & (1 << (self.tokens % 64)) != 0
    }

    /// A position before a `*` also stands after it (the star matched nothing).
    fn close(&self, state: &mut [u64]) {
        let mut carry = 0u64;
        for (word, star) in state.iter_mut().zip(&self.star) {
            let at_star = *word & star;
            *word |= (at_star << 1) | carry;
            carry = at_star >> 63;
        }
    }
}

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
            crate::kms::policy::validate_identity(&e.policy).map_err(|err| {
                anyhow::anyhow!(
                    "identity policy of {}: {}: {}",
                    e.principal,
                    err.kind.aws_name(),
                    err.message
                )
            })?;
            let p = Policy::compile(&e.policy)
                .map_err(|err| anyhow::anyhow!("identity policy of {}: {}", e.principal, err))?;
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
        Decision::NoAllow("an identity-based policy")
    } else {
        Decision::NoAllow("a resource-based policy")
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
        return Decision::NoAllow("an identity-based policy");
    }
    match identities.evaluate(caller, action, resource, facts) {
        (true, _) => Decision::ExplicitDeny("an identity-based policy"),
        (false, true) => Decision::Allow,
        (false, false) => Decision::NoAllow("an identity-based policy"),
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
        let default_policy = Policy::compile(&super::policy::default_policy(
            &scope.partition,
            &scope.account_id,
        ))?;
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
        let p = Arc::new(Policy::compile(text)?);
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
        doc: &str,
    ) -> KmsResult<()> {
        let policy = Policy::compile(doc)?;
        let arn = self.scope.key_arn(key_id);
        let facts = Facts::of(&caller.principal);
        let d = decide_key(
            &policy,
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

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "arn:aws:iam::111122223333:user/alice";
    const KEY: &str = "arn:aws:kms:us-east-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab";

    fn who(arn: &str) -> Principal {
        Principal::parse(arn).unwrap()
    }

    fn verdict(doc: &str, caller: &str, action: &str, facts: Facts) -> Verdict {
        crate::kms::policy::validate(doc).unwrap();
        Policy::compile(doc)
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
    fn principals_parse() {
        assert!(Principal::parse(ALICE).is_some());
        assert!(Principal::parse("arn:aws:iam::111122223333:root")
            .unwrap()
            .is_root());
        assert!(Principal::parse("arn:aws:iam::111122223333:role/app").is_some());
        assert!(Principal::parse("arn:aws:iam::111122223333:role/team/app-1").is_some());
        assert!(Principal::parse("arn:aws:iam::111122223333:user/a+b=c,d.e@f_g-h").is_some());
        assert!(Principal::parse("arn:aws:iam::111122223333:assumed-role/app/session-1").is_some());
        assert!(!who(ALICE).is_root());
        assert!(Principal::root("aws", "111122223333").is_root());
        for bad in [
            "alice",
            "arn:aws:iam::1111:user/alice",
            "arn:aws:kms::111122223333:user/alice",
            "arn:aws:iam::111122223333:user/",
            "arn:aws:iam::111122223333:group/x",
            // Names that end in `:root` are not the root, and not names at all.
            "arn:aws:iam::111122223333:user/mallory:root",
            "arn:aws:iam::111122223333:role/app/x:root",
            "arn:aws:iam::111122223333:assumed-role/app/s:root",
            "arn:aws:iam::111122223333:root:root",
            "arn:aws:iam::111122223333:rooted",
            "arn:aws:iam::111122223333:useralice",
            "arn:aws:iam::111122223333:user/al ice",
            "arn:aws:iam::111122223333:user/al\nice",
            "arn:aws:iam::111122223333:assumed-role/app",
            "arn:aws:iam::111122223333:assumed-role/app/s",
            "arn:AWS:iam::111122223333:root",
            "arn::iam::111122223333:root",
            "arn:aws:iam:us-east-1:111122223333:root",
            "arn:aws:iam::11112222333x:root",
        ] {
            assert!(Principal::parse(bad).is_none(), "{bad}");
        }
        let long_name = format!("arn:aws:iam::111122223333:user/{}", "a".repeat(65));
        assert!(Principal::parse(&long_name).is_none());
    }

    /// The reference: IAM wildcards by recursion, exponential but obviously right.
    fn slow_glob(p: &[char], t: &[char]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (None, Some(_)) => false,
            (Some('*'), _) => slow_glob(&p[1..], t) || (!t.is_empty() && slow_glob(p, &t[1..])),
            (Some(_), None) => false,
            (Some('?'), Some(_)) => slow_glob(&p[1..], &t[1..]),
            (Some(a), Some(b)) => a == b && slow_glob(&p[1..], &t[1..]),
        }
    }

    proptest::proptest! {
        #[test]
        fn glob_agrees_with_the_reference(p in "[ab*?\u{e9}]{0,12}", t in "[ab\u{e9}]{0,14}") {
            let (pc, tc): (Vec<char>, Vec<char>) = (p.chars().collect(), t.chars().collect());
            proptest::prop_assert_eq!(glob(&p, &t, false), slow_glob(&pc, &tc), "{} {}", p, t);
        }
    }

    #[test]
    fn glob_is_linear_in_hostile_cases() {
        // Pattern x text steps for the backtracking matcher: 3e4 x 6.5e4; here x / 64.
        let pattern = format!("*{}b*", "a?".repeat(15_000));
        let text = "a".repeat(1 << 16);
        assert!(!glob(&pattern, &text, false));
        let long = format!("*{}*", "a".repeat(100));
        assert!(glob(&long, &"a".repeat(8192), false));
        assert!(!glob(&long, &"a".repeat(99), false));
        // Across the 64-bit word boundary of the automaton.
        let p = format!("{}*{}", "x?".repeat(40), "y".repeat(30));
        let t = format!("{}zz{}", "xq".repeat(40), "y".repeat(30));
        assert!(glob(&p, &t, false));
        assert!(!glob(&p, &t[1..], false));
        assert!(glob("KMS:*crypt", "kms:ReEncrypt", true));
    }

    #[test]
    fn globs() {
        assert!(glob("kms:*", "kms:Encrypt", true));
        assert!(glob("KMS:encrypt", "kms:Encrypt", true));
        assert!(!glob("kms:Encrypt", "kms:encrypt", false));
        assert!(glob(
            "kms:GenerateDataKey*",
            "kms:GenerateDataKeyWithoutPlaintext",
            true
        ));
        assert!(glob("kms:Re*", "kms:ReEncryptFrom", true));
        assert!(!glob("kms:Re*", "kms:Decrypt", true));
        assert!(glob("a?c", "abc", false));
        assert!(!glob("a?c", "ac", false));
        assert!(glob("*a*b*", "xxaxxbxx", false));
        assert!(!glob("*a*b", "xxaxxbxx", false));
        assert!(glob("", "", false));
        assert!(!glob("", "x", false));
    }

    #[test]
    fn default_policy_delegates_to_the_account() {
        let doc = crate::kms::policy::default_policy("aws", "111122223333");
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
            Policy::compile(&crate::kms::policy::default_policy("aws", "111122223333")).unwrap();
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
