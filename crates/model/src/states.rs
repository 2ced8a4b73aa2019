//! The states of keys, custom key stores, clusters and HSMs, and AWS's key-state table.
//!
//! Each state is an enum, parsed once where it enters (the config file, the metadata
//! database) and spelled as AWS spells it where it leaves (`as_str`). The key-state table
//! (`KeyState::check`) is the one place that says which operation a key's state allows and
//! which exception refuses the others; the metadata database is told the states to accept
//! (`KeyState::accepted_by`) and does not know the rules.

use serde::{Deserialize, Serialize};

use crate::error::{ErrorKind, KmsError};
use crate::op::Op;

/// Declares a string-spelled enum: `as_str` gives the spelling, `parse` reads it back.
macro_rules! spelled {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $variant,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            #[inline]
            pub const fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            pub fn parse(text: &str) -> Option<$name> {
                match text {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

spelled! {
    /// A key's state. `Creating` and `Deleting` are stored only: such a key is invisible to
    /// callers (it is being generated in, or destroyed from, the HSM). `Unavailable` is never
    /// stored: a caller sees it for a key whose custom key store is not connected
    /// (`KeyState::seen`).
    KeyState {
        Creating = "Creating",
        Enabled = "Enabled",
        Disabled = "Disabled",
        PendingDeletion = "PendingDeletion",
        Unavailable = "Unavailable",
        Deleting = "Deleting",
    }
}

spelled! {
    /// A custom key store's connection state (AWS ConnectionStateType).
    ConnectionState {
        Connected = "CONNECTED",
        Connecting = "CONNECTING",
        Disconnected = "DISCONNECTED",
        Disconnecting = "DISCONNECTING",
        Failed = "FAILED",
    }
}

spelled! {
    /// Why connecting a custom key store failed (the AWS ConnectionErrorCodeType values that
    /// a CloudHSM key store can have).
    ConnectionErrorCode {
        InvalidCredentials = "INVALID_CREDENTIALS",
        ClusterNotFound = "CLUSTER_NOT_FOUND",
        NetworkErrors = "NETWORK_ERRORS",
        InternalError = "INTERNAL_ERROR",
        InsufficientCloudHsmHsms = "INSUFFICIENT_CLOUDHSM_HSMS",
        UserLockedOut = "USER_LOCKED_OUT",
        UserNotFound = "USER_NOT_FOUND",
        UserLoggedIn = "USER_LOGGED_IN",
        SubnetNotFound = "SUBNET_NOT_FOUND",
        InsufficientFreeAddressesInSubnet = "INSUFFICIENT_FREE_ADDRESSES_IN_SUBNET",
    }
}

/// An AWS CloudHSM cluster's state, as the config file gives it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ClusterState {
    CreateInProgress,
    Uninitialized,
    InitializeInProgress,
    Initialized,
    #[default]
    Active,
    UpdateInProgress,
    ModifyInProgress,
    RollbackInProgress,
    DeleteInProgress,
    Deleted,
    Degraded,
}

/// An HSM's state in its cluster, as the config file gives it; only ACTIVE HSMs serve.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum HsmState {
    CreateInProgress,
    #[default]
    Active,
    Degraded,
    DeleteInProgress,
    Deleted,
}

impl std::fmt::Display for ClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The serde spelling is AWS's.
        f.write_str(
            serde_json::to_value(self)
                .ok()
                .as_ref()
                .and_then(|v| v.as_str())
                .unwrap_or("UNKNOWN"),
        )
    }
}

/// Why the key-state table refuses an operation: the footnotes of AWS's table
/// (aws-kms-guide/key-state.md) that apply to keys in a CloudHSM key store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// [1] `DisabledException: <key ARN> is disabled.` (each message in AWS's words)
    Disabled,
    /// [3] `KMSInvalidStateException: <key ARN> is pending deletion.`
    PendingDeletion,
    /// [4] `KMSInvalidStateException: <key ARN> is not pending deletion.`
    NotPendingDeletion,
    /// [11] `KMSInvalidStateException: <key ARN> is unavailable.`
    Unavailable,
}

impl Refusal {
    /// The footnote's number in AWS's table.
    pub fn footnote(self) -> u8 {
        match self {
            Refusal::Disabled => 1,
            Refusal::PendingDeletion => 3,
            Refusal::NotPendingDeletion => 4,
            Refusal::Unavailable => 11,
        }
    }

    /// The exception for the key `arn`, in AWS's words.
    pub fn error(self, arn: &str) -> KmsError {
        let (kind, what) = match self {
            Refusal::Disabled => (ErrorKind::Disabled, "is disabled"),
            Refusal::PendingDeletion => (ErrorKind::KmsInvalidState, "is pending deletion"),
            Refusal::NotPendingDeletion => (ErrorKind::KmsInvalidState, "is not pending deletion"),
            Refusal::Unavailable => (ErrorKind::KmsInvalidState, "is unavailable"),
        };
        KmsError::new(kind, format!("{arn} {what}."))
    }
}

/// One row of the table: the outcome for a key Enabled, Disabled, PendingDeletion and
/// Unavailable, in that order (`None` = allowed).
type Row = [Option<Refusal>; 4];

const ANY: Row = [None; 4];
/// A cryptographic operation: only an Enabled key of a connected store.
const CRYPTO: Row = [
    None,
    Some(Refusal::Disabled),
    Some(Refusal::PendingDeletion),
    Some(Refusal::Unavailable),
];
/// A change to a key that is not being deleted; a key of a disconnected store takes it
/// (AWS footnote [12]: it shows once the store reconnects).
const NOT_PENDING: Row = [None, None, Some(Refusal::PendingDeletion), None];

impl KeyState {
    /// The key-state table: whether `op` may act on a key in `self` (the state the caller
    /// sees), or which footnote refuses it. Operations that act on no existing key
    /// (CreateKey, ListKeys, the custom key store operations...) have no row and are allowed.
    #[inline]
    pub fn check(self, op: Op) -> Result<(), Refusal> {
        let column = match self {
            KeyState::Enabled => 0,
            KeyState::Disabled => 1,
            KeyState::PendingDeletion => 2,
            KeyState::Unavailable => 3,
            // Invisible keys are answered NotFound before any operation consults the table.
            KeyState::Creating | KeyState::Deleting => return Err(Refusal::Unavailable),
        };
        match row(op)[column] {
            None => Ok(()),
            Some(refusal) => Err(refusal),
        }
    }

    /// The stored states in which the metadata database may apply `op`'s change to a key.
    pub fn accepted_by(op: Op) -> StateSet {
        let mut set = StateSet::EMPTY;
        for s in [
            KeyState::Enabled,
            KeyState::Disabled,
            KeyState::PendingDeletion,
        ] {
            if s.check(op).is_ok() {
                set = set.with(s);
            }
        }
        set
    }

    /// The state a caller sees: a key of a store that is not CONNECTED is Unavailable, except
    /// that a key pending deletion stays PendingDeletion so that its deletion can be
    /// cancelled (AWS footnote [13]).
    #[inline]
    pub fn seen(self, store: ConnectionState) -> KeyState {
        if self == KeyState::PendingDeletion || store == ConnectionState::Connected {
            self
        } else {
            KeyState::Unavailable
        }
    }

    /// Whether callers can see a key in this stored state.
    #[inline]
    pub fn visible(self) -> bool {
        !matches!(self, KeyState::Creating | KeyState::Deleting)
    }
}

/// The row of `op`; an operation that acts on no existing key is allowed throughout.
#[inline]
fn row(op: Op) -> Row {
    use Refusal::*;
    match op {
        Op::DescribeKey
        | Op::ListResourceTags
        | Op::GetKeyPolicy
        | Op::ListKeyPolicies
        | Op::PutKeyPolicy
        | Op::DeleteAlias
        | Op::ListAliases
        | Op::ListGrants
        | Op::RetireGrant
        | Op::RevokeGrant => ANY,
        Op::EnableKey
        | Op::DisableKey
        | Op::UpdateKeyDescription
        | Op::ScheduleKeyDeletion
        | Op::TagResource
        | Op::UntagResource
        | Op::CreateAlias
        // [10]: a pending deletion target fails; the alias's current key does not matter.
        | Op::UpdateAlias => NOT_PENDING,
        Op::CancelKeyDeletion => [
            Some(NotPendingDeletion),
            Some(NotPendingDeletion),
            None,
            Some(NotPendingDeletion),
        ],
        // A grant can be created for a key of a disconnected store.
        Op::CreateGrant => [None, Some(Disabled), Some(PendingDeletion), None],
        Op::Encrypt
        | Op::Decrypt
        | Op::ReEncrypt
        | Op::GenerateDataKey
        | Op::GenerateDataKeyWithoutPlaintext
        | Op::XksEncrypt
        | Op::XksDecrypt => CRYPTO,
        Op::CreateCustomKeyStore
        | Op::DescribeCustomKeyStores
        | Op::UpdateCustomKeyStore
        | Op::DeleteCustomKeyStore
        | Op::ConnectCustomKeyStore
        | Op::DisconnectCustomKeyStore
        | Op::CreateKey
        | Op::ListKeys
        | Op::ListRetirableGrants
        | Op::GenerateRandom
        // Not on AWS's page: it reads what was recorded, whatever the key's state.
        | Op::GetKeyLastUsage
        // hsm-kms's own: they read what was recorded (a key's audit lines, whatever its
        // state), or name no key.
        | Op::ListKeyAuditEvents
        // Its keyStatus says the key's state (DISABLED unless Enabled).
        | Op::XksGetKeyMetadata
        | Op::XksGetHealthStatus
        | Op::GetCallerIdentity
        | Op::DescribeCustomKeyStoreHealth => ANY,
        // Refused for a key in a custom key store whatever its state ([7], [9]; the newer
        // rotation operations and DeriveSharedSecret have no row on AWS's page).
        Op::EnableKeyRotation
        | Op::DisableKeyRotation
        | Op::GetKeyRotationStatus
        | Op::RotateKeyOnDemand
        | Op::ListKeyRotations
        | Op::GetParametersForImport
        | Op::ImportKeyMaterial
        | Op::DeleteImportedKeyMaterial
        | Op::DeriveSharedSecret => ANY,
        // Their rows on AWS's page are the cryptographic operations' (N/A where a key of a
        // custom key store cannot be: Unavailable is answered as for Encrypt); the refusal
        // of the operation itself follows the key state's.
        Op::GenerateDataKeyPair
        | Op::GenerateDataKeyPairWithoutPlaintext
        | Op::Sign
        | Op::Verify
        | Op::GetPublicKey
        | Op::GenerateMac
        | Op::VerifyMac
        | Op::ReplicateKey
        | Op::UpdatePrimaryRegion => CRYPTO,
    }
}

/// A set of key states, for telling the metadata database which states a change accepts.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StateSet(u8);

impl StateSet {
    pub const EMPTY: StateSet = StateSet(0);

    #[inline]
    fn bit(s: KeyState) -> u8 {
        1 << (s as u8)
    }

    pub const fn of(states: &[KeyState]) -> StateSet {
        let mut bits = 0;
        let mut i = 0;
        while i < states.len() {
            bits |= 1 << (states[i] as u8);
            i += 1;
        }
        StateSet(bits)
    }

    #[inline]
    pub fn with(self, s: KeyState) -> StateSet {
        StateSet(self.0 | Self::bit(s))
    }

    #[inline]
    pub fn contains(self, s: KeyState) -> bool {
        self.0 & Self::bit(s) != 0
    }

    pub fn iter(self) -> impl Iterator<Item = KeyState> {
        KeyState::ALL
            .iter()
            .copied()
            .filter(move |s| self.contains(*s))
    }
}

impl std::fmt::Debug for StateSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AWS's key-state table (aws-kms-guide/key-state.md), transcribed for the operations
    /// hsm-kms serves and the states its keys can be in: Enabled, Disabled,
    /// PendingDeletion, Unavailable. `ok`, or the footnote that refuses. Where AWS gives a
    /// choice ("[2] or [3]") the cell says which one hsm-kms answers; footnote [12] (the
    /// change shows once the key is available again) is an `ok`, and UpdateAlias's [10] (a
    /// pending-deletion target fails with KMSInvalidStateException) is an `X3`.
    const GUIDE: &str = "
        CancelKeyDeletion               X4  X4  ok  X4
        CreateAlias                     ok  ok  X3  ok
        CreateGrant                     ok  X1  X3  ok
        Decrypt                         ok  X1  X3  X11
        DeleteAlias                     ok  ok  ok  ok
        DescribeKey                     ok  ok  ok  ok
        DisableKey                      ok  ok  X3  ok
        EnableKey                       ok  ok  X3  ok
        Encrypt                         ok  X1  X3  X11
        GenerateDataKey                 ok  X1  X3  X11
        GenerateDataKeyWithoutPlaintext ok  X1  X3  X11
        GenerateDataKeyPair             ok  X1  X3  X11
        GenerateDataKeyPairWithoutPlaintext ok X1 X3 X11
        GenerateMac                     ok  X1  X3  X11
        GetPublicKey                    ok  X1  X3  X11
        ReplicateKey                    ok  X1  X3  X11
        Sign                            ok  X1  X3  X11
        UpdatePrimaryRegion             ok  X1  X3  X11
        Verify                          ok  X1  X3  X11
        VerifyMac                       ok  X1  X3  X11
        GetKeyPolicy                    ok  ok  ok  ok
        ListAliases                     ok  ok  ok  ok
        ListGrants                      ok  ok  ok  ok
        ListKeyPolicies                 ok  ok  ok  ok
        ListResourceTags                ok  ok  ok  ok
        PutKeyPolicy                    ok  ok  ok  ok
        ReEncrypt                       ok  X1  X3  X11
        RetireGrant                     ok  ok  ok  ok
        RevokeGrant                     ok  ok  ok  ok
        ScheduleKeyDeletion             ok  ok  X3  ok
        TagResource                     ok  ok  X3  ok
        UntagResource                   ok  ok  X3  ok
        UpdateAlias                     ok  ok  X3  ok
        UpdateKeyDescription            ok  ok  X3  ok
    ";

    const COLUMNS: [KeyState; 4] = [
        KeyState::Enabled,
        KeyState::Disabled,
        KeyState::PendingDeletion,
        KeyState::Unavailable,
    ];

    fn guide() -> Vec<(Op, [String; 4])> {
        GUIDE
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                let cells: Vec<&str> = l.split_whitespace().collect();
                let op = Op::parse(cells[0]).unwrap_or_else(|| panic!("{} is no Op", cells[0]));
                (op, std::array::from_fn(|i| cells[i + 1].to_string()))
            })
            .collect()
    }

    #[test]
    fn every_row_of_the_guide_matches_the_table() {
        for (op, cells) in guide() {
            for (state, want) in COLUMNS.iter().zip(&cells) {
                let got = match state.check(op) {
                    Ok(()) => "ok".to_string(),
                    Err(r) => format!("X{}", r.footnote()),
                };
                assert_eq!(&got, want, "{op:?} on a key {state}");
            }
        }
    }

    #[test]
    fn every_operation_on_an_existing_key_has_a_row_in_the_guide() {
        let rows: Vec<Op> = guide().into_iter().map(|(op, _)| op).collect();
        for op in Op::ALL {
            // The XKS proxy API's cryptography follows AWS's row of Encrypt and Decrypt.
            if matches!(op, Op::XksEncrypt | Op::XksDecrypt) {
                for s in COLUMNS {
                    assert_eq!(
                        s.check(op).is_ok(),
                        s.check(Op::Encrypt).is_ok(),
                        "{op:?} {s:?}"
                    );
                }
                continue;
            }
            // The operations that name no existing key are allowed in every state.
            if !rows.contains(&op) {
                assert!(
                    COLUMNS.iter().all(|s| s.check(op).is_ok()),
                    "{op:?} refuses a key state but is not in the transcribed table"
                );
            }
        }
    }

    /// The transcription above is checked against the guide page itself when the page is
    /// at hand (a checkout beside ../shared).
    #[test]
    fn the_transcription_matches_the_guide_page() {
        let page = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/reference/aws-kms-guide/key-state.md");
        let Ok(text) = std::fs::read_to_string(&page) else {
            // Beside ../shared (CI's checkout) the check must run.
            assert!(
                std::env::var_os("CI").is_none(),
                "{} is not here, and CI needs it",
                page.display()
            );
            eprintln!("{} is not here; skipped", page.display());
            return;
        };
        for (op, cells) in guide() {
            let line = text
                .lines()
                .find(|l| l.starts_with(&format!("| {} |", op.name())))
                .unwrap_or_else(|| panic!("no row for {op:?}"));
            // Columns of the page: Enabled, Disabled, PendingDeletion, PendingImport,
            // Unavailable, ...
            let page_cells: Vec<&str> = line.trim_matches('|').split('|').skip(1).collect();
            for (want, page_cell) in cells.iter().zip([0, 1, 2, 4].map(|i| page_cells[i])) {
                let ok_on_page = page_cell.contains("icon-successful")
                    || page_cell.contains("[12]")
                    || page_cell.contains("\\[12\\]");
                // N/A: a key that cannot be in this state elsewhere in AWS (an asymmetric
                // key is never Unavailable); a key of a custom key store can, and is
                // answered as the cryptographic operations answer.
                if page_cell.trim() == "N/A" {
                    assert_eq!(want, "X11", "{op:?}: N/A on the page");
                    continue;
                }
                if want == "ok" {
                    assert!(ok_on_page, "{op:?}: the page says {page_cell}");
                } else {
                    let note = format!("\\[{}\\]", &want[1..]);
                    // [10] (UpdateAlias) fails a pending-deletion target with [3]'s words.
                    let same_as_3 = want == "X3" && page_cell.contains("\\[10\\]");
                    assert!(
                        page_cell.contains(&note) || same_as_3,
                        "{op:?}: the page says {page_cell}, not {note}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_database_is_told_the_stored_states_of_the_row() {
        let set = KeyState::accepted_by(Op::EnableKey);
        assert!(set.contains(KeyState::Enabled) && set.contains(KeyState::Disabled));
        assert!(!set.contains(KeyState::PendingDeletion));
        let set = KeyState::accepted_by(Op::CancelKeyDeletion);
        assert_eq!(set.iter().collect::<Vec<_>>(), [KeyState::PendingDeletion]);
        assert!(!KeyState::accepted_by(Op::CreateGrant).contains(KeyState::Disabled));
    }

    #[test]
    fn states_read_back_as_written() {
        for s in KeyState::ALL {
            assert_eq!(KeyState::parse(s.as_str()), Some(*s));
        }
        for s in ConnectionState::ALL {
            assert_eq!(ConnectionState::parse(s.as_str()), Some(*s));
        }
        for s in ConnectionErrorCode::ALL {
            assert_eq!(ConnectionErrorCode::parse(s.as_str()), Some(*s));
        }
        assert_eq!(KeyState::parse("enabled"), None);
        assert_eq!(ClusterState::Active.to_string(), "ACTIVE");
        assert_eq!(
            ClusterState::UpdateInProgress.to_string(),
            "UPDATE_IN_PROGRESS"
        );
    }

    #[test]
    fn keys_of_a_disconnected_store_are_unavailable_unless_pending_deletion() {
        use ConnectionState::*;
        assert_eq!(KeyState::Enabled.seen(Connected), KeyState::Enabled);
        assert_eq!(KeyState::Disabled.seen(Failed), KeyState::Unavailable);
        assert_eq!(
            KeyState::PendingDeletion.seen(Disconnected),
            KeyState::PendingDeletion
        );
    }
}
