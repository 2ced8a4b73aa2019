//! The domain error: an AWS exception name plus a message for people.
//!
//! The layers below (`hsm`, `metadata`) report typed outcomes; the domain turns them into
//! this type, so the API layer has exactly one mapping to do (see `api::status`). Messages
//! name the key ARN or store id involved, as AWS does, and never carry plaintext, data keys,
//! passwords or PINs.

use std::fmt;

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

    /// An internal failure. The detail goes to the log; the caller sees a generic message.
    pub fn internal(detail: impl fmt::Display) -> Self {
        tracing::error!(error = %detail, "internal error");
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

/// A metadata outcome the calling code did not expect is an internal error; the outcomes a
/// caller can cause (not found, a name taken, a state refused) are matched where they arise.
impl From<crate::metadata::Failure> for KmsError {
    fn from(f: crate::metadata::Failure) -> Self {
        KmsError::internal(f)
    }
}

pub type KmsResult<T> = Result<T, KmsError>;

#[cfg(test)]
mod tests {
    use super::*;

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
