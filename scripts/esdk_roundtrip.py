"""Envelope encryption with the AWS Encryption SDK for Python against hsm-kms.

Usage: python3 scripts/esdk_roundtrip.py KEY_ARN
The endpoint and credentials come from the environment (`. <data-dir>/aws.env`), as for any
AWS client. Encrypts 64 KiB under KEY_ARN with an encryption context, decrypts it with a
strict key provider, and checks the bytes and the context. Exits non-zero on any mismatch.
"""
import os
import sys

import aws_encryption_sdk
import botocore.session
from aws_encryption_sdk import CommitmentPolicy


def main() -> None:
    key_arn = sys.argv[1]
    client = aws_encryption_sdk.EncryptionSDKClient(
        commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT
    )
    provider = aws_encryption_sdk.StrictAwsKmsMasterKeyProvider(
        key_ids=[key_arn], botocore_session=botocore.session.Session()
    )
    message = os.urandom(64 * 1024)
    context = {"purpose": "smoke", "pid": str(os.getpid())}
    sealed, _ = client.encrypt(source=message, key_provider=provider, encryption_context=context)
    opened, header = client.decrypt(source=sealed, key_provider=provider)
    if opened != message:
        sys.exit("esdk: the message did not decrypt to itself")
    for k, v in context.items():
        if header.encryption_context.get(k) != v:
            sys.exit(f"esdk: the encryption context lost {k}")
    print(f"esdk: OK ({len(sealed)} bytes sealed)")


if __name__ == "__main__":
    main()
