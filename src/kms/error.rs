//! The domain error: an AWS exception name plus a message for people.
//!
//! Every layer below (`hsm`, `store`) translates its own failures into this type at its edge,
//! so the API layer has exactly one mapping to do (see `api::status`). Messages name the key ARN
//! or store id involved, as AWS does, and never carry plaintext, data keys, passwords or PINs.

use std::fmt;

/// The AWS KMS exceptions this service can answer with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    Validation,
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
    KmsInternal,
}

impl ErrorKind {
    /// The AWS exception name, exactly as AWS spells it.
    pub fn aws_name(self) -> &'static str {
        match self {
            ErrorKind::Validation => "ValidationException",
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

impl KmsError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        KmsError {
            kind,
            message: message.into(),
        }
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

pub type KmsResult<T> = Result<T, KmsError>;
