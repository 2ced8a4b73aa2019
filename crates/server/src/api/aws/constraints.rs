//! The constraints of the AWS KMS API model, checked in one place for every request of
//! either front, before the operation's own rules and before its authorization, and
//! answered in AWS's validation text: required members, lengths (characters of a string,
//! bytes of a blob, entries of a list or map), integer ranges, enum values and patterns.
//!
//! `model.json` holds the model's constraints (written by scripts/aws-model.py from
//! ../shared/reference/aws-kms-api-model.json; the test below checks it still is). Members
//! are checked in the model's order; each broken constraint is one violation; all of a
//! request's violations are answered together (`N validation errors detected: ...; ...`), as
//! AWS answers them. A sensitive member (plaintext, a password) is never quoted.

use std::collections::HashMap;
use std::sync::LazyLock;

use serde::Deserialize;
use serde_json::Value;

use model::error::{validation_errors, violation, KmsResult, Shown};
use model::op::Op;

#[derive(Deserialize)]
struct Model {
    /// Operation -> its input shape.
    operations: HashMap<String, String>,
    shapes: HashMap<String, Shape>,
}

#[derive(Deserialize)]
struct Shape {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    required: Vec<String>,
    min: Option<i64>,
    max: Option<i64>,
    pattern: Option<String>,
    #[serde(rename = "enum")]
    values: Option<Vec<String>>,
    #[serde(default)]
    sensitive: bool,
    /// (member, its shape), in the model's order.
    #[serde(default)]
    members: Vec<(String, String)>,
    /// A list's member shape.
    member: Option<String>,
}

struct Constraints {
    model: Model,
    /// Each pattern, anchored: the model's patterns must match the whole value.
    patterns: HashMap<String, regex::Regex>,
}

static CONSTRAINTS: LazyLock<Constraints> = LazyLock::new(|| {
    let model: Model = serde_json::from_str(include_str!("model.json"))
        .expect("api/aws/model.json is the model's constraints");
    let patterns = model
        .shapes
        .iter()
        .filter_map(|(name, s)| {
            let p = s.pattern.as_ref()?;
            match regex::Regex::new(&format!("^(?:{p})$")) {
                Ok(r) => Some((name.clone(), r)),
                Err(e) => {
                    tracing::error!(shape = %name, error = %e, "a pattern of the AWS model does not compile; it is not checked");
                    None
                }
            }
        })
        .collect();
    Constraints { model, patterns }
});

/// Checks the AWS JSON `request` of `op` against the model: ValidationException with every
/// violation in AWS's words, or Ok.
pub fn check(op: Op, request: &Value) -> KmsResult<()> {
    let c = &*CONSTRAINTS;
    let Some(input) = c.model.operations.get(op.name()) else {
        return Ok(());
    };
    walk(c, input, request, Reading::Json)
}

/// Checks a gRPC request the same way, as its AWS JSON. In proto3 an empty field is the same
/// as an absent one: an empty list, map or blob, or an empty string where the model wants at
/// least one character, is read as absent (`Value null at ...` for a required member, as AWS
/// says of a member not sent); an empty string the model allows (a tag value) stays a value.
pub fn check_message<R: serde::Serialize>(op: Op, request: &R) -> KmsResult<()> {
    let c = &*CONSTRAINTS;
    let Some(input) = c.model.operations.get(op.name()) else {
        return Ok(());
    };
    let value = serde_json::to_value(request).map_err(model::error::KmsError::internal)?;
    walk(c, input, &value, Reading::Proto)
}

fn walk(c: &Constraints, input: &str, request: &Value, reading: Reading) -> KmsResult<()> {
    let mut found = Vec::new();
    c.structure(input, request, &At::Root, reading, &mut found);
    if found.is_empty() {
        Ok(())
    } else {
        Err(validation_errors(&found))
    }
}

/// How absence reads in the request's form.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Reading {
    /// AWS JSON: absent or null.
    Json,
    /// A proto3 message as JSON: also an empty field (`check_message`).
    Proto,
}

/// A member name as AWS's messages write it: `KeyId` -> `keyId`.
fn camel(member: &str) -> String {
    let mut c = member.chars();
    match c.next() {
        Some(first) => first.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

/// A value as AWS's messages quote it: strings as they are, lists as `[a, b]`.
fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => {
            let inner: Vec<String> = items.iter().map(text).collect();
            format!("[{}]", inner.join(", "))
        }
        other => other.to_string(),
    }
}

/// Where a member is: rendered as AWS writes it (`tags.1.member.tagKey`) only when a
/// violation names it, so that a valid request allocates nothing for its paths.
#[derive(Clone, Copy)]
enum At<'a> {
    Root,
    /// A member of a structure, by its name in the model.
    Member(&'a At<'a>, &'a str),
    /// The `n`th (1-based) element of a list of structures.
    Element(&'a At<'a>, usize),
}

impl At<'_> {
    fn render(&self) -> String {
        match self {
            At::Root => String::new(),
            At::Member(At::Root, name) => camel(name),
            At::Member(parent, name) => format!("{}.{}", parent.render(), camel(name)),
            At::Element(parent, n) => format!("{}.{n}.member", parent.render()),
        }
    }
}

impl Constraints {
    fn shape(&self, name: &str) -> Option<&Shape> {
        self.model.shapes.get(name)
    }

    /// The members of structure `shape` in `value` (which is at `at`).
    fn structure(
        &self,
        shape: &str,
        value: &Value,
        at: &At<'_>,
        reading: Reading,
        found: &mut Vec<String>,
    ) {
        let Some(s) = self.shape(shape) else { return };
        for (member, target) in &s.members {
            let here = At::Member(at, member);
            match value.get(member) {
                Some(v) if !self.absent(target, v, reading) => {
                    self.member(target, v, &here, reading, found)
                }
                _ => {
                    if s.required.contains(member) {
                        found.push(violation(
                            Shown::Null,
                            &here.render(),
                            "Member must not be null",
                        ));
                    }
                }
            }
        }
    }

    /// Whether `value` of shape `shape` stands for an absent member.
    fn absent(&self, shape: &str, value: &Value, reading: Reading) -> bool {
        match (value, reading) {
            (Value::Null, _) => true,
            (_, Reading::Json) => false,
            (Value::Array(a), Reading::Proto) => a.is_empty(),
            (Value::Object(o), Reading::Proto) => o.is_empty(),
            (Value::String(v), Reading::Proto) if v.is_empty() => self
                .shape(shape)
                .is_some_and(|s| s.kind == "blob" || s.min.unwrap_or(0) > 0),
            _ => false,
        }
    }

    /// One member's value against its shape.
    fn member(
        &self,
        shape: &str,
        value: &Value,
        at: &At<'_>,
        reading: Reading,
        found: &mut Vec<String>,
    ) {
        let Some(s) = self.shape(shape) else { return };
        match s.kind.as_str() {
            "structure" => self.structure(shape, value, at, reading, found),
            "list" => {
                let Value::Array(items) = value else { return };
                self.bounds(s, items.len() as i64, "length", value, at, found);
                let Some(element) = s.member.as_deref() else {
                    return;
                };
                match self.shape(element).map(|e| e.kind.as_str()) {
                    Some("structure") => {
                        for (i, item) in items.iter().enumerate() {
                            let element_at = At::Element(at, i + 1);
                            self.structure(element, item, &element_at, reading, found);
                        }
                    }
                    _ => {
                        // Members of a simple type: one violation for the list, naming
                        // every constraint of the member type (the form AWS answers).
                        let broken = items.iter().any(|item| {
                            let mut one = Vec::new();
                            self.member(element, item, at, reading, &mut one);
                            !one.is_empty()
                        });
                        if broken {
                            let all = self.described(element);
                            found.push(violation(
                                Shown::Value(&text(value)),
                                &at.render(),
                                &format!("Member must satisfy constraint: [{}]", all.join(", ")),
                            ));
                        }
                    }
                }
            }
            "map" => {
                if let Value::Object(m) = value {
                    self.bounds(s, m.len() as i64, "length", value, at, found);
                }
            }
            "string" => {
                let Value::String(v) = value else { return };
                let shown = if s.sensitive {
                    Shown::Hidden
                } else {
                    Shown::Value(v)
                };
                let n = v.chars().count() as i64;
                self.bounds_shown(s, n, "length", shown, at, found);
                if let Some(values) = &s.values {
                    if !values.iter().any(|x| x == v) {
                        found.push(violation(
                            shown,
                            &at.render(),
                            &format!(
                                "Member must satisfy enum value set: [{}]",
                                values.join(", ")
                            ),
                        ));
                    }
                }
                if let (Some(p), Some(re)) = (&s.pattern, self.patterns.get(shape)) {
                    if !re.is_match(v) {
                        found.push(violation(
                            shown,
                            &at.render(),
                            &format!("Member must satisfy regular expression pattern: {p}"),
                        ));
                    }
                }
            }
            "blob" => {
                let Value::String(b64) = value else { return };
                // What the member carries is its bytes, counted from the base64 without
                // decoding it (the body was read as its types already, so it is base64).
                let padding = b64.bytes().rev().take_while(|b| *b == b'=').count();
                let bytes = (b64.len() / 4 * 3).saturating_sub(padding);
                let shown = if s.sensitive {
                    Shown::Hidden
                } else {
                    Shown::Value(b64)
                };
                self.bounds_shown(s, bytes as i64, "length", shown, at, found);
            }
            "integer" | "long" => {
                let Some(n) = value.as_i64() else { return };
                self.bounds(s, n, "value", value, at, found);
            }
            _ => {}
        }
    }

    fn bounds(
        &self,
        s: &Shape,
        n: i64,
        what: &str,
        value: &Value,
        at: &At<'_>,
        found: &mut Vec<String>,
    ) {
        let outside = s.min.is_some_and(|min| n < min) || s.max.is_some_and(|max| n > max);
        if !outside {
            return;
        }
        let quoted = text(value);
        let shown = if s.sensitive {
            Shown::Hidden
        } else {
            Shown::Value(&quoted)
        };
        self.bounds_shown(s, n, what, shown, at, found);
    }

    fn bounds_shown(
        &self,
        s: &Shape,
        n: i64,
        what: &str,
        shown: Shown<'_>,
        at: &At<'_>,
        found: &mut Vec<String>,
    ) {
        if let Some(min) = s.min.filter(|min| n < *min) {
            found.push(violation(
                shown,
                &at.render(),
                &format!("Member must have {what} greater than or equal to {min}"),
            ));
        }
        if let Some(max) = s.max.filter(|max| n > *max) {
            found.push(violation(
                shown,
                &at.render(),
                &format!("Member must have {what} less than or equal to {max}"),
            ));
        }
    }

    /// Every constraint of a simple shape, as AWS names them inside a list's constraint.
    fn described(&self, shape: &str) -> Vec<String> {
        let Some(s) = self.shape(shape) else {
            return Vec::new();
        };
        let what = if s.kind == "integer" {
            "value"
        } else {
            "length"
        };
        let mut all = Vec::new();
        if let Some(max) = s.max {
            all.push(format!(
                "Member must have {what} less than or equal to {max}"
            ));
        }
        if let Some(min) = s.min {
            all.push(format!(
                "Member must have {what} greater than or equal to {min}"
            ));
        }
        if let Some(values) = &s.values {
            all.push(format!(
                "Member must satisfy enum value set: [{}]",
                values.join(", ")
            ));
        }
        if let Some(p) = &s.pattern {
            all.push(format!(
                "Member must satisfy regular expression pattern: {p}"
            ));
        }
        all
    }
}

/// The full AWS API model beside the checkout (../shared/reference), for the tests that
/// compare with it; None where it is not, except under CI, whose checkout has it.
#[cfg(test)]
pub(crate) fn full_model() -> Option<Value> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../../shared/reference/aws-kms-api-model.json"
    );
    match std::fs::read_to_string(path) {
        Ok(text) => Some(serde_json::from_str(&text).expect("the AWS model is JSON")),
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{path}: {e}, and CI needs it"
            );
            eprintln!("skipped: {path}: {e}");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::json;

    fn message(op: Op, request: Value) -> Option<String> {
        check(op, &request).err().map(|e| e.message)
    }

    /// The texts recorded from real AWS (LocalStack's KMS snapshot), word for word.
    #[test]
    fn recorded_texts() {
        assert_eq!(
            message(Op::GenerateRandom, json!({"NumberOfBytes": 1025})).unwrap(),
            "1 validation error detected: Value '1025' at 'numberOfBytes' failed to satisfy \
             constraint: Member must have value less than or equal to 1024"
        );
        assert_eq!(
            message(Op::GenerateRandom, json!({"NumberOfBytes": 0})).unwrap(),
            "1 validation error detected: Value '0' at 'numberOfBytes' failed to satisfy \
             constraint: Member must have value greater than or equal to 1"
        );
        let plaintext = base64::engine::general_purpose::STANDARD.encode([0u8; 4097]);
        assert_eq!(
            message(Op::Encrypt, json!({"KeyId": "k", "Plaintext": plaintext})).unwrap(),
            "1 validation error detected: Value at 'plaintext' failed to satisfy constraint: \
             Member must have length less than or equal to 4096"
        );
        let long = "a".repeat(129);
        assert_eq!(
            message(
                Op::CreateKey,
                json!({"Tags": [{"TagKey": "ok", "TagValue": ""}, {"TagKey": long, "TagValue": "v"}]})
            )
            .unwrap(),
            format!(
                "1 validation error detected: Value '{long}' at 'tags.2.member.tagKey' failed \
                 to satisfy constraint: Member must have length less than or equal to 128"
            )
        );
        assert_eq!(
            message(Op::DescribeKey, json!({})).unwrap(),
            "1 validation error detected: Value null at 'keyId' failed to satisfy constraint: \
             Member must not be null"
        );
    }

    #[test]
    fn several_violations_are_answered_together_in_the_models_order() {
        let m = message(
            Op::CreateAlias,
            json!({"AliasName": format!("alias/{}", "!".repeat(251))}),
        )
        .unwrap();
        assert!(m.starts_with("3 validation errors detected: "), "{m}");
        let at_alias = m.find("at 'aliasName'").unwrap();
        let at_target = m.find("Value null at 'targetKeyId'").unwrap();
        assert!(at_alias < at_target, "{m}");
        assert!(m.contains("Member must satisfy regular expression pattern: ^[a-zA-Z0-9:/_-]+$"));
        assert!(m.contains("Member must have length less than or equal to 256"));
        // An enum, and a list of enums.
        let m = message(
            Op::CreateGrant,
            json!({"KeyId": "k", "GranteePrincipal": "p", "Operations": ["Decrypt", "Dance"]}),
        )
        .unwrap();
        assert!(
            m.contains("Value '[Decrypt, Dance]' at 'operations' failed to satisfy constraint: Member must satisfy constraint: [Member must satisfy enum value set: ["),
            "{m}"
        );
        // A sensitive member is never quoted.
        let m = message(
            Op::CreateCustomKeyStore,
            json!({"CustomKeyStoreName": "s", "KeyStorePassword": "short"}),
        )
        .unwrap();
        assert!(m.contains("Value at 'keyStorePassword'"), "{m}");
        assert!(!m.contains("short"), "{m}");
        assert_eq!(
            message(Op::Encrypt, json!({"KeyId": "k", "Plaintext": "aGk="})),
            None
        );
    }

    /// A gRPC request: proto3's empty fields are absent.
    #[test]
    fn grpc_requests_are_checked_the_same_way() {
        let m = check_message(
            Op::DescribeKey,
            &crate::proto::DescribeKeyRequest::default(),
        )
        .unwrap_err()
        .message;
        assert!(m.contains("Value null at 'keyId'"), "{m}");
        // An empty tag value is a value (the model allows it), not an absent member.
        let tagged = crate::proto::CreateKeyRequest {
            tags: vec![crate::proto::Tag {
                tag_key: "k".into(),
                tag_value: String::new(),
            }],
            ..Default::default()
        };
        assert_eq!(check_message(Op::CreateKey, &tagged), Ok(()));
    }

    /// Every pattern of the model compiles, and model.json is what scripts/aws-model.py
    /// writes from the model (where ../shared is; CI has it).
    #[test]
    fn the_constraints_are_the_models() {
        assert_eq!(
            CONSTRAINTS.patterns.len(),
            CONSTRAINTS
                .model
                .shapes
                .values()
                .filter(|s| s.pattern.is_some())
                .count()
        );
        let Some(full) = full_model() else { return };
        for (name, op) in full["operations"].as_object().unwrap() {
            assert_eq!(
                CONSTRAINTS.model.operations.get(name).map(String::as_str),
                op["input"]["shape"].as_str(),
                "{name}"
            );
        }
        for (name, shape) in full["shapes"].as_object().unwrap() {
            if shape.get("exception").is_some() {
                continue;
            }
            let ours = &CONSTRAINTS.model.shapes[name];
            assert_eq!(ours.kind, shape["type"].as_str().unwrap(), "{name}");
            assert_eq!(ours.min, shape["min"].as_i64(), "{name}");
            assert_eq!(ours.max, shape["max"].as_i64(), "{name}");
            assert_eq!(ours.pattern.as_deref(), shape["pattern"].as_str(), "{name}");
            let required: Vec<&str> = shape["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            assert_eq!(ours.required, required, "{name}");
            let members: Vec<&String> = ours.members.iter().map(|(m, _)| m).collect();
            let mut theirs: Vec<&String> = shape["members"]
                .as_object()
                .map(|m| m.keys().collect())
                .unwrap_or_default();
            let mut sorted = members.clone();
            sorted.sort();
            theirs.sort();
            assert_eq!(sorted, theirs, "{name}");
        }
    }
}
