//! Domain error -> gRPC status: one exhaustive match (no `_` arm), so a new exception cannot
//! be added without deciding its code. The status details carry a google.rpc.ErrorInfo whose
//! `reason` is the AWS exception name and whose `domain` is `kms`. **Contract.**

use std::collections::HashMap;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use model::error::{ErrorKind, KmsError};

pub const ERROR_DOMAIN: &str = "kms";

pub fn code(kind: ErrorKind) -> Code {
    use ErrorKind::*;
    match kind {
        Validation
        | Serialization
        | InvalidCiphertext
        | IncorrectKey
        | InvalidKeyUsage
        | InvalidArn
        | InvalidMarker
        | InvalidAliasName
        | InvalidGrantToken
        | InvalidGrantId
        | MalformedPolicyDocument
        | Tag
        | IncorrectTrustAnchor => Code::InvalidArgument,
        NotFound | CustomKeyStoreNotFound | CloudHsmClusterNotFound => Code::NotFound,
        CustomKeyStoreNameInUse | CloudHsmClusterInUse | AlreadyExists => Code::AlreadyExists,
        KmsInvalidState
        | Disabled
        | CustomKeyStoreInvalidState
        | CustomKeyStoreHasCmks
        | CloudHsmClusterInvalidConfiguration
        | CloudHsmClusterNotActive
        | CloudHsmClusterNotRelated
        | DryRunOperation => Code::FailedPrecondition,
        LimitExceeded | Throttling => Code::ResourceExhausted,
        UnsupportedOperation | UnknownOperation => Code::Unimplemented,
        AccessDenied | NotAuthorized => Code::PermissionDenied,
        MissingAuthenticationToken
        | IncompleteSignature
        | UnrecognizedClient
        | InvalidSignature => Code::Unauthenticated,
        DependencyTimeout => Code::Unavailable,
        KmsInternal => Code::Internal,
    }
}

pub fn to_status(e: KmsError) -> Status {
    Status::with_error_details(
        code(e.kind),
        e.message,
        ErrorDetails::with_error_info(e.kind.aws_name(), ERROR_DOMAIN, HashMap::new()),
    )
}
