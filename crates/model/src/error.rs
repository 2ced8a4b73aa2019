//! The domain error: an AWS exception name plus a message for people.
//!
//! The layers below (`hsm`, `metadata`) report typed outcomes; the domain turns them into
//! this type, so the API layer has exactly one mapping to do (see `api::status`). Messages
//! name the key ARN or store id involved, as AWS does, and never carry plaintext, data keys,
//! passwords or PINs.

use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The AWS KMS exceptions this service can answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Validation,
    /// The request could not be read at all (not a message of its operation).
    Serialization,
    InvalidCiphertext,
    IncorrectKey,
    InvalidKeyUsage,
    InvalidArn,
    InvalidMarker,
    InvalidAliasName,
    InvalidGrantToken,
    InvalidGrantId,
    MalformedPolicyDocument,
    Tag,
    IncorrectTrustAnchor,
    NotFound,
    CustomKeyStoreNotFound,
    CloudHsmClusterNotFound,
    CustomKeyStoreNameInUse,
    CloudHsmClusterInUse,
    AlreadyExists,
    KmsInvalidState,
    Disabled,
    CustomKeyStoreInvalidState,
    CustomKeyStoreHasCmks,
    CloudHsmClusterInvalidConfiguration,
    CloudHsmClusterNotActive,
    CloudHsmClusterNotRelated,
    DryRunOperation,
    LimitExceeded,
    UnsupportedOperation,
    DependencyTimeout,
    Throttling,
    AccessDenied,
    /// An alias name with AWS's reserved prefix `alias/aws/`: AWS answers this exception,
    /// which its API model does not list.
    NotAuthorized,
    /// The AWS protocol: a request for no operation of this service.
    UnknownOperation,
    /// SigV4 (the AWS protocol): no Authorization header.
    MissingAuthenticationToken,
    /// SigV4: an Authorization header that cannot be read.
    IncompleteSignature,
    /// SigV4: an access key id this service does not know.
    UnrecognizedClient,
    /// SigV4: a signature that does not match, a wrong region or service, an expired request.
    InvalidSignature,
    KmsInternal,
}

impl ErrorKind {
    /// The AWS exception name, exactly as AWS spells it.
    #[inline]
    pub fn aws_name(self) -> &'static str {
        match self {
            ErrorKind::Validation => "ValidationException",
            ErrorKind::Serialization => "SerializationException",
            ErrorKind::InvalidCiphertext => "InvalidCiphertextException",
            ErrorKind::IncorrectKey => "IncorrectKeyException",
            ErrorKind::InvalidKeyUsage => "InvalidKeyUsageException",
            ErrorKind::InvalidArn => "InvalidArnException",
            ErrorKind::InvalidMarker => "InvalidMarkerException",
            ErrorKind::InvalidAliasName => "InvalidAliasNameException",
            ErrorKind::NotAuthorized => "NotAuthorizedException",
            ErrorKind::InvalidGrantToken => "InvalidGrantTokenException",
            ErrorKind::InvalidGrantId => "InvalidGrantIdException",
            ErrorKind::MalformedPolicyDocument => "MalformedPolicyDocumentException",
            ErrorKind::Tag => "TagException",
            ErrorKind::IncorrectTrustAnchor => "IncorrectTrustAnchorException",
            ErrorKind::NotFound => "NotFoundException",
            ErrorKind::CustomKeyStoreNotFound => "CustomKeyStoreNotFoundException",
            ErrorKind::CloudHsmClusterNotFound => "CloudHsmClusterNotFoundException",
            ErrorKind::CustomKeyStoreNameInUse => "CustomKeyStoreNameInUseException",
            ErrorKind::CloudHsmClusterInUse => "CloudHsmClusterInUseException",
            ErrorKind::AlreadyExists => "AlreadyExistsException",
            ErrorKind::KmsInvalidState => "KMSInvalidStateException",
            ErrorKind::Disabled => "DisabledException",
            ErrorKind::CustomKeyStoreInvalidState => "CustomKeyStoreInvalidStateException",
            ErrorKind::CustomKeyStoreHasCmks => "CustomKeyStoreHasCMKsException",
            ErrorKind::CloudHsmClusterInvalidConfiguration => {
                "CloudHsmClusterInvalidConfigurationException"
            }
            ErrorKind::CloudHsmClusterNotActive => "CloudHsmClusterNotActiveException",
            ErrorKind::CloudHsmClusterNotRelated => "CloudHsmClusterNotRelatedException",
            ErrorKind::DryRunOperation => "DryRunOperationException",
            ErrorKind::LimitExceeded => "LimitExceededException",
            ErrorKind::UnsupportedOperation => "UnsupportedOperationException",
            ErrorKind::DependencyTimeout => "DependencyTimeoutException",
            ErrorKind::Throttling => "ThrottlingException",
            ErrorKind::AccessDenied => "AccessDeniedException",
            ErrorKind::UnknownOperation => "UnknownOperationException",
            ErrorKind::MissingAuthenticationToken => "MissingAuthenticationTokenException",
            ErrorKind::IncompleteSignature => "IncompleteSignatureException",
            ErrorKind::UnrecognizedClient => "UnrecognizedClientException",
            ErrorKind::InvalidSignature => "InvalidSignatureException",
            ErrorKind::KmsInternal => "KMSInternalException",
        }
    }
}

/// An error answered to the caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KmsError {
    pub kind: ErrorKind,
    pub message: String,
}

/// Longest message answered, in bytes: a message travels in the response's metadata twice
/// (grpc-message and the status details), which HTTP/2 peers bound to 16 KiB or less.
pub const MESSAGE_LIMIT: usize = 1024;

/// Longest piece of caller input quoted in a message, in characters.
pub const QUOTE_LIMIT: usize = 128;

/// Longest value a validation message quotes, in characters: AWS quotes the whole value (a
/// 257-character tag value, recorded), and the model's longest common bound is 256.
pub const VALIDATION_QUOTE_LIMIT: usize = 300;

/// How a validation message shows the value at fault.
#[derive(Clone, Copy, Debug)]
pub enum Shown<'a> {
    /// `Value '<value>' at ...`
    Value(&'a str),
    /// `Value null at ...`: a required member is missing.
    Null,
    /// `Value at ...`: a sensitive member (plaintext, a password), never quoted.
    Hidden,
}

/// One violated constraint of the AWS API model, in AWS's validation text (recorded from
/// real AWS: LocalStack's KMS snapshot), e.g. `Value '1025' at 'numberOfBytes' failed to
/// satisfy constraint: Member must have value less than or equal to 1024`. `path` is the
/// member's path as AWS writes it (camelCase, `tags.1.member.tagKey` inside lists).
pub fn violation(shown: Shown<'_>, path: &str, constraint: &str) -> String {
    let value = match shown {
        Shown::Value(v) => match v.char_indices().nth(VALIDATION_QUOTE_LIMIT) {
            None => format!(" '{v}'"),
            Some((end, _)) => format!(" '{}...'", &v[..end]),
        },
        Shown::Null => " null".to_string(),
        Shown::Hidden => String::new(),
    };
    format!("Value{value} at '{path}' failed to satisfy constraint: {constraint}")
}

/// ValidationException for `violations` (from `violation`), as AWS reports several:
/// `2 validation errors detected: <one>; <two>`.
pub fn validation_errors(violations: &[String]) -> KmsError {
    let n = violations.len();
    let plural = if n == 1 { "error" } else { "errors" };
    KmsError::validation(format!(
        "{n} validation {plural} detected: {}",
        violations.join("; ")
    ))
}

/// Caller input as a message quotes it: cut to `QUOTE_LIMIT` characters, with `...` when cut.
pub fn quoted(input: &str) -> std::borrow::Cow<'_, str> {
    match input.char_indices().nth(QUOTE_LIMIT) {
        None => input.into(),
        Some((end, _)) => format!("{}...", &input[..end]).into(),
    }
}

impl KmsError {
    /// An error with `message`, cut to `MESSAGE_LIMIT` bytes: callers quote their input with
    /// `quoted`, and this is the backstop for any message that still grows with it.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if message.len() > MESSAGE_LIMIT {
            let mut end = MESSAGE_LIMIT - 3;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
            message.push_str("...");
        }
        KmsError { kind, message }
    }

    pub fn validation(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Validation, message)
    }

    pub fn invalid_state(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::KmsInvalidState, message)
    }

    /// An internal failure. The detail goes to the log (within `LOGGED_PER_SECOND`); the
    /// caller sees a generic message.
    pub fn internal(detail: impl fmt::Display) -> Self {
        static BUDGET: Mutex<LogBudget> = Mutex::new(LogBudget::new());
        let verdict = BUDGET
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .spend(Instant::now());
        match verdict {
            Some(0) => tracing::error!(error = %detail, "internal error"),
            Some(unlogged) => tracing::error!(
                error = %detail,
                unlogged,
                "internal error; `unlogged` before it went over the limit of {LOGGED_PER_SECOND} logged a second"
            ),
            None => {}
        }
        Self::new(
            ErrorKind::KmsInternal,
            "An internal error occurred; see the service log",
        )
    }
}

impl fmt::Display for KmsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.aws_name(), self.message)
    }
}

impl std::error::Error for KmsError {}

pub type KmsResult<T> = Result<T, KmsError>;

/// Internal errors logged per second at most. When the metadata database is down every
/// request fails with one; unbounded, that is an ERROR line per request (thousands a second
/// here), enough to fill a disk or drown a log pipeline. The rest are counted, and the count
/// goes out with the next line logged.
const LOGGED_PER_SECOND: u32 = 20;

/// Which internal errors of a one-second window are logged.
struct LogBudget {
    window: Option<Instant>,
    logged: u32,
    unlogged: u64,
}

impl LogBudget {
    const fn new() -> LogBudget {
        LogBudget {
            window: None,
            logged: 0,
            unlogged: 0,
        }
    }

    /// One error at `now`: `Some(n)` to log it, with `n` errors left unlogged before it;
    /// `None` to count it instead.
    fn spend(&mut self, now: Instant) -> Option<u64> {
        if self
            .window
            .is_none_or(|w| now.saturating_duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.logged = 0;
        }
        if self.logged < LOGGED_PER_SECOND {
            self.logged += 1;
            Some(std::mem::take(&mut self.unlogged))
        } else {
            self.unlogged += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood of internal errors (a database outage) logs at most LOGGED_PER_SECOND a
    /// second, and the next line logged says how many were not.
    #[test]
    fn internal_errors_are_logged_within_a_budget() {
        let mut budget = LogBudget::new();
        let start = Instant::now();
        let logged = (0..5_000)
            .filter(|i| budget.spend(start + Duration::from_micros(*i)).is_some())
            .count();
        assert_eq!(logged, LOGGED_PER_SECOND as usize);
        let next = budget.spend(start + Duration::from_secs(1));
        assert_eq!(next, Some(5_000 - LOGGED_PER_SECOND as u64));
        assert_eq!(budget.spend(start + Duration::from_secs(1)), Some(0));
    }

    #[test]
    fn messages_and_quotes_are_bounded() {
        let emoji = "\u{1F600}".repeat(2048);
        let q = quoted(&emoji);
        assert_eq!(q.chars().count(), QUOTE_LIMIT + 3);
        assert!(q.ends_with("..."));
        assert_eq!(quoted("short"), "short");
        let e = KmsError::new(ErrorKind::NotFound, format!("Key '{emoji}' does not exist"));
        assert!(e.message.len() <= MESSAGE_LIMIT, "{}", e.message.len());
        assert!(e.message.ends_with("..."));
    }
}
