//! The KMS operations: one value per operation, and what each one is. An operation's name is
//! written here once; its IAM action, whether a grant can allow it, whether it is
//! cryptographic (the quota and the key-state table's column) and what the audit trail
//! records of it all follow from exhaustive matches, so a new operation cannot be added
//! without deciding each.

/// A KMS operation, named as AWS names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    CreateCustomKeyStore,
    DescribeCustomKeyStores,
    UpdateCustomKeyStore,
    DeleteCustomKeyStore,
    ConnectCustomKeyStore,
    DisconnectCustomKeyStore,
    CreateKey,
    DescribeKey,
    ListKeys,
    ListResourceTags,
    EnableKey,
    DisableKey,
    UpdateKeyDescription,
    ScheduleKeyDeletion,
    CancelKeyDeletion,
    TagResource,
    UntagResource,
    CreateAlias,
    UpdateAlias,
    DeleteAlias,
    ListAliases,
    CreateGrant,
    ListGrants,
    ListRetirableGrants,
    RetireGrant,
    RevokeGrant,
    PutKeyPolicy,
    GetKeyPolicy,
    ListKeyPolicies,
    Encrypt,
    Decrypt,
    ReEncrypt,
    GenerateDataKey,
    GenerateDataKeyWithoutPlaintext,
    GenerateRandom,
    GetKeyLastUsage,
    // hsm-kms's own operations for operators (the console's identity, store health and key
    // audit views): served on both fronts, on the AWS front under the target prefix
    // `HsmKms.` rather than AWS's `TrentService.` (`Op::extension`).
    GetCallerIdentity,
    DescribeCustomKeyStoreHealth,
    ListKeyAuditEvents,
    // The external key store (XKS) proxy API, which AWS KMS calls (api/xks): served on the
    // XKS listener only (`Op::xks`).
    XksGetHealthStatus,
    XksGetKeyMetadata,
    XksEncrypt,
    XksDecrypt,
    // The operations of the AWS KMS API that a key in a CloudHSM key store cannot do. They
    // are routed, authorized on their key and checked against the key-state table like any
    // other, then answered as AWS answers for such a key (`Op::unserved`).
    EnableKeyRotation,
    DisableKeyRotation,
    GetKeyRotationStatus,
    RotateKeyOnDemand,
    ListKeyRotations,
    GenerateDataKeyPair,
    GenerateDataKeyPairWithoutPlaintext,
    Sign,
    Verify,
    GetPublicKey,
    GenerateMac,
    VerifyMac,
    DeriveSharedSecret,
    GetParametersForImport,
    ImportKeyMaterial,
    DeleteImportedKeyMaterial,
    ReplicateKey,
    UpdatePrimaryRegion,
}

/// What an operation is authorized against, as AWS KMS authorizes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The account: the caller's identity policies alone, on resource `*`.
    Account,
    /// A custom key store (or, for GenerateRandom, the store it names): identity policies
    /// alone; the store id is recorded.
    KeyStore,
    /// The key the request names, or the key of its ciphertext: the key policy, the
    /// caller's identity policies where the key policy delegates to its account, and the
    /// caller's grants if `grant_operations` names any.
    Key,
    /// An alias: its alias ARN by identity policies, and each key involved by the key's
    /// policy.
    Alias,
    /// A grant's own principals: RetireGrant is for the grant's retiring principal, its
    /// grantee when the grant includes RetireGrant, and the key's account.
    Grant,
    /// The caller itself: nothing to decide (GetCallerIdentity, as STS answers any caller).
    Caller,
}

/// What the audit line of an operation records besides who, what and the outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorded {
    /// The request's encryption context (the destination's, for ReEncrypt).
    EncryptionContext,
    /// Nothing more: the resources the operation touched are noted as it runs.
    Resources,
    /// The requestMetadata AWS KMS sent with an XKS proxy request (who called AWS KMS, for
    /// which key and operation, its request id).
    RequestMetadata,
}

impl Op {
    /// Every operation, in the order of the API.
    pub const ALL: [Op; 61] = [
        Op::CreateCustomKeyStore,
        Op::DescribeCustomKeyStores,
        Op::UpdateCustomKeyStore,
        Op::DeleteCustomKeyStore,
        Op::ConnectCustomKeyStore,
        Op::DisconnectCustomKeyStore,
        Op::CreateKey,
        Op::DescribeKey,
        Op::ListKeys,
        Op::ListResourceTags,
        Op::EnableKey,
        Op::DisableKey,
        Op::UpdateKeyDescription,
        Op::ScheduleKeyDeletion,
        Op::CancelKeyDeletion,
        Op::TagResource,
        Op::UntagResource,
        Op::CreateAlias,
        Op::UpdateAlias,
        Op::DeleteAlias,
        Op::ListAliases,
        Op::CreateGrant,
        Op::ListGrants,
        Op::ListRetirableGrants,
        Op::RetireGrant,
        Op::RevokeGrant,
        Op::PutKeyPolicy,
        Op::GetKeyPolicy,
        Op::ListKeyPolicies,
        Op::Encrypt,
        Op::Decrypt,
        Op::ReEncrypt,
        Op::GenerateDataKey,
        Op::GenerateDataKeyWithoutPlaintext,
        Op::GenerateRandom,
        Op::GetKeyLastUsage,
        Op::GetCallerIdentity,
        Op::DescribeCustomKeyStoreHealth,
        Op::ListKeyAuditEvents,
        Op::XksGetHealthStatus,
        Op::XksGetKeyMetadata,
        Op::XksEncrypt,
        Op::XksDecrypt,
        Op::EnableKeyRotation,
        Op::DisableKeyRotation,
        Op::GetKeyRotationStatus,
        Op::RotateKeyOnDemand,
        Op::ListKeyRotations,
        Op::GenerateDataKeyPair,
        Op::GenerateDataKeyPairWithoutPlaintext,
        Op::Sign,
        Op::Verify,
        Op::GetPublicKey,
        Op::GenerateMac,
        Op::VerifyMac,
        Op::DeriveSharedSecret,
        Op::GetParametersForImport,
        Op::ImportKeyMaterial,
        Op::DeleteImportedKeyMaterial,
        Op::ReplicateKey,
        Op::UpdatePrimaryRegion,
    ];

    /// The operations hsm-kms serves (over gRPC and the AWS protocol); the others of `ALL`
    /// are refused as AWS refuses them for a key in a CloudHSM key store.
    pub fn served() -> impl Iterator<Item = Op> {
        Op::ALL
            .into_iter()
            .filter(|op| op.unserved().is_none() && !op.xks())
    }

    /// The AWS operation name (also the gRPC method name).
    #[inline]
    pub fn name(self) -> &'static str {
        match self {
            Op::CreateCustomKeyStore => "CreateCustomKeyStore",
            Op::DescribeCustomKeyStores => "DescribeCustomKeyStores",
            Op::UpdateCustomKeyStore => "UpdateCustomKeyStore",
            Op::DeleteCustomKeyStore => "DeleteCustomKeyStore",
            Op::ConnectCustomKeyStore => "ConnectCustomKeyStore",
            Op::DisconnectCustomKeyStore => "DisconnectCustomKeyStore",
            Op::CreateKey => "CreateKey",
            Op::DescribeKey => "DescribeKey",
            Op::ListKeys => "ListKeys",
            Op::ListResourceTags => "ListResourceTags",
            Op::EnableKey => "EnableKey",
            Op::DisableKey => "DisableKey",
            Op::UpdateKeyDescription => "UpdateKeyDescription",
            Op::ScheduleKeyDeletion => "ScheduleKeyDeletion",
            Op::CancelKeyDeletion => "CancelKeyDeletion",
            Op::TagResource => "TagResource",
            Op::UntagResource => "UntagResource",
            Op::CreateAlias => "CreateAlias",
            Op::UpdateAlias => "UpdateAlias",
            Op::DeleteAlias => "DeleteAlias",
            Op::ListAliases => "ListAliases",
            Op::CreateGrant => "CreateGrant",
            Op::ListGrants => "ListGrants",
            Op::ListRetirableGrants => "ListRetirableGrants",
            Op::RetireGrant => "RetireGrant",
            Op::RevokeGrant => "RevokeGrant",
            Op::PutKeyPolicy => "PutKeyPolicy",
            Op::GetKeyPolicy => "GetKeyPolicy",
            Op::ListKeyPolicies => "ListKeyPolicies",
            Op::Encrypt => "Encrypt",
            Op::Decrypt => "Decrypt",
            Op::ReEncrypt => "ReEncrypt",
            Op::GenerateDataKey => "GenerateDataKey",
            Op::GenerateDataKeyWithoutPlaintext => "GenerateDataKeyWithoutPlaintext",
            Op::GenerateRandom => "GenerateRandom",
            Op::GetKeyLastUsage => "GetKeyLastUsage",
            Op::GetCallerIdentity => "GetCallerIdentity",
            Op::DescribeCustomKeyStoreHealth => "DescribeCustomKeyStoreHealth",
            Op::ListKeyAuditEvents => "ListKeyAuditEvents",
            Op::XksGetHealthStatus => "XksGetHealthStatus",
            Op::XksGetKeyMetadata => "XksGetKeyMetadata",
            Op::XksEncrypt => "XksEncrypt",
            Op::XksDecrypt => "XksDecrypt",
            Op::EnableKeyRotation => "EnableKeyRotation",
            Op::DisableKeyRotation => "DisableKeyRotation",
            Op::GetKeyRotationStatus => "GetKeyRotationStatus",
            Op::RotateKeyOnDemand => "RotateKeyOnDemand",
            Op::ListKeyRotations => "ListKeyRotations",
            Op::GenerateDataKeyPair => "GenerateDataKeyPair",
            Op::GenerateDataKeyPairWithoutPlaintext => "GenerateDataKeyPairWithoutPlaintext",
            Op::Sign => "Sign",
            Op::Verify => "Verify",
            Op::GetPublicKey => "GetPublicKey",
            Op::GenerateMac => "GenerateMac",
            Op::VerifyMac => "VerifyMac",
            Op::DeriveSharedSecret => "DeriveSharedSecret",
            Op::GetParametersForImport => "GetParametersForImport",
            Op::ImportKeyMaterial => "ImportKeyMaterial",
            Op::DeleteImportedKeyMaterial => "DeleteImportedKeyMaterial",
            Op::ReplicateKey => "ReplicateKey",
            Op::UpdatePrimaryRegion => "UpdatePrimaryRegion",
        }
    }

    /// The operation of a name.
    pub fn parse(name: &str) -> Option<Op> {
        Op::ALL.into_iter().find(|op| op.name() == name)
    }

    /// Whether it is an operation of the XKS proxy API (served on the XKS listener only).
    #[inline]
    pub fn xks(self) -> bool {
        matches!(
            self,
            Op::XksGetHealthStatus | Op::XksGetKeyMetadata | Op::XksEncrypt | Op::XksDecrypt
        )
    }

    /// Whether it is one of hsm-kms's own operations rather than one of the AWS KMS API's.
    #[inline]
    pub fn extension(self) -> bool {
        matches!(
            self,
            Op::GetCallerIdentity | Op::DescribeCustomKeyStoreHealth | Op::ListKeyAuditEvents
        )
    }

    /// The IAM actions the caller needs: `kms:<Name>`, but ReEncrypt needs ReEncryptFrom on
    /// the source key and ReEncryptTo on the destination key (AWS's rule).
    #[inline]
    pub fn actions(self) -> &'static [&'static str] {
        match self {
            Op::ReEncrypt => &["kms:ReEncryptFrom", "kms:ReEncryptTo"],
            Op::CreateCustomKeyStore => &["kms:CreateCustomKeyStore"],
            Op::DescribeCustomKeyStores => &["kms:DescribeCustomKeyStores"],
            Op::UpdateCustomKeyStore => &["kms:UpdateCustomKeyStore"],
            Op::DeleteCustomKeyStore => &["kms:DeleteCustomKeyStore"],
            Op::ConnectCustomKeyStore => &["kms:ConnectCustomKeyStore"],
            Op::DisconnectCustomKeyStore => &["kms:DisconnectCustomKeyStore"],
            Op::CreateKey => &["kms:CreateKey"],
            Op::DescribeKey => &["kms:DescribeKey"],
            Op::ListKeys => &["kms:ListKeys"],
            Op::ListResourceTags => &["kms:ListResourceTags"],
            Op::EnableKey => &["kms:EnableKey"],
            Op::DisableKey => &["kms:DisableKey"],
            Op::UpdateKeyDescription => &["kms:UpdateKeyDescription"],
            Op::ScheduleKeyDeletion => &["kms:ScheduleKeyDeletion"],
            Op::CancelKeyDeletion => &["kms:CancelKeyDeletion"],
            Op::TagResource => &["kms:TagResource"],
            Op::UntagResource => &["kms:UntagResource"],
            Op::CreateAlias => &["kms:CreateAlias"],
            Op::UpdateAlias => &["kms:UpdateAlias"],
            Op::DeleteAlias => &["kms:DeleteAlias"],
            Op::ListAliases => &["kms:ListAliases"],
            Op::CreateGrant => &["kms:CreateGrant"],
            Op::ListGrants => &["kms:ListGrants"],
            Op::ListRetirableGrants => &["kms:ListRetirableGrants"],
            Op::RetireGrant => &["kms:RetireGrant"],
            Op::RevokeGrant => &["kms:RevokeGrant"],
            Op::PutKeyPolicy => &["kms:PutKeyPolicy"],
            Op::GetKeyPolicy => &["kms:GetKeyPolicy"],
            Op::ListKeyPolicies => &["kms:ListKeyPolicies"],
            Op::Encrypt => &["kms:Encrypt"],
            Op::Decrypt => &["kms:Decrypt"],
            Op::GenerateDataKey => &["kms:GenerateDataKey"],
            Op::GenerateDataKeyWithoutPlaintext => &["kms:GenerateDataKeyWithoutPlaintext"],
            Op::GenerateRandom => &["kms:GenerateRandom"],
            Op::GetKeyLastUsage => &["kms:GetKeyLastUsage"],
            // Needs no permission (Scope::Caller), as STS's GetCallerIdentity needs none.
            Op::GetCallerIdentity => &["kms:GetCallerIdentity"],
            Op::DescribeCustomKeyStoreHealth => &["kms:DescribeCustomKeyStoreHealth"],
            Op::ListKeyAuditEvents => &["kms:ListKeyAuditEvents"],
            // AWS KMS asks for its keys as the caller of the XKS credential: the same
            // permissions as the AWS KMS operations they serve.
            Op::XksGetHealthStatus => &["kms:XksGetHealthStatus"],
            Op::XksGetKeyMetadata => &["kms:DescribeKey"],
            Op::XksEncrypt => &["kms:Encrypt"],
            Op::XksDecrypt => &["kms:Decrypt"],
            Op::EnableKeyRotation => &["kms:EnableKeyRotation"],
            Op::DisableKeyRotation => &["kms:DisableKeyRotation"],
            Op::GetKeyRotationStatus => &["kms:GetKeyRotationStatus"],
            Op::RotateKeyOnDemand => &["kms:RotateKeyOnDemand"],
            Op::ListKeyRotations => &["kms:ListKeyRotations"],
            Op::GenerateDataKeyPair => &["kms:GenerateDataKeyPair"],
            Op::GenerateDataKeyPairWithoutPlaintext => &["kms:GenerateDataKeyPairWithoutPlaintext"],
            Op::Sign => &["kms:Sign"],
            Op::Verify => &["kms:Verify"],
            Op::GetPublicKey => &["kms:GetPublicKey"],
            Op::GenerateMac => &["kms:GenerateMac"],
            Op::VerifyMac => &["kms:VerifyMac"],
            Op::DeriveSharedSecret => &["kms:DeriveSharedSecret"],
            Op::GetParametersForImport => &["kms:GetParametersForImport"],
            Op::ImportKeyMaterial => &["kms:ImportKeyMaterial"],
            Op::DeleteImportedKeyMaterial => &["kms:DeleteImportedKeyMaterial"],
            Op::ReplicateKey => &["kms:ReplicateKey"],
            Op::UpdatePrimaryRegion => &["kms:UpdatePrimaryRegion"],
        }
    }

    /// What the operation is authorized against. Every operation declares one, and the
    /// test of every operation against a caller without permission (tests/authorization.rs)
    /// drives each.
    #[inline]
    pub fn scope(self) -> Scope {
        match self {
            Op::CreateKey | Op::ListKeys | Op::ListAliases | Op::ListRetirableGrants => {
                Scope::Account
            }
            Op::CreateCustomKeyStore
            | Op::DescribeCustomKeyStores
            | Op::UpdateCustomKeyStore
            | Op::DeleteCustomKeyStore
            | Op::ConnectCustomKeyStore
            | Op::DisconnectCustomKeyStore
            | Op::GenerateRandom => Scope::KeyStore,
            Op::DescribeKey
            | Op::ListResourceTags
            | Op::EnableKey
            | Op::DisableKey
            | Op::UpdateKeyDescription
            | Op::ScheduleKeyDeletion
            | Op::CancelKeyDeletion
            | Op::TagResource
            | Op::UntagResource
            | Op::CreateGrant
            | Op::ListGrants
            | Op::RevokeGrant
            | Op::PutKeyPolicy
            | Op::GetKeyPolicy
            | Op::ListKeyPolicies
            | Op::Encrypt
            | Op::Decrypt
            | Op::ReEncrypt
            | Op::GenerateDataKey
            | Op::GenerateDataKeyWithoutPlaintext
            | Op::GetKeyLastUsage
            | Op::ListKeyAuditEvents
            | Op::XksGetKeyMetadata
            | Op::XksEncrypt
            | Op::XksDecrypt => Scope::Key,
            // The spec excludes the health check from authorization: a valid credential.
            Op::XksGetHealthStatus => Scope::Caller,
            Op::DescribeCustomKeyStoreHealth => Scope::KeyStore,
            Op::GetCallerIdentity => Scope::Caller,
            Op::EnableKeyRotation
            | Op::DisableKeyRotation
            | Op::GetKeyRotationStatus
            | Op::RotateKeyOnDemand
            | Op::ListKeyRotations
            | Op::GenerateDataKeyPair
            | Op::GenerateDataKeyPairWithoutPlaintext
            | Op::Sign
            | Op::Verify
            | Op::GetPublicKey
            | Op::GenerateMac
            | Op::VerifyMac
            | Op::DeriveSharedSecret
            | Op::GetParametersForImport
            | Op::ImportKeyMaterial
            | Op::DeleteImportedKeyMaterial
            | Op::ReplicateKey
            | Op::UpdatePrimaryRegion => Scope::Key,
            Op::CreateAlias | Op::UpdateAlias | Op::DeleteAlias => Scope::Alias,
            Op::RetireGrant => Scope::Grant,
        }
    }

    /// The IAM action of an operation with one.
    #[inline]
    pub fn action(self) -> &'static str {
        self.actions()[0]
    }

    /// The grant operations that allow it, as CreateGrant's Operations name them (AWS's
    /// grant operations of a symmetric encryption key); empty when no grant can.
    #[inline]
    pub fn grant_operations(self) -> &'static [&'static str] {
        match self {
            Op::Encrypt | Op::XksEncrypt => &["Encrypt"],
            Op::Decrypt | Op::XksDecrypt => &["Decrypt"],
            Op::ReEncrypt => &["ReEncryptFrom", "ReEncryptTo"],
            Op::GenerateDataKey => &["GenerateDataKey"],
            Op::GenerateDataKeyWithoutPlaintext => &["GenerateDataKeyWithoutPlaintext"],
            Op::CreateGrant => &["CreateGrant"],
            Op::RetireGrant => &["RetireGrant"],
            Op::DescribeKey | Op::XksGetKeyMetadata => &["DescribeKey"],
            Op::CreateCustomKeyStore
            | Op::DescribeCustomKeyStores
            | Op::UpdateCustomKeyStore
            | Op::DeleteCustomKeyStore
            | Op::ConnectCustomKeyStore
            | Op::DisconnectCustomKeyStore
            | Op::CreateKey
            | Op::ListKeys
            | Op::ListResourceTags
            | Op::EnableKey
            | Op::DisableKey
            | Op::UpdateKeyDescription
            | Op::ScheduleKeyDeletion
            | Op::CancelKeyDeletion
            | Op::TagResource
            | Op::UntagResource
            | Op::CreateAlias
            | Op::UpdateAlias
            | Op::DeleteAlias
            | Op::ListAliases
            | Op::ListGrants
            | Op::ListRetirableGrants
            | Op::RevokeGrant
            | Op::PutKeyPolicy
            | Op::GetKeyPolicy
            | Op::ListKeyPolicies
            | Op::GenerateRandom
            | Op::GetKeyLastUsage
            | Op::GetCallerIdentity
            | Op::DescribeCustomKeyStoreHealth
            | Op::ListKeyAuditEvents
            | Op::XksGetHealthStatus => &[],
            // Grants on a symmetric encryption key cannot include them (grants.rs).
            Op::EnableKeyRotation
            | Op::DisableKeyRotation
            | Op::GetKeyRotationStatus
            | Op::RotateKeyOnDemand
            | Op::ListKeyRotations
            | Op::GenerateDataKeyPair
            | Op::GenerateDataKeyPairWithoutPlaintext
            | Op::Sign
            | Op::Verify
            | Op::GetPublicKey
            | Op::GenerateMac
            | Op::VerifyMac
            | Op::DeriveSharedSecret
            | Op::GetParametersForImport
            | Op::ImportKeyMaterial
            | Op::DeleteImportedKeyMaterial
            | Op::ReplicateKey
            | Op::UpdatePrimaryRegion => &[],
        }
    }

    /// Whether it is a cryptographic operation: it uses key material in the HSM, counts
    /// against the store's request quota, and follows the "cryptographic operations" column
    /// of AWS's key-state table.
    #[inline]
    pub fn cryptographic(self) -> bool {
        match self {
            Op::Encrypt
            | Op::Decrypt
            | Op::ReEncrypt
            | Op::GenerateDataKey
            | Op::GenerateDataKeyWithoutPlaintext
            | Op::XksEncrypt
            | Op::XksDecrypt => true,
            // GenerateRandom uses the HSM but no key.
            Op::GenerateRandom
            | Op::CreateCustomKeyStore
            | Op::DescribeCustomKeyStores
            | Op::UpdateCustomKeyStore
            | Op::DeleteCustomKeyStore
            | Op::ConnectCustomKeyStore
            | Op::DisconnectCustomKeyStore
            | Op::CreateKey
            | Op::DescribeKey
            | Op::ListKeys
            | Op::ListResourceTags
            | Op::EnableKey
            | Op::DisableKey
            | Op::UpdateKeyDescription
            | Op::ScheduleKeyDeletion
            | Op::CancelKeyDeletion
            | Op::TagResource
            | Op::UntagResource
            | Op::CreateAlias
            | Op::UpdateAlias
            | Op::DeleteAlias
            | Op::ListAliases
            | Op::CreateGrant
            | Op::ListGrants
            | Op::ListRetirableGrants
            | Op::RetireGrant
            | Op::RevokeGrant
            | Op::PutKeyPolicy
            | Op::GetKeyPolicy
            | Op::ListKeyPolicies
            | Op::GetKeyLastUsage
            | Op::GetCallerIdentity
            | Op::DescribeCustomKeyStoreHealth
            | Op::ListKeyAuditEvents
            | Op::XksGetHealthStatus
            | Op::XksGetKeyMetadata => false,
            // Refused before any key material is used.
            Op::EnableKeyRotation
            | Op::DisableKeyRotation
            | Op::GetKeyRotationStatus
            | Op::RotateKeyOnDemand
            | Op::ListKeyRotations
            | Op::GenerateDataKeyPair
            | Op::GenerateDataKeyPairWithoutPlaintext
            | Op::Sign
            | Op::Verify
            | Op::GetPublicKey
            | Op::GenerateMac
            | Op::VerifyMac
            | Op::DeriveSharedSecret
            | Op::GetParametersForImport
            | Op::ImportKeyMaterial
            | Op::DeleteImportedKeyMaterial
            | Op::ReplicateKey
            | Op::UpdatePrimaryRegion => false,
        }
    }

    /// Whether it changes what the service holds (a store, a key, its state, tags, aliases,
    /// grants or policy). Such a request has an `intent` audit line written before it runs,
    /// so that a change made by a replica that dies before its outcome line is still in the
    /// trail.
    #[inline]
    pub fn changes_state(self) -> bool {
        match self {
            Op::CreateCustomKeyStore
            | Op::UpdateCustomKeyStore
            | Op::DeleteCustomKeyStore
            | Op::ConnectCustomKeyStore
            | Op::DisconnectCustomKeyStore
            | Op::CreateKey
            | Op::EnableKey
            | Op::DisableKey
            | Op::UpdateKeyDescription
            | Op::ScheduleKeyDeletion
            | Op::CancelKeyDeletion
            | Op::TagResource
            | Op::UntagResource
            | Op::CreateAlias
            | Op::UpdateAlias
            | Op::DeleteAlias
            | Op::CreateGrant
            | Op::RetireGrant
            | Op::RevokeGrant
            | Op::PutKeyPolicy => true,
            Op::DescribeCustomKeyStores
            | Op::DescribeKey
            | Op::ListKeys
            | Op::ListResourceTags
            | Op::ListAliases
            | Op::ListGrants
            | Op::ListRetirableGrants
            | Op::GetKeyPolicy
            | Op::ListKeyPolicies
            | Op::Encrypt
            | Op::Decrypt
            | Op::ReEncrypt
            | Op::GenerateDataKey
            | Op::GenerateDataKeyWithoutPlaintext
            | Op::GenerateRandom
            | Op::GetKeyLastUsage
            | Op::GetCallerIdentity
            | Op::DescribeCustomKeyStoreHealth
            | Op::ListKeyAuditEvents
            | Op::XksGetHealthStatus
            | Op::XksGetKeyMetadata
            | Op::XksEncrypt
            | Op::XksDecrypt => false,
            // Refused: they change nothing.
            Op::EnableKeyRotation
            | Op::DisableKeyRotation
            | Op::GetKeyRotationStatus
            | Op::RotateKeyOnDemand
            | Op::ListKeyRotations
            | Op::GenerateDataKeyPair
            | Op::GenerateDataKeyPairWithoutPlaintext
            | Op::Sign
            | Op::Verify
            | Op::GetPublicKey
            | Op::GenerateMac
            | Op::VerifyMac
            | Op::DeriveSharedSecret
            | Op::GetParametersForImport
            | Op::ImportKeyMaterial
            | Op::DeleteImportedKeyMaterial
            | Op::ReplicateKey
            | Op::UpdatePrimaryRegion => false,
        }
    }

    /// Whether a successful call can take access away (a key disabled or scheduled for
    /// deletion, a grant gone, a policy replaced, a store disconnected or deleted): its
    /// answer waits until every live replica has it in force (`Metadata::revocation_fence`).
    /// Changes that give access may be seen by other replicas a moment later.
    #[inline]
    pub fn revokes_access(self) -> bool {
        match self {
            Op::DisableKey
            | Op::ScheduleKeyDeletion
            | Op::RevokeGrant
            | Op::RetireGrant
            | Op::PutKeyPolicy
            | Op::DisconnectCustomKeyStore
            | Op::DeleteCustomKeyStore => true,
            Op::CreateCustomKeyStore
            | Op::DescribeCustomKeyStores
            | Op::UpdateCustomKeyStore
            | Op::ConnectCustomKeyStore
            | Op::CreateKey
            | Op::DescribeKey
            | Op::ListKeys
            | Op::ListResourceTags
            | Op::EnableKey
            | Op::UpdateKeyDescription
            | Op::CancelKeyDeletion
            | Op::TagResource
            | Op::UntagResource
            | Op::CreateAlias
            | Op::UpdateAlias
            | Op::DeleteAlias
            | Op::ListAliases
            | Op::CreateGrant
            | Op::ListGrants
            | Op::ListRetirableGrants
            | Op::GetKeyPolicy
            | Op::ListKeyPolicies
            | Op::Encrypt
            | Op::Decrypt
            | Op::ReEncrypt
            | Op::GenerateDataKey
            | Op::GenerateDataKeyWithoutPlaintext
            | Op::GenerateRandom
            | Op::GetKeyLastUsage
            | Op::GetCallerIdentity
            | Op::DescribeCustomKeyStoreHealth
            | Op::ListKeyAuditEvents
            | Op::XksGetHealthStatus
            | Op::XksGetKeyMetadata
            | Op::XksEncrypt
            | Op::XksDecrypt => false,
            Op::EnableKeyRotation
            | Op::DisableKeyRotation
            | Op::GetKeyRotationStatus
            | Op::RotateKeyOnDemand
            | Op::ListKeyRotations
            | Op::GenerateDataKeyPair
            | Op::GenerateDataKeyPairWithoutPlaintext
            | Op::Sign
            | Op::Verify
            | Op::GetPublicKey
            | Op::GenerateMac
            | Op::VerifyMac
            | Op::DeriveSharedSecret
            | Op::GetParametersForImport
            | Op::ImportKeyMaterial
            | Op::DeleteImportedKeyMaterial
            | Op::ReplicateKey
            | Op::UpdatePrimaryRegion => false,
        }
    }

    /// How AWS answers the operation for a key in a CloudHSM key store when hsm-kms does
    /// not serve it; None for the operations hsm-kms serves. See `Unserved` for the sources.
    #[inline]
    pub fn unserved(self) -> Option<Unserved> {
        match self {
            // Automatic and on-demand rotation: key-state.md [7] (in a custom key store).
            Op::EnableKeyRotation
            | Op::DisableKeyRotation
            | Op::GetKeyRotationStatus
            | Op::RotateKeyOnDemand
            | Op::ListKeyRotations
            // Imported key material: key-state.md [9]; a key pair under a key in a custom
            // key store: the GenerateDataKeyPair API reference.
            | Op::GetParametersForImport
            | Op::ImportKeyMaterial
            | Op::DeleteImportedKeyMaterial
            | Op::GenerateDataKeyPair
            | Op::GenerateDataKeyPairWithoutPlaintext => Some(Unserved::Origin),
            // Asymmetric and HMAC operations on a symmetric encryption key.
            Op::Sign
            | Op::Verify
            | Op::GetPublicKey
            | Op::GenerateMac
            | Op::VerifyMac
            | Op::DeriveSharedSecret => Some(Unserved::KeyUsage),
            // A key in a custom key store cannot be a multi-Region key.
            Op::ReplicateKey | Op::UpdatePrimaryRegion => Some(Unserved::NotMultiRegionPrimary),
            Op::CreateCustomKeyStore
            | Op::DescribeCustomKeyStores
            | Op::UpdateCustomKeyStore
            | Op::DeleteCustomKeyStore
            | Op::ConnectCustomKeyStore
            | Op::DisconnectCustomKeyStore
            | Op::CreateKey
            | Op::DescribeKey
            | Op::ListKeys
            | Op::ListResourceTags
            | Op::EnableKey
            | Op::DisableKey
            | Op::UpdateKeyDescription
            | Op::ScheduleKeyDeletion
            | Op::CancelKeyDeletion
            | Op::TagResource
            | Op::UntagResource
            | Op::CreateAlias
            | Op::UpdateAlias
            | Op::DeleteAlias
            | Op::ListAliases
            | Op::CreateGrant
            | Op::ListGrants
            | Op::ListRetirableGrants
            | Op::RetireGrant
            | Op::RevokeGrant
            | Op::PutKeyPolicy
            | Op::GetKeyPolicy
            | Op::ListKeyPolicies
            | Op::Encrypt
            | Op::Decrypt
            | Op::ReEncrypt
            | Op::GenerateDataKey
            | Op::GenerateDataKeyWithoutPlaintext
            | Op::GenerateRandom
            | Op::GetKeyLastUsage
            | Op::GetCallerIdentity
            | Op::DescribeCustomKeyStoreHealth
            | Op::ListKeyAuditEvents
            | Op::XksGetHealthStatus
            | Op::XksGetKeyMetadata
            | Op::XksEncrypt
            | Op::XksDecrypt => None,
        }
    }

    /// What its audit line records besides who, what and the outcome.
    #[inline]
    pub fn recorded(self) -> Recorded {
        if self.xks() {
            Recorded::RequestMetadata
        } else if self.cryptographic() {
            Recorded::EncryptionContext
        } else {
            Recorded::Resources
        }
    }
}

/// How AWS refuses an operation for a symmetric encryption key in a CloudHSM key store. The
/// messages follow AWS's, recorded from real AWS (LocalStack's snapshot of its KMS tests,
/// tests/aws/services/kms/test_kms.snapshot.json, recorded against AWS): the templates are
/// recorded with other origins, key usages and operations, and are filled in here for a key
/// whose origin is AWS_CLOUDHSM and whose key usage is ENCRYPT_DECRYPT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unserved {
    /// UnsupportedOperationException: `<key ARN> origin is AWS_CLOUDHSM which is not valid
    /// for this operation.` (recorded for origins EXTERNAL and AWS_KMS; key-state.md [6]).
    Origin,
    /// InvalidKeyUsageException: `<key ARN> key usage is ENCRYPT_DECRYPT which is not valid
    /// for <Operation>.` (recorded for Verify, GenerateMac and DeriveSharedSecret).
    KeyUsage,
    /// UnsupportedOperationException: `<key ARN> is not a multi-region primary key.`
    /// (recorded for ReplicateKey of a replica key).
    NotMultiRegionPrimary,
}

impl Unserved {
    /// The exception and message for `op` on the key `arn`.
    pub fn error(self, op: Op, arn: &str) -> crate::error::KmsError {
        use crate::error::{ErrorKind, KmsError};
        match self {
            Unserved::Origin => KmsError::new(
                ErrorKind::UnsupportedOperation,
                format!("{arn} origin is AWS_CLOUDHSM which is not valid for this operation."),
            ),
            Unserved::KeyUsage => KmsError::new(
                ErrorKind::InvalidKeyUsage,
                format!(
                    "{arn} key usage is ENCRYPT_DECRYPT which is not valid for {}.",
                    op.name()
                ),
            ),
            Unserved::NotMultiRegionPrimary => KmsError::new(
                ErrorKind::UnsupportedOperation,
                format!("{arn} is not a multi-region primary key."),
            ),
        }
    }
}

/// The grant operations a grant on a symmetric encryption key may hold: those of every
/// operation, in AWS's order.
pub fn grant_operations() -> impl Iterator<Item = &'static str> {
    let mut all: Vec<&'static str> = Op::ALL
        .into_iter()
        .flat_map(|op| op.grant_operations().iter().copied())
        .collect();
    all.sort_unstable();
    all.dedup();
    all.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_are_unique() {
        for op in Op::ALL {
            assert_eq!(Op::parse(op.name()), Some(op));
            assert!(op.action().starts_with("kms:"), "{op:?}");
        }
        let mut names: Vec<_> = Op::ALL.iter().map(|o| o.name()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), Op::ALL.len());
        assert_eq!(Op::parse("Sign"), Some(Op::Sign));
        assert_eq!(Op::parse("CreateQueue"), None);
    }

    #[test]
    fn the_proto_has_exactly_these_operations() {
        let proto = include_str!("../../../proto/kms/v1/kms.proto");
        let mut rpcs: Vec<&str> = proto
            .lines()
            .filter_map(|l| l.trim().strip_prefix("rpc "))
            .map(|l| l.split('(').next().unwrap().trim())
            .collect();
        rpcs.sort();
        let mut ops: Vec<&str> = Op::served().map(|o| o.name()).collect();
        ops.sort();
        assert_eq!(rpcs, ops);
    }

    #[test]
    fn grant_operations_are_awss_for_symmetric_keys() {
        assert_eq!(
            grant_operations().collect::<Vec<_>>(),
            [
                "CreateGrant",
                "Decrypt",
                "DescribeKey",
                "Encrypt",
                "GenerateDataKey",
                "GenerateDataKeyWithoutPlaintext",
                "ReEncryptFrom",
                "ReEncryptTo",
                "RetireGrant"
            ]
        );
    }
}
