// Create key, in the AWS console's steps for a key in an AWS CloudHSM key store: configure
// key (Symmetric, Encrypt and decrypt, Advanced options: key material origin AWS CloudHSM key
// store), choose a CONNECTED key store, labels (alias, description, tags), key
// administrators, key users, review (with the key policy that will be set), Finish.
import { CreateAliasCommand, CreateKeyCommand, type CustomKeyStoresListEntry } from "@aws-sdk/client-kms";
import { useEffect, useState } from "preact/hooks";
import type { Session } from "./main";
import { listStores } from "./keystores";
import { ErrorAlert, TagEditor, type TagDraft, useAction } from "./ui";

const STEPS = [
  "Configure key",
  "Choose AWS CloudHSM key store",
  "Add labels",
  "Define key administrative permissions",
  "Define key usage permissions",
  "Review",
];

const ADMIN_ACTIONS = [
  "kms:Create*",
  "kms:Describe*",
  "kms:Enable*",
  "kms:List*",
  "kms:Put*",
  "kms:Update*",
  "kms:Revoke*",
  "kms:Disable*",
  "kms:Get*",
  "kms:Delete*",
  "kms:TagResource",
  "kms:UntagResource",
  "kms:ScheduleKeyDeletion",
  "kms:CancelKeyDeletion",
];
const DELETION_ACTIONS = ["kms:ScheduleKeyDeletion", "kms:CancelKeyDeletion"];
const USER_ACTIONS = ["kms:Encrypt", "kms:Decrypt", "kms:ReEncrypt*", "kms:GenerateDataKey*", "kms:DescribeKey"];
const GRANT_ACTIONS = ["kms:CreateGrant", "kms:ListGrants", "kms:RevokeGrant"];

function lines(text: string): string[] {
  return text
    .split(/[\s,]+/)
    .map((l) => l.trim())
    .filter(Boolean);
}

/// The key policy the AWS console writes: the account's statement, then the key
/// administrators' and key users' statements for those chosen.
export function keyPolicy(account: string, partition: string, admins: string[], allowDelete: boolean, users: string[]) {
  const statements: object[] = [
    {
      Sid: "Enable IAM User Permissions",
      Effect: "Allow",
      Principal: { AWS: `arn:${partition}:iam::${account}:root` },
      Action: "kms:*",
      Resource: "*",
    },
  ];
  if (admins.length) {
    statements.push({
      Sid: "Allow access for Key Administrators",
      Effect: "Allow",
      Principal: { AWS: admins },
      Action: ADMIN_ACTIONS.filter((a) => allowDelete || !DELETION_ACTIONS.includes(a)),
      Resource: "*",
    });
  }
  if (users.length) {
    statements.push(
      {
        Sid: "Allow use of the key",
        Effect: "Allow",
        Principal: { AWS: users },
        Action: USER_ACTIONS,
        Resource: "*",
      },
      {
        Sid: "Allow attachment of persistent resources",
        Effect: "Allow",
        Principal: { AWS: users },
        Action: GRANT_ACTIONS,
        Resource: "*",
        Condition: { Bool: { "kms:GrantIsForAWSResource": "true" } },
      },
    );
  }
  return { Id: "key-consolepolicy-3", Version: "2012-10-17", Statement: statements };
}

export function CreateKey({ session }: { session: Session }) {
  const { api, identity } = session;
  const [step, setStep] = useState(0);
  const [advanced, setAdvanced] = useState(false);
  const [origin, setOrigin] = useState("AWS_CLOUDHSM");
  const [stores, setStores] = useState<CustomKeyStoresListEntry[] | null>(null);
  const [store, setStore] = useState("");
  const [alias, setAlias] = useState("");
  const [description, setDescription] = useState("");
  const [tags, setTags] = useState<TagDraft[]>([]);
  const [admins, setAdmins] = useState("");
  const [allowDelete, setAllowDelete] = useState(true);
  const [users, setUsers] = useState("");
  const [accounts, setAccounts] = useState("");
  const [stepError, setStepError] = useState<string | null>(null);
  const [created, setCreated] = useState<string | null>(null);
  const loading = useAction();
  const finish = useAction();

  useEffect(() => {
    loading.run(async () => setStores(await listStores(api)));
  }, []);

  const partition = identity.Arn.split(":")[1] || "aws";
  const userPrincipals = [...lines(users), ...lines(accounts).map((a) => `arn:${partition}:iam::${a}:root`)];
  const policy = keyPolicy(identity.Account, partition, lines(admins), allowDelete, userPrincipals);
  const chosen = stores?.find((s) => s.CustomKeyStoreId === store);

  function next() {
    setStepError(null);
    if (step === 0 && origin !== "AWS_CLOUDHSM") {
      setStepError("Only AWS CloudHSM key store keys can be created here: choose Advanced options, AWS CloudHSM key store.");
      return;
    }
    if (step === 1 && !chosen) {
      setStepError("Choose a CONNECTED AWS CloudHSM key store.");
      return;
    }
    if (step === 2 && alias && !/^[a-zA-Z0-9/_-]+$/.test(alias.replace(/^alias\//, ""))) {
      setStepError("An alias can contain only alphanumeric characters, slashes (/), underscores (_), and dashes (-).");
      return;
    }
    if (step === 4) {
      const bad = lines(accounts).find((a) => !/^\d{12}$/.test(a));
      if (bad) {
        setStepError(`${bad} is not a 12-digit AWS account ID.`);
        return;
      }
    }
    setStep(step + 1);
  }

  async function create() {
    let keyId: string | undefined;
    await finish.run(async () => {
      const out = await api.kms.send(
        new CreateKeyCommand({
          KeySpec: "SYMMETRIC_DEFAULT",
          KeyUsage: "ENCRYPT_DECRYPT",
          Origin: "AWS_CLOUDHSM",
          CustomKeyStoreId: store,
          Description: description || undefined,
          Tags: tags.filter((t) => t.key).map((t) => ({ TagKey: t.key, TagValue: t.value })),
          Policy: JSON.stringify(policy),
        }),
      );
      keyId = out.KeyMetadata?.KeyId;
      if (alias) {
        const name = alias.startsWith("alias/") ? alias : `alias/${alias}`;
        try {
          await api.kms.send(new CreateAliasCommand({ AliasName: name, TargetKeyId: keyId }));
        } catch (e) {
          // The key exists: say so, rather than leave it half-done silently.
          setCreated(keyId ?? null);
          throw e;
        }
      }
      location.hash = `#/keys/${keyId}`;
    });
  }

  return (
    <section>
      <h1>Create key</h1>
      <ol class="steps" aria-label="Steps">
        {STEPS.map((s, i) => (
          <li key={s} aria-current={i === step ? "step" : undefined} class={i === step ? "current" : ""}>
            Step {i + 1}: {s}
          </li>
        ))}
      </ol>
      <div class="step-body">
        <h2>{STEPS[step]}</h2>
        {step === 0 ? (
          <>
            <fieldset>
              <legend>Key type</legend>
              <label class="check">
                <input type="radio" name="key-type" checked readOnly />
                Symmetric
              </label>
              <label class="check">
                <input type="radio" name="key-type" disabled />
                Asymmetric (not in an AWS CloudHSM key store)
              </label>
            </fieldset>
            <fieldset>
              <legend>Key usage</legend>
              <label class="check">
                <input type="radio" name="key-usage" checked readOnly />
                Encrypt and decrypt
              </label>
            </fieldset>
            <button type="button" aria-expanded={advanced} onClick={() => setAdvanced(!advanced)}>
              Advanced options
            </button>
            {advanced ? (
              <fieldset>
                <legend>Key material origin</legend>
                {[
                  ["AWS_KMS", "KMS", true],
                  ["EXTERNAL", "External (Import Key material)", true],
                  ["AWS_CLOUDHSM", "AWS CloudHSM key store", false],
                  ["EXTERNAL_KEY_STORE", "External key store", true],
                ].map(([value, label, disabled]) => (
                  <label class="check" key={value as string}>
                    <input
                      type="radio"
                      name="origin"
                      value={value as string}
                      disabled={disabled as boolean}
                      checked={origin === value}
                      onChange={() => setOrigin(value as string)}
                    />
                    {label as string}
                  </label>
                ))}
                <p class="hint">
                  hsm-kms makes keys only in AWS CloudHSM key stores. You cannot create a multi-Region key in an AWS
                  CloudHSM key store.
                </p>
              </fieldset>
            ) : null}
          </>
        ) : null}
        {step === 1 ? (
          <fieldset>
            <legend>AWS CloudHSM key store</legend>
            <ErrorAlert error={loading.error} context="Listing key stores" />
            {stores === null ? <p role="status">Loading key stores…</p> : null}
            {stores?.length === 0 ? (
              <p>
                No key stores. <a href="#/keystores">Create custom key store</a>
              </p>
            ) : null}
            {stores?.map((s) => (
              <label class="check" key={s.CustomKeyStoreId}>
                <input
                  type="radio"
                  name="store"
                  value={s.CustomKeyStoreId}
                  // A key store that is not CONNECTED cannot be chosen.
                  disabled={s.ConnectionState !== "CONNECTED"}
                  checked={store === s.CustomKeyStoreId}
                  onChange={() => setStore(s.CustomKeyStoreId ?? "")}
                />
                {s.CustomKeyStoreName} ({s.CustomKeyStoreId}, {s.CloudHsmClusterId}) — {s.ConnectionState}
              </label>
            ))}
          </fieldset>
        ) : null}
        {step === 2 ? (
          <>
            <label for="alias">Alias</label>
            <input id="alias" value={alias} placeholder="payments" onInput={(e) => setAlias(e.currentTarget.value)} />
            <label for="description">Description</label>
            <textarea
              id="description"
              value={description}
              onInput={(e) => setDescription(e.currentTarget.value)}
            />
            <fieldset>
              <legend>Tags</legend>
              <TagEditor tags={tags} onChange={setTags} />
            </fieldset>
          </>
        ) : null}
        {step === 3 ? (
          <>
            <label for="admins">Key administrators</label>
            <textarea
              id="admins"
              aria-describedby="admins-hint"
              value={admins}
              placeholder={`arn:${partition}:iam::${identity.Account}:role/KMSAdminRole`}
              onInput={(e) => setAdmins(e.currentTarget.value)}
            />
            <p class="hint" id="admins-hint">
              The IAM users and roles (ARNs, one per line) who can manage this key. IAM policies can give other
              principals permission too.
            </p>
            <label class="check">
              <input type="checkbox" checked={allowDelete} onChange={(e) => setAllowDelete(e.currentTarget.checked)} />
              Allow key administrators to delete this key
            </label>
          </>
        ) : null}
        {step === 4 ? (
          <>
            <label for="users">Key users</label>
            <textarea
              id="users"
              aria-describedby="users-hint"
              value={users}
              placeholder={`arn:${partition}:iam::${identity.Account}:role/AppRole`}
              onInput={(e) => setUsers(e.currentTarget.value)}
            />
            <p class="hint" id="users-hint">
              The IAM users and roles in this account (ARNs, one per line) who can use this key in cryptographic
              operations.
            </p>
            <label for="accounts">Other AWS accounts</label>
            <textarea
              id="accounts"
              aria-describedby="accounts-hint"
              value={accounts}
              onInput={(e) => setAccounts(e.currentTarget.value)}
            />
            <p class="hint" id="accounts-hint">
              AWS account IDs, one per line. Their administrators must also allow their users with IAM policies.
            </p>
          </>
        ) : null}
        {step === 5 ? (
          <>
            <dl class="summary">
              <dt>Key type</dt>
              <dd>Symmetric</dd>
              <dt>Key usage</dt>
              <dd>Encrypt and decrypt</dd>
              <dt>Origin</dt>
              <dd>AWS CloudHSM</dd>
              <dt>Custom key store</dt>
              <dd>
                {chosen?.CustomKeyStoreName} ({chosen?.CustomKeyStoreId})
              </dd>
              <dt>Alias</dt>
              <dd>{alias || "-"}</dd>
              <dt>Description</dt>
              <dd>{description || "-"}</dd>
              <dt>Tags</dt>
              <dd>{tags.filter((t) => t.key).map((t) => `${t.key}=${t.value}`).join(", ") || "-"}</dd>
            </dl>
            <label for="policy-preview">Key policy</label>
            <textarea id="policy-preview" class="code" readOnly rows={18} value={JSON.stringify(policy, null, 2)} />
          </>
        ) : null}
      </div>
      {stepError ? (
        <div class="alert error" role="alert">
          {stepError}
        </div>
      ) : null}
      <ErrorAlert error={finish.error} context="Create key" />
      {created ? (
        <div class="alert warning" role="alert">
          The key was created, but its alias was not. <a href={`#/keys/${created}`}>Open key {created}</a> to add an
          alias.
        </div>
      ) : null}
      <div class="buttons">
        <a class="button" href="#/keys">
          Cancel
        </a>
        {step > 0 ? (
          <button type="button" onClick={() => setStep(step - 1)}>
            Previous
          </button>
        ) : null}
        {step < STEPS.length - 1 ? (
          <button type="button" class="primary" onClick={next}>
            Next
          </button>
        ) : (
          <button type="button" class="primary" disabled={finish.busy || created !== null} onClick={create}>
            Finish
          </button>
        )}
      </div>
    </section>
  );
}
