//! Policy documents: the IAM policy grammar a document is checked against before it is
//! compiled (`Policy::parse`; key policies name principals, identity policies do not), the
//! AWS default key policy, and key policy names.

use serde_json::{Map, Value};

use model::error::{ErrorKind, KmsError, KmsResult};

/// AWS's limit on a key policy document.
pub const MAX_POLICY_BYTES: usize = 32 * 1024;
pub const DEFAULT_POLICY_NAME: &str = "default";

/// The AWS default key policy: the account root may do everything, which delegates access to
/// the account's identity (IAM) policies.
pub fn default_policy(partition: &str, account_id: &str) -> String {
    let doc = serde_json::json!({
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [{
            "Sid": "Enable IAM User Permissions",
            "Effect": "Allow",
            "Principal": {"AWS": format!("arn:{partition}:iam::{account_id}:root")},
            "Action": "kms:*",
            "Resource": "*"
        }]
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// PolicyName: `default` is the only one a key has.
pub fn check_policy_name(name: Option<&str>) -> KmsResult<()> {
    match name {
        None | Some(DEFAULT_POLICY_NAME) => Ok(()),
        Some(n)
            if n.is_empty()
                || n.len() > 128
                || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') =>
        {
            Err(KmsError::validation(
                "PolicyName must match [\\w]+ and be 1 to 128 characters long",
            ))
        }
        Some(n) => Err(KmsError::new(
            ErrorKind::NotFound,
            format!("No key policy named {n}: the only key policy name is default"),
        )),
    }
}

fn malformed(msg: String) -> KmsError {
    KmsError::new(ErrorKind::MalformedPolicyDocument, msg)
}

const CONDITION_OPERATORS: &[&str] = &[
    "StringEquals",
    "StringNotEquals",
    "StringEqualsIgnoreCase",
    "StringNotEqualsIgnoreCase",
    "StringLike",
    "StringNotLike",
    "NumericEquals",
    "NumericNotEquals",
    "NumericLessThan",
    "NumericLessThanEquals",
    "NumericGreaterThan",
    "NumericGreaterThanEquals",
    "DateEquals",
    "DateNotEquals",
    "DateLessThan",
    "DateLessThanEquals",
    "DateGreaterThan",
    "DateGreaterThanEquals",
    "Bool",
    "BinaryEquals",
    "IpAddress",
    "NotIpAddress",
    "ArnEquals",
    "ArnNotEquals",
    "ArnLike",
    "ArnNotLike",
    "Null",
];

/// Checks a key policy document: size, characters, JSON, and the IAM grammar (Version,
/// Id, Statement with Sid, Effect, Principal/NotPrincipal, Action/NotAction,
/// Resource/NotResource, Condition). Errors say what is wrong and where.
pub(super) fn validate(doc: &str) -> KmsResult<()> {
    validate_doc(doc, true)
}

/// Checks an identity (IAM) policy: the same grammar, without Principal elements.
pub(super) fn validate_identity(doc: &str) -> KmsResult<()> {
    validate_doc(doc, false)
}

fn validate_doc(doc: &str, key_policy: bool) -> KmsResult<()> {
    if doc.is_empty() {
        return Err(KmsError::validation("Policy must not be empty"));
    }
    if doc.len() > MAX_POLICY_BYTES {
        return Err(KmsError::new(
            ErrorKind::LimitExceeded,
            format!(
                "The key policy is {} bytes; the limit is {MAX_POLICY_BYTES}",
                doc.len()
            ),
        ));
    }
    if let Some(c) = doc
        .chars()
        .find(|c| !matches!(*c, '\t' | '\n' | '\r' | '\u{20}'..='\u{FF}'))
    {
        return Err(KmsError::validation(format!(
            "Policy contains a character outside the allowed set: U+{:04X}",
            c as u32
        )));
    }
    let value: Value = serde_json::from_str(doc)
        .map_err(|e| malformed(format!("The policy is not valid JSON: {e}")))?;
    let top = value
        .as_object()
        .ok_or_else(|| malformed("The policy must be a JSON object".into()))?;
    for k in top.keys() {
        if !matches!(k.as_str(), "Version" | "Id" | "Statement") {
            return Err(malformed(format!("Unknown policy element {k}")));
        }
    }
    match top.get("Version") {
        None => {}
        Some(Value::String(v)) if v == "2012-10-17" || v == "2008-10-17" => {}
        Some(v) => {
            return Err(malformed(format!(
                "Version must be 2012-10-17 or 2008-10-17, not {v}"
            )))
        }
    }
    if let Some(id) = top.get("Id") {
        if !id.is_string() {
            return Err(malformed("Id must be a string".into()));
        }
    }
    let statements: Vec<&Value> = match top.get("Statement") {
        None => return Err(malformed("The policy has no Statement".into())),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(malformed("Statement must not be empty".into()))
        }
        Some(Value::Array(a)) => a.iter().collect(),
        Some(v @ Value::Object(_)) => vec![v],
        Some(_) => return Err(malformed("Statement must be an object or a list".into())),
    };
    let mut sids = std::collections::HashSet::new();
    for (i, st) in statements.iter().enumerate() {
        let n = i + 1;
        let st = st
            .as_object()
            .ok_or_else(|| malformed(format!("Statement {n} must be an object")))?;
        check_statement(n, st, key_policy)?;
        if let Some(Value::String(sid)) = st.get("Sid") {
            if !sids.insert(sid.clone()) {
                return Err(malformed(format!(
                    "Statement ids must be unique: {sid} repeats"
                )));
            }
        }
    }
    Ok(())
}

fn check_statement(n: usize, st: &Map<String, Value>, key_policy: bool) -> KmsResult<()> {
    for k in st.keys() {
        if !matches!(
            k.as_str(),
            "Sid"
                | "Effect"
                | "Principal"
                | "NotPrincipal"
                | "Action"
                | "NotAction"
                | "Resource"
                | "NotResource"
                | "Condition"
        ) {
            return Err(malformed(format!("Statement {n}: unknown element {k}")));
        }
    }
    if let Some(sid) = st.get("Sid") {
        if !sid.is_string() {
            return Err(malformed(format!("Statement {n}: Sid must be a string")));
        }
    }
    match st.get("Effect") {
        Some(Value::String(e)) if e == "Allow" || e == "Deny" => {}
        Some(_) => {
            return Err(malformed(format!(
                "Statement {n}: Effect must be Allow or Deny"
            )))
        }
        None => return Err(malformed(format!("Statement {n}: Effect is missing"))),
    }
    if key_policy {
        let principal = exactly_one(n, st, "Principal", "NotPrincipal")?;
        check_principal(n, principal)?;
    } else if st.contains_key("Principal") || st.contains_key("NotPrincipal") {
        return Err(malformed(format!(
            "Statement {n}: an identity policy has no Principal; it applies to its principal"
        )));
    }
    let action = exactly_one(n, st, "Action", "NotAction")?;
    for a in strings(n, "Action", action)? {
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
                "Statement {n}: action {a} is not of the form service:Action (e.g. kms:Encrypt)"
            )));
        }
    }
    let resource = exactly_one(n, st, "Resource", "NotResource")?;
    for r in strings(n, "Resource", resource)? {
        if r != "*" && !r.starts_with("arn:") {
            return Err(malformed(format!(
                "Statement {n}: resource {r} must be * or an ARN"
            )));
        }
    }
    if let Some(cond) = st.get("Condition") {
        check_condition(n, cond)?;
    }
    Ok(())
}

fn exactly_one<'a>(n: usize, st: &'a Map<String, Value>, a: &str, b: &str) -> KmsResult<&'a Value> {
    match (st.get(a), st.get(b)) {
        (Some(v), None) | (None, Some(v)) => Ok(v),
        (Some(_), Some(_)) => Err(malformed(format!(
            "Statement {n}: use {a} or {b}, not both"
        ))),
        (None, None) => Err(malformed(format!("Statement {n}: {a} (or {b}) is missing"))),
    }
}

/// A string or a non-empty list of strings.
fn strings<'a>(n: usize, what: &str, v: &'a Value) -> KmsResult<Vec<&'a str>> {
    match v {
        Value::String(s) => Ok(vec![s.as_str()]),
        Value::Array(a) if !a.is_empty() => a
            .iter()
            .map(|x| {
                x.as_str().ok_or_else(|| {
                    malformed(format!("Statement {n}: every {what} must be a string"))
                })
            })
            .collect(),
        _ => Err(malformed(format!(
            "Statement {n}: {what} must be a string or a non-empty list of strings"
        ))),
    }
}

fn check_principal(n: usize, p: &Value) -> KmsResult<()> {
    match p {
        Value::String(s) if s == "*" => Ok(()),
        Value::Object(m) if !m.is_empty() => {
            for (kind, v) in m {
                if !matches!(
                    kind.as_str(),
                    "AWS" | "Service" | "Federated" | "CanonicalUser"
                ) {
                    return Err(malformed(format!(
                        "Statement {n}: unknown principal type {kind}"
                    )));
                }
                for id in strings(n, "Principal", v)? {
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
                }
            }
            Ok(())
        }
        _ => Err(malformed(format!(
            "Statement {n}: Principal must be \"*\" or an object such as {{\"AWS\": \"<ARN>\"}}"
        ))),
    }
}

fn check_condition(n: usize, cond: &Value) -> KmsResult<()> {
    let ops = cond
        .as_object()
        .ok_or_else(|| malformed(format!("Statement {n}: Condition must be an object")))?;
    for (op, block) in ops {
        let base = op
            .strip_prefix("ForAnyValue:")
            .or_else(|| op.strip_prefix("ForAllValues:"))
            .unwrap_or(op);
        let base = match base.strip_suffix("IfExists") {
            Some(b) if b != "Null" => b,
            _ => base,
        };
        if !CONDITION_OPERATORS.contains(&base) {
            return Err(malformed(format!(
                "Statement {n}: unknown condition operator {op}"
            )));
        }
        let keys = block.as_object().filter(|m| !m.is_empty()).ok_or_else(|| {
            malformed(format!(
                "Statement {n}: condition {op} must map condition keys to values"
            ))
        })?;
        for (key, v) in keys {
            if key.is_empty() {
                return Err(malformed(format!(
                    "Statement {n}: empty condition key in {op}"
                )));
            }
            let scalar = |x: &Value| x.is_string() || x.is_number() || x.is_boolean();
            let ok = match v {
                Value::Array(a) => !a.is_empty() && a.iter().all(scalar),
                x => scalar(x),
            };
            if !ok {
                return Err(malformed(format!(
                    "Statement {n}: the value of {key} in {op} must be a string, number, \
                     boolean or a non-empty list of them"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(doc: &str) -> Option<ErrorKind> {
        validate(doc).err().map(|e| e.kind)
    }

    #[test]
    fn default_policy_is_valid() {
        let p = default_policy("aws", "111122223333");
        assert!(validate(&p).is_ok(), "{p}");
        assert!(p.contains("arn:aws:iam::111122223333:root"));
    }

    #[test]
    fn grammar() {
        let ok = r#"{"Version":"2012-10-17","Statement":[
            {"Sid":"a","Effect":"Allow","Principal":{"AWS":["arn:aws:iam::111122223333:role/app","111122223333"]},
             "Action":["kms:Encrypt","kms:GenerateDataKey*"],"Resource":"*",
             "Condition":{"StringEquals":{"kms:EncryptionContext:tenant":"blue"},
                          "ForAnyValue:StringLike":{"kms:EncryptionContextKeys":["t*"]},
                          "BoolIfExists":{"kms:GrantIsForAWSResource":true},
                          "Null":{"kms:EncryptionContext:x":"false"}}},
            {"Sid":"b","Effect":"Deny","NotPrincipal":"*","NotAction":"kms:Decrypt","Resource":"*"}]}"#;
        assert_eq!(kind(ok), None);
        let m = Some(ErrorKind::MalformedPolicyDocument);
        for bad in [
            "not json",
            "[]",
            r#"{"Statement":[]}"#,
            r#"{"Version":"2020-01-01","Statement":{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*"}}"#,
            r#"{"Statement":{"Effect":"Maybe","Principal":"*","Action":"*","Resource":"*"}}"#,
            r#"{"Statement":{"Principal":"*","Action":"*","Resource":"*"}}"#,
            r#"{"Statement":{"Effect":"Allow","Action":"*","Resource":"*"}}"#,
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Resource":"*"}}"#,
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"*"}}"#,
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"*","NotAction":"*","Resource":"*"}}"#,
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"encrypt","Resource":"*"}}"#,
            r#"{"Statement":{"Effect":"Allow","Principal":{"AWS":"bob"},"Action":"*","Resource":"*"}}"#,
            r#"{"Statement":{"Effect":"Allow","Principal":{"Robot":"*"},"Action":"*","Resource":"*"}}"#,
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"*","Resource":"key"}}"#,
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*","Condition":{"StringSorta":{"k":"v"}}}}"#,
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*","Condition":{"StringEquals":{"k":{"x":1}}}}}"#,
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*","Extra":1}}"#,
            r#"{"Statement":[{"Sid":"x","Effect":"Allow","Principal":"*","Action":"*","Resource":"*"},{"Sid":"x","Effect":"Deny","Principal":"*","Action":"*","Resource":"*"}]}"#,
            r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":[],"Resource":"*"}}"#,
        ] {
            assert_eq!(kind(bad), m, "{bad}");
        }
        assert_eq!(
            kind(&" ".repeat(MAX_POLICY_BYTES + 1)),
            Some(ErrorKind::LimitExceeded)
        );
        assert_eq!(
            kind("{\"Statement\":\"\u{263a}\"}"),
            Some(ErrorKind::Validation)
        );
    }

    #[test]
    fn names() {
        assert!(check_policy_name(None).is_ok());
        assert!(check_policy_name(Some("default")).is_ok());
        assert_eq!(
            check_policy_name(Some("other")).unwrap_err().kind,
            ErrorKind::NotFound
        );
        assert_eq!(
            check_policy_name(Some("bad-name")).unwrap_err().kind,
            ErrorKind::Validation
        );
    }
}
