//! Policy documents: the IAM policy grammar as serde types (`Document`), read once by
//! `Policy::parse`, which checks what the types cannot say while it compiles; the AWS
//! default key policy, and key policy names.

use std::collections::BTreeMap;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

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

pub(super) fn malformed(msg: String) -> KmsError {
    KmsError::new(ErrorKind::MalformedPolicyDocument, msg)
}

pub(super) const CONDITION_OPERATORS: &[&str] = &[
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

/// A policy document as IAM's grammar writes it. serde reads it once, refusing unknown
/// elements and values of the wrong type (with the line and column); `Policy::parse`
/// checks the rest of the grammar while it compiles the statements.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Document {
    #[serde(rename = "Version")]
    pub version: Option<String>,
    #[serde(rename = "Id")]
    #[allow(dead_code)] // read for its type only
    pub id: Option<String>,
    #[serde(rename = "Statement")]
    pub statement: OneOrMany<Statement>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Statement {
    #[serde(rename = "Sid")]
    pub sid: Option<String>,
    #[serde(rename = "Effect")]
    pub effect: Effect,
    #[serde(rename = "Principal")]
    pub principal: Option<PrincipalElement>,
    #[serde(rename = "NotPrincipal")]
    pub not_principal: Option<PrincipalElement>,
    #[serde(rename = "Action")]
    pub action: Option<OneOrMany<String>>,
    #[serde(rename = "NotAction")]
    pub not_action: Option<OneOrMany<String>>,
    #[serde(rename = "Resource")]
    pub resource: Option<OneOrMany<String>>,
    #[serde(rename = "NotResource")]
    pub not_resource: Option<OneOrMany<String>>,
    /// Operator -> condition key -> values.
    #[serde(rename = "Condition")]
    pub condition: Option<BTreeMap<String, BTreeMap<String, OneOrMany<Scalar>>>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
pub(super) enum Effect {
    Allow,
    Deny,
}

/// `"*"`, or principals by type: `{"AWS": [...], "Service": ...}`.
pub(super) enum PrincipalElement {
    Star,
    ByType(BTreeMap<String, OneOrMany<String>>),
}

/// A condition value: a string, number or boolean, kept as its text.
pub(super) struct Scalar(pub String);

/// An element that is one value or a list of them.
pub(super) enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(t) => vec![t],
            OneOrMany::Many(v) => v,
        }
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Not `#[serde(untagged)]`: a list is read element by element, so an error inside
        // one names what is wrong there rather than "no variant matched".
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a value or a list of values")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(x) = seq.next_element()? {
                    out.push(x);
                }
                Ok(OneOrMany::Many(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(OneOrMany::One)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                T::deserialize(de::value::StrDeserializer::new(v)).map(OneOrMany::One)
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                T::deserialize(de::value::BoolDeserializer::new(v)).map(OneOrMany::One)
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                T::deserialize(de::value::I64Deserializer::new(v)).map(OneOrMany::One)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                T::deserialize(de::value::U64Deserializer::new(v)).map(OneOrMany::One)
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                T::deserialize(de::value::F64Deserializer::new(v)).map(OneOrMany::One)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for PrincipalElement {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = PrincipalElement;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"*\" or an object such as {\"AWS\": \"<ARN>\"}")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PrincipalElement, E> {
                if v == "*" {
                    Ok(PrincipalElement::Star)
                } else {
                    Err(E::invalid_value(de::Unexpected::Str(v), &self))
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<PrincipalElement, A::Error> {
                BTreeMap::deserialize(de::value::MapAccessDeserializer::new(map))
                    .map(PrincipalElement::ByType)
            }
        }
        d.deserialize_any(V)
    }
}

/// Reads a document: the checks on its text (empty, size, characters), then serde's reading
/// of the grammar's shape. What the shape cannot say is checked by `Policy::parse`.
pub(super) fn read(doc: &str) -> KmsResult<Document> {
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
    serde_json::from_str(doc).map_err(|e| malformed(format!("The policy is not valid: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(doc: &str) -> Option<ErrorKind> {
        super::super::Policy::parse(doc, super::super::Kind::Key)
            .err()
            .map(|e| e.kind)
    }

    #[test]
    fn default_policy_is_valid() {
        let p = default_policy("aws", "111122223333");
        assert_eq!(kind(&p), None, "{p}");
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
        // serde's reading names the element and where it is.
        let message = |doc: &str| {
            super::super::Policy::parse(doc, super::super::Kind::Key)
                .err()
                .map(|e| e.message)
                .unwrap_or_default()
        };
        let m = message(
            r#"{"Statement":[{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*"},
            {"Effect":"Allow","Principal":"*","Action":"*","Resource":"*","Extra":1}]}"#,
        );
        assert!(
            m.contains("unknown field `Extra`") && m.contains("line 2"),
            "{m}"
        );
        let m = message(
            r#"{"Statement":{"Effect":"Maybe","Principal":"*","Action":"*","Resource":"*"}}"#,
        );
        assert!(m.contains("unknown variant `Maybe`"), "{m}");
        let m = message(r#"{"Statement":{"Effect":"Allow","Principal":"*","Action":"*"}}"#);
        assert_eq!(m, "Statement 1: Resource (or NotResource) is missing");
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
