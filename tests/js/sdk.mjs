// The AWS SDK for JavaScript v3 against hsm-kms, as a Node application would use AWS KMS.
// tests/js_sdk.rs runs it against `hsm-kms dev` with the dev instance's aws.env in the
// environment (AWS_ENDPOINT_URL_KMS, the access key, AWS_REGION).
//
//   node sdk.mjs operations   key stores, keys, aliases, tags, grants, cryptography, and the
//                             errors AWS answers, as the SDK's own exception classes
//   node sdk.mjs throttling   concurrent Encrypts past the store's quota: the SDK retries
//                             ThrottlingException (standard retry mode) and says so
//
// Prints one JSON object (what it saw) and exits 0, or prints the failure and exits 1.

import {
  KMSClient,
  CancelKeyDeletionCommand,
  CreateAliasCommand,
  CreateGrantCommand,
  CreateKeyCommand,
  DecryptCommand,
  DeleteAliasCommand,
  DescribeCustomKeyStoresCommand,
  DescribeKeyCommand,
  DisableKeyCommand,
  EnableKeyCommand,
  EncryptCommand,
  GenerateDataKeyCommand,
  GenerateRandomCommand,
  GetKeyLastUsageCommand,
  GetKeyRotationStatusCommand,
  ListAliasesCommand,
  ListGrantsCommand,
  ListKeysCommand,
  ListResourceTagsCommand,
  NotFoundException,
  DisabledException,
  ReEncryptCommand,
  RetireGrantCommand,
  ScheduleKeyDeletionCommand,
  TagResourceCommand,
  UnsupportedOperationException,
  UntagResourceCommand,
  UpdateAliasCommand,
} from "@aws-sdk/client-kms";

function check(condition, what) {
  if (!condition) throw new Error(`check failed: ${what}`);
}

/// The error a call is refused with (a call that succeeds fails the run).
async function refused(kms, command) {
  try {
    await kms.send(command);
  } catch (e) {
    return e;
  }
  throw new Error(`${command.constructor.name} succeeded`);
}

async function operations(kms) {
  const seen = {};
  const stores = await kms.send(new DescribeCustomKeyStoresCommand({}));
  const store = stores.CustomKeyStores.find((s) => s.ConnectionState === "CONNECTED");
  check(store, "a CONNECTED custom key store (the dev store)");
  seen.store = store.CustomKeyStoreId;

  // A key in the store, as the console's Advanced options would make it.
  const made = await kms.send(
    new CreateKeyCommand({
      Description: "js sdk",
      Origin: "AWS_CLOUDHSM",
      CustomKeyStoreId: store.CustomKeyStoreId,
      Tags: [{ TagKey: "team", TagValue: "js" }],
    }),
  );
  const key = made.KeyMetadata.KeyId;
  check(made.KeyMetadata.Origin === "AWS_CLOUDHSM", "origin AWS_CLOUDHSM");
  check(made.KeyMetadata.CreationDate instanceof Date, "CreationDate is a Date");
  const described = await kms.send(new DescribeKeyCommand({ KeyId: key }));
  check(described.KeyMetadata.CustomKeyStoreId === store.CustomKeyStoreId, "the key's store");
  const keys = await kms.send(new ListKeysCommand({ Limit: 1000 }));
  check(keys.Keys.some((k) => k.KeyId === key), "ListKeys lists the key");

  // Aliases.
  const alias = `alias/js-${Date.now()}`;
  await kms.send(new CreateAliasCommand({ AliasName: alias, TargetKeyId: key }));
  const other = (await kms.send(new CreateKeyCommand({ CustomKeyStoreId: store.CustomKeyStoreId })))
    .KeyMetadata.KeyId;
  await kms.send(new UpdateAliasCommand({ AliasName: alias, TargetKeyId: other }));
  const aliases = await kms.send(new ListAliasesCommand({ KeyId: other }));
  check(aliases.Aliases.some((a) => a.AliasName === alias), "the alias points at the other key");
  await kms.send(new UpdateAliasCommand({ AliasName: alias, TargetKeyId: key }));

  // Tags.
  await kms.send(new TagResourceCommand({ KeyId: key, Tags: [{ TagKey: "env", TagValue: "test" }] }));
  await kms.send(new UntagResourceCommand({ KeyId: key, TagKeys: ["team"] }));
  const tags = await kms.send(new ListResourceTagsCommand({ KeyId: key }));
  check(
    JSON.stringify(tags.Tags) === JSON.stringify([{ TagKey: "env", TagValue: "test" }]),
    `tags ${JSON.stringify(tags.Tags)}`,
  );

  // Cryptography, through the alias, with an encryption context.
  const context = { app: "js" };
  const plaintext = new TextEncoder().encode("hello from node");
  const sealed = await kms.send(
    new EncryptCommand({ KeyId: alias, Plaintext: plaintext, EncryptionContext: context }),
  );
  check(sealed.CiphertextBlob instanceof Uint8Array, "CiphertextBlob is bytes");
  const opened = await kms.send(
    new DecryptCommand({ CiphertextBlob: sealed.CiphertextBlob, EncryptionContext: context }),
  );
  check(new TextDecoder().decode(opened.Plaintext) === "hello from node", "the round trip");
  const wrongContext = await refused(
    kms,
    new DecryptCommand({ CiphertextBlob: sealed.CiphertextBlob, EncryptionContext: { app: "x" } }),
  );
  check(wrongContext.name === "InvalidCiphertextException", `wrong context: ${wrongContext.name}`);
  const moved = await kms.send(
    new ReEncryptCommand({
      CiphertextBlob: sealed.CiphertextBlob,
      SourceEncryptionContext: context,
      DestinationKeyId: other,
    }),
  );
  check(moved.KeyId.endsWith(other), "ReEncrypt to the other key");
  const dataKey = await kms.send(new GenerateDataKeyCommand({ KeyId: key, KeySpec: "AES_256" }));
  check(dataKey.Plaintext.length === 32, "a 32-byte data key");
  const random = await kms.send(
    new GenerateRandomCommand({ NumberOfBytes: 24, CustomKeyStoreId: store.CustomKeyStoreId }),
  );
  check(random.Plaintext.length === 24, "24 random bytes");
  const usage = await kms.send(new GetKeyLastUsageCommand({ KeyId: key }));
  check(usage.KeyLastUsage.Operation === "GenerateDataKey", `last use ${JSON.stringify(usage)}`);
  check(usage.KeyLastUsage.KmsRequestId === dataKey.$metadata.requestId, "its request id");

  // Grants: one for a role, then retired by its token.
  const grant = await kms.send(
    new CreateGrantCommand({
      KeyId: key,
      GranteePrincipal: "arn:aws:iam::111122223333:role/js",
      Operations: ["Decrypt"],
      Constraints: { EncryptionContextSubset: context },
    }),
  );
  const grants = await kms.send(new ListGrantsCommand({ KeyId: key }));
  const listed = grants.Grants.find((g) => g.GrantId === grant.GrantId);
  check(listed, "the grant is listed");
  check(listed.Constraints.EncryptionContextEquals === undefined, "no empty constraint member");
  await kms.send(new RetireGrantCommand({ GrantToken: grant.GrantToken }));

  // AWS's errors, as the SDK's exception classes.
  const missing = await refused(
    kms,
    new DescribeKeyCommand({ KeyId: "11111111-2222-3333-4444-555555555555" }),
  );
  check(missing instanceof NotFoundException, `NotFoundException, not ${missing.name}`);
  await kms.send(new DisableKeyCommand({ KeyId: key }));
  const disabled = await refused(kms, new EncryptCommand({ KeyId: key, Plaintext: plaintext }));
  check(disabled instanceof DisabledException, `DisabledException, not ${disabled.name}`);
  check(disabled.$metadata.httpStatusCode === 400, "HTTP 400");
  await kms.send(new EnableKeyCommand({ KeyId: key }));
  const rotation = await refused(kms, new GetKeyRotationStatusCommand({ KeyId: key }));
  check(
    rotation instanceof UnsupportedOperationException,
    `rotation: UnsupportedOperationException, not ${rotation.name}`,
  );
  seen.rotation = rotation.message;

  // Deletion scheduled and cancelled; the alias removed.
  const scheduled = await kms.send(new ScheduleKeyDeletionCommand({ KeyId: other, PendingWindowInDays: 7 }));
  check(scheduled.KeyState === "PendingDeletion", "PendingDeletion");
  await kms.send(new CancelKeyDeletionCommand({ KeyId: other }));
  await kms.send(new DeleteAliasCommand({ AliasName: alias }));
  seen.key = key;
  seen.requests = "ok";
  return seen;
}

async function throttling(kms) {
  // Every Encrypt at once: past the store's quota, the service answers ThrottlingException
  // and the SDK retries it with backoff before giving up.
  const stores = await kms.send(new DescribeCustomKeyStoresCommand({}));
  const store = stores.CustomKeyStores.find((s) => s.ConnectionState === "CONNECTED");
  const key = (await kms.send(new CreateKeyCommand({ CustomKeyStoreId: store.CustomKeyStoreId })))
    .KeyMetadata.KeyId;
  const plaintext = new TextEncoder().encode("x");
  const outcomes = await Promise.all(
    Array.from({ length: 40 }, () =>
      kms
        .send(new EncryptCommand({ KeyId: key, Plaintext: plaintext }))
        .then((r) => ({ ok: true, attempts: r.$metadata.attempts }))
        .catch((e) => ({ ok: false, name: e.name, attempts: e.$metadata?.attempts })),
    ),
  );
  const retried = outcomes.filter((o) => o.attempts > 1);
  const succeeded = outcomes.filter((o) => o.ok);
  const names = [...new Set(outcomes.filter((o) => !o.ok).map((o) => o.name))];
  check(retried.length > 0, `the SDK retried: ${JSON.stringify(outcomes)}`);
  check(succeeded.some((o) => o.attempts > 1), "a request succeeded after a retry");
  check(names.every((n) => n === "ThrottlingException"), `failures: ${names}`);
  return {
    requests: outcomes.length,
    succeeded: succeeded.length,
    retried: retried.length,
    succeeded_after_retry: succeeded.filter((o) => o.attempts > 1).length,
    failures: names,
  };
}

const phase = process.argv[2];
const kms = new KMSClient({ maxAttempts: 5 });
try {
  const seen = phase === "throttling" ? await throttling(kms) : await operations(kms);
  console.log(JSON.stringify(seen));
} catch (e) {
  console.error(`${phase}: ${e.name}: ${e.message}`);
  process.exit(1);
}
