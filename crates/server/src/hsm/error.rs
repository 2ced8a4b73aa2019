//! The one place PKCS#11 return codes are translated into what the rest of hsm-kms needs.
//!
//! Three tiers (DESIGN.md section 4): *data* errors are the caller's (bad ciphertext or tag)
//! and keep the session; *session* errors evict the session and the call is retried once on a
//! fresh one; *device* errors mean the token is gone or broken. Login failures have their own
//! mapping to AWS connection error codes.

use cryptoki::context::Function;
use cryptoki::error::{Error, RvError};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Data,
    Session,
    Device,
    /// Anything else: a bug, a template the token rejects, an exhausted resource.
    Other,
}

/// Classifies a PKCS#11 failure.
pub fn tier(e: &Error) -> Tier {
    let Error::Pkcs11(rv, function) = e else {
        return Tier::Other;
    };
    match rv {
        // The tag did not verify or the ciphertext is malformed: the caller's bytes are wrong.
        RvError::EncryptedDataInvalid | RvError::EncryptedDataLenRange => Tier::Data,
        // SoftHSM2 reports some GCM tag failures as a general error; on a decryption that is
        // the ciphertext's fault, elsewhere it is not.
        RvError::GeneralError | RvError::FunctionFailed
            if matches!(function, Function::Decrypt | Function::DecryptInit) =>
        {
            Tier::Data
        }
        RvError::DataLenRange | RvError::DataInvalid => Tier::Data,
        // The session went away (closed, token logged out underneath us): a new one may work.
        RvError::SessionHandleInvalid
        | RvError::SessionClosed
        | RvError::UserNotLoggedIn
        | RvError::OperationActive => Tier::Session,
        // The token or the device behind it is gone or broken.
        RvError::DeviceError
        | RvError::DeviceRemoved
        | RvError::DeviceMemory
        | RvError::TokenNotPresent
        | RvError::TokenNotRecognized
        | RvError::CryptokiNotInitialized => Tier::Device,
        _ => Tier::Other,
    }
}

/// Whether the error says a cached object handle no longer names an object.
pub fn is_stale_handle(e: &Error) -> bool {
    matches!(
        e,
        Error::Pkcs11(RvError::KeyHandleInvalid | RvError::ObjectHandleInvalid, _)
    )
}

/// Why a login failed, in the vocabulary of AWS ConnectionErrorCode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoginFailure {
    /// Wrong password: INVALID_CREDENTIALS.
    InvalidCredentials,
    /// Too many wrong passwords: USER_LOCKED_OUT.
    UserLockedOut,
    /// The crypto user was never set up on the token: USER_NOT_FOUND.
    UserNotFound,
    /// The token is absent: CLUSTER_NOT_FOUND.
    TokenNotFound,
    /// The device failed: NETWORK_ERRORS (the HSM could not be reached properly).
    Device,
    /// Anything else: INTERNAL_ERROR.
    Internal,
}

impl LoginFailure {
    pub fn from_error(e: &Error) -> LoginFailure {
        match e {
            Error::Pkcs11(
                RvError::PinIncorrect | RvError::PinInvalid | RvError::PinLenRange,
                _,
            ) => LoginFailure::InvalidCredentials,
            Error::Pkcs11(RvError::PinLocked | RvError::PinExpired, _) => {
                LoginFailure::UserLockedOut
            }
            Error::Pkcs11(RvError::UserPinNotInitialized, _) => LoginFailure::UserNotFound,
            Error::Pkcs11(RvError::TokenNotPresent | RvError::SlotIdInvalid, _) => {
                LoginFailure::TokenNotFound
            }
            e if tier(e) == Tier::Device => LoginFailure::Device,
            _ => LoginFailure::Internal,
        }
    }
}

/// A failed HSM operation, as the domain sees it.
#[derive(Debug)]
pub enum HsmError {
    /// The ciphertext or tag is wrong (InvalidCiphertextException).
    BadCiphertext,
    /// No token object carries this key id.
    KeyMaterialMissing,
    /// The key in the token does not allow the operation (its CKA_ENCRYPT or CKA_DECRYPT
    /// is off): InvalidKeyUsageException.
    KeyUsage,
    /// The device tier failed; the store cannot serve until it reconnects.
    Unavailable(String),
    /// The operation did not finish within the call deadline.
    Timeout(std::time::Duration),
    /// Anything else; the detail is for the log.
    Internal(String),
}

impl HsmError {
    pub fn from_pkcs11(e: &Error) -> HsmError {
        if let Error::Pkcs11(RvError::KeyFunctionNotPermitted, _) = e {
            return HsmError::KeyUsage;
        }
        match tier(e) {
            Tier::Data => HsmError::BadCiphertext,
            Tier::Device => HsmError::Unavailable(short(e)),
            Tier::Session | Tier::Other => HsmError::Internal(short(e)),
        }
    }
}

/// The return value's name (`DeviceError`), or the kind of a non-PKCS#11 failure; for metrics.
pub fn rv_name(e: &Error) -> String {
    match e {
        Error::Pkcs11(rv, _) => format!("{rv:?}"),
        _ => "Library".into(),
    }
}

/// A one-line rendering of a PKCS#11 error (cryptoki's Display quotes the whole spec text).
pub fn short(e: &Error) -> String {
    match e {
        Error::Pkcs11(rv, f) => format!("{f}: {rv:?}"),
        other => other.to_string(),
    }
}
