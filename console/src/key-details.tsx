// A key's details: General configuration, then tabs for Key policy, Cryptographic
// configuration, Tags, Aliases, Grants and the key's audit trail; the Key actions menu.
import {
  CreateAliasCommand,
  type CustomKeyStoresListEntry,
  DeleteAliasCommand,
  DescribeCustomKeyStoresCommand,
  DescribeKeyCommand,
  GetKeyPolicyCommand,
  type GrantListEntry,
  type KeyMetadata,
  ListGrantsCommand,
  ListResourceTagsCommand,
  PutKeyPolicyCommand,
  RevokeGrantCommand,
  type Tag,
  TagResourceCommand,
  UntagResourceCommand,
} from "@aws-sdk/client-kms";
import { useEffect, useState } from "preact/hooks";
import { type Api, type AuditResponse, everyPage } from "./api";
import { KeyActions } from "./key-actions";
import { listAliases } from "./keys";
import { StateBadge } from "./keystores";
import { ErrorAlert, FormButtons, formatDate, PageHeader, Success, TagEditor, type TagDraft, useAction } from "./ui";

const TABS = ["Key policy", "Cryptographic configuration", "Tags", "Aliases", "Grants", "Audit trail"] as const;
type Tab = (typeof TABS)[number];

export function KeyDetails({ api, keyId }: { api: Api; keyId: string }) {
  const [meta, setMeta] = useState<KeyMetadata | null>(null);
  const [aliases, setAliases] = useState<string[]>([]);
  const [tab, setTab] = useState<Tab>("Key policy");
  const load = useAction();

  async function refresh() {
    await load.run(async () => {
      const out = await api.kms.send(new DescribeKeyCommand({ KeyId: keyId }));
      setMeta(out.KeyMetadata ?? null);
      const all = await listAliases(api);
      setAliases(all.filter((a) => a.TargetKeyId === out.KeyMetadata?.KeyId).map((a) => a.AliasName ?? ""));
    });
  }
  useEffect(() => {
    refresh();
  }, [keyId]);

  return (
    <section>
      <p>
        <a href="#/keys">Customer managed keys</a> › {aliases[0] ?? keyId}
      </p>
      <PageHeader title={aliases[0] ?? keyId}>
        <KeyActions api={api} keyMeta={meta} onChanged={refresh} />
      </PageHeader>
      <ErrorAlert error={load.error} context="Loading the key" />
      {meta ? (
        <>
          <section aria-labelledby="general" class="panel">
            <h2 id="general">General configuration</h2>
            <dl class="summary">
              <dt>Alias</dt>
              <dd>{aliases.join(", ") || "-"}</dd>
              <dt>ARN</dt>
              <dd>
                <code data-testid="key-arn">{meta.Arn}</code>
              </dd>
              <dt>Status</dt>
              <dd>
                <StateBadge state={meta.KeyState ?? ""} />
                {meta.DeletionDate ? ` (deletion date ${formatDate(meta.DeletionDate)})` : ""}
              </dd>
              <dt>Creation date</dt>
              <dd>{formatDate(meta.CreationDate)}</dd>
              <dt>Description</dt>
              <dd>{meta.Description || "-"}</dd>
            </dl>
          </section>
          <div role="tablist" aria-label="Key details" class="tabs">
            {TABS.map((t) => (
              <button
                type="button"
                role="tab"
                key={t}
                id={`tab-${t.replace(/\W+/g, "-")}`}
                aria-selected={tab === t}
                aria-controls="tab-panel"
                onClick={() => setTab(t)}
              >
                {t}
              </button>
            ))}
          </div>
          <div role="tabpanel" tabIndex={0} id="tab-panel" aria-labelledby={`tab-${tab.replace(/\W+/g, "-")}`} class="panel">
            {tab === "Key policy" ? <KeyPolicy api={api} keyId={meta.KeyId ?? keyId} /> : null}
            {tab === "Cryptographic configuration" ? <Crypto api={api} meta={meta} /> : null}
            {tab === "Tags" ? <Tags api={api} keyId={meta.KeyId ?? keyId} /> : null}
            {tab === "Aliases" ? <Aliases api={api} keyId={meta.KeyId ?? keyId} aliases={aliases} onChanged={refresh} /> : null}
            {tab === "Grants" ? <Grants api={api} keyId={meta.KeyId ?? keyId} /> : null}
            {tab === "Audit trail" ? <Audit api={api} keyId={meta.KeyId ?? keyId} /> : null}
          </div>
        </>
      ) : null}
    </section>
  );
}

function KeyPolicy({ api, keyId }: { api: Api; keyId: string }) {
  const [policy, setPolicy] = useState<string | null>(null);
  const [editing, setEditing] = useState(false);
  const [draft, setDraft] = useState("");
  const [saved, setSaved] = useState(false);
  const load = useAction();
  const save = useAction();

  async function refresh() {
    await load.run(async () => {
      const out = await api.kms.send(new GetKeyPolicyCommand({ KeyId: keyId, PolicyName: "default" }));
      setPolicy(out.Policy ?? "");
    });
  }
  useEffect(() => {
    refresh();
  }, []);

  function pretty(text: string): string {
    try {
      return JSON.stringify(JSON.parse(text), null, 2);
    } catch {
      return text;
    }
  }

  async function submit(e: Event) {
    e.preventDefault();
    setSaved(false);
    // The server's answer is the judge: its error is shown as it says it.
    const done = await save.run(() => api.kms.send(new PutKeyPolicyCommand({ KeyId: keyId, PolicyName: "default", Policy: draft })));
    if (done) {
      setEditing(false);
      setSaved(true);
      refresh();
    }
  }

  return (
    <div>
      <h3>Key policy</h3>
      <ErrorAlert error={load.error} context="Getting the key policy" />
      {saved ? <Success>Key policy saved.</Success> : null}
      {editing ? (
        <form onSubmit={submit}>
          <label for="policy-editor">Key policy (JSON)</label>
          <textarea id="policy-editor" class="code" rows={22} value={draft} onInput={(e) => setDraft(e.currentTarget.value)} />
          <ErrorAlert error={save.error} context="Save key policy" />
          <FormButtons onCancel={() => setEditing(false)} busy={save.busy} submit="Save changes" />
        </form>
      ) : (
        <>
          <pre class="code" data-testid="key-policy" tabIndex={0} aria-label="Key policy document">{policy === null ? "…" : pretty(policy)}</pre>
          <button
            type="button"
            disabled={policy === null}
            onClick={() => {
              setDraft(pretty(policy ?? ""));
              setSaved(false);
              setEditing(true);
            }}
          >
            Edit
          </button>
        </>
      )}
    </div>
  );
}

function Crypto({ api, meta }: { api: Api; meta: KeyMetadata }) {
  const [store, setStore] = useState<CustomKeyStoresListEntry | null>(null);
  const load = useAction();
  useEffect(() => {
    if (!meta.CustomKeyStoreId) return;
    load.run(async () => {
      const out = await api.kms.send(new DescribeCustomKeyStoresCommand({ CustomKeyStoreId: meta.CustomKeyStoreId }));
      setStore(out.CustomKeyStores?.[0] ?? null);
    });
  }, [meta.CustomKeyStoreId]);
  return (
    <div>
      <h3>Cryptographic configuration</h3>
      <dl class="summary">
        <dt>Key type</dt>
        <dd>Symmetric</dd>
        <dt>Key spec</dt>
        <dd>{meta.KeySpec}</dd>
        <dt>Key usage</dt>
        <dd>Encrypt and decrypt</dd>
        <dt>Origin</dt>
        <dd data-testid="origin">{meta.Origin === "AWS_CLOUDHSM" ? "AWS CloudHSM" : meta.Origin}</dd>
        <dt>Custom key store name</dt>
        <dd>{store?.CustomKeyStoreName ?? "-"}</dd>
        <dt>Custom key store ID</dt>
        <dd>
          <code data-testid="store-id">{meta.CustomKeyStoreId ?? "-"}</code>
        </dd>
        <dt>Custom key store type</dt>
        <dd>AWS CloudHSM key store</dd>
        <dt>AWS CloudHSM cluster ID</dt>
        <dd data-testid="cluster-id">{meta.CloudHsmClusterId ?? store?.CloudHsmClusterId ?? "-"}</dd>
      </dl>
      <ErrorAlert error={load.error} context="Describing the key store" />
    </div>
  );
}

function Tags({ api, keyId }: { api: Api; keyId: string }) {
  const [tags, setTags] = useState<Tag[] | null>(null);
  const [draft, setDraft] = useState<TagDraft[]>([]);
  const [editing, setEditing] = useState(false);
  const load = useAction();
  const save = useAction();

  async function refresh() {
    await load.run(async () => {
      const out = await api.kms.send(new ListResourceTagsCommand({ KeyId: keyId, Limit: 50 }));
      setTags(out.Tags ?? []);
    });
  }
  useEffect(() => {
    refresh();
  }, []);

  async function submit(e: Event) {
    e.preventDefault();
    const before = tags ?? [];
    const after = draft.filter((t) => t.key);
    const removed = before.filter((t) => !after.some((a) => a.key === t.TagKey)).map((t) => t.TagKey ?? "");
    const done = await save.run(async () => {
      // Tags added or changed first, then those removed: a failure leaves the key with its
      // old tags plus what was added, and the error says which call failed.
      if (after.length) {
        await api.kms.send(
          new TagResourceCommand({ KeyId: keyId, Tags: after.map((t) => ({ TagKey: t.key, TagValue: t.value })) }),
        );
      }
      if (removed.length) await api.kms.send(new UntagResourceCommand({ KeyId: keyId, TagKeys: removed }));
      return true;
    });
    await refresh();
    if (done) setEditing(false);
  }

  return (
    <div>
      <h3>Tags</h3>
      <ErrorAlert error={load.error} context="Listing tags" />
      {editing ? (
        <form onSubmit={submit}>
          <TagEditor tags={draft} onChange={setDraft} />
          <ErrorAlert error={save.error} context="Save tags" />
          <FormButtons onCancel={() => setEditing(false)} busy={save.busy} submit="Save changes" />
        </form>
      ) : (
        <>
          <table aria-label="Tags">
            <thead>
              <tr>
                <th scope="col">Tag key</th>
                <th scope="col">Tag value</th>
              </tr>
            </thead>
            <tbody>
              {(tags ?? []).length === 0 ? (
                <tr>
                  <td colSpan={2}>No tags.</td>
                </tr>
              ) : null}
              {(tags ?? []).map((t) => (
                <tr key={t.TagKey}>
                  <td>{t.TagKey}</td>
                  <td>{t.TagValue}</td>
                </tr>
              ))}
            </tbody>
          </table>
          <button
            type="button"
            disabled={tags === null}
            onClick={() => {
              setDraft((tags ?? []).map((t) => ({ key: t.TagKey ?? "", value: t.TagValue ?? "" })));
              setEditing(true);
            }}
          >
            Edit tags
          </button>
        </>
      )}
    </div>
  );
}

function Aliases({
  api,
  keyId,
  aliases,
  onChanged,
}: {
  api: Api;
  keyId: string;
  aliases: string[];
  onChanged: () => void;
}) {
  const [name, setName] = useState("");
  const action = useAction();
  async function add(e: Event) {
    e.preventDefault();
    const alias = name.startsWith("alias/") ? name : `alias/${name}`;
    const done = await action.run(() => api.kms.send(new CreateAliasCommand({ AliasName: alias, TargetKeyId: keyId })));
    if (done) setName("");
    onChanged();
  }
  async function remove(alias: string) {
    await action.run(() => api.kms.send(new DeleteAliasCommand({ AliasName: alias })));
    onChanged();
  }
  return (
    <div>
      <h3>Aliases</h3>
      <table aria-label="Aliases">
        <thead>
          <tr>
            <th scope="col">Alias name</th>
            <th scope="col">
              <span class="visually-hidden">Actions</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {aliases.length === 0 ? (
            <tr>
              <td colSpan={2}>No aliases.</td>
            </tr>
          ) : null}
          {aliases.map((a) => (
            <tr key={a}>
              <td>{a}</td>
              <td>
                <button type="button" onClick={() => remove(a)} aria-label={`Delete alias ${a}`}>
                  Delete
                </button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
      <form onSubmit={add} class="inline">
        <label for="new-alias">Alias</label>
        <input id="new-alias" required value={name} placeholder="alias/payments" onInput={(e) => setName(e.currentTarget.value)} />
        <button type="submit" disabled={action.busy}>
          Create alias
        </button>
      </form>
      <ErrorAlert error={action.error} context="Alias" />
    </div>
  );
}

function Grants({ api, keyId }: { api: Api; keyId: string }) {
  const [grants, setGrants] = useState<GrantListEntry[] | null>(null);
  const load = useAction();
  const revoke = useAction();
  async function refresh() {
    await load.run(async () => {
      const all = await everyPage<GrantListEntry>(async (Marker) => {
        const p = await api.kms.send(new ListGrantsCommand({ KeyId: keyId, Marker, Limit: 100 }));
        return { items: p.Grants, next: p.Truncated ? p.NextMarker : undefined };
      });
      setGrants(all);
    });
  }
  useEffect(() => {
    refresh();
  }, []);
  async function revokeGrant(id: string) {
    await revoke.run(() => api.kms.send(new RevokeGrantCommand({ KeyId: keyId, GrantId: id })));
    refresh();
  }
  return (
    <div>
      <h3>Grants</h3>
      <ErrorAlert error={load.error} context="Listing grants" />
      <ErrorAlert error={revoke.error} context="Revoke grant" />
      <table aria-label="Grants">
        <thead>
          <tr>
            <th scope="col">Grant ID</th>
            <th scope="col">Name</th>
            <th scope="col">Grantee principal</th>
            <th scope="col">Operations</th>
            <th scope="col">Creation date</th>
            <th scope="col">
              <span class="visually-hidden">Actions</span>
            </th>
          </tr>
        </thead>
        <tbody>
          {grants?.length === 0 ? (
            <tr>
              <td colSpan={6}>No grants.</td>
            </tr>
          ) : null}
          {(grants ?? []).map((g) => (
            <tr key={g.GrantId}>
              <td>
                <code>{g.GrantId?.slice(0, 16)}…</code>
              </td>
              <td>{g.Name || "-"}</td>
              <td>{g.GranteePrincipal}</td>
              <td>{(g.Operations ?? []).join(", ")}</td>
              <td>{formatDate(g.CreationDate)}</td>
              <td>
                <button type="button" onClick={() => revokeGrant(g.GrantId ?? "")} aria-label={`Revoke grant ${g.GrantId}`}>
                  Revoke
                </button>
              </td>
            </tr>
          ))}
        </tbody>
      </table>
    </div>
  );
}

function Audit({ api, keyId }: { api: Api; keyId: string }) {
  const [audit, setAudit] = useState<AuditResponse | null>(null);
  const load = useAction();
  useEffect(() => {
    load.run(async () => setAudit(await api.own<AuditResponse>("ListKeyAuditEvents", { KeyId: keyId, Limit: 25 })));
  }, []);
  return (
    <div>
      <h3>Audit trail</h3>
      <p class="hint">
        The newest lines of this hsm-kms replica's audit trail that name this key (needs kms:ListKeyAuditEvents on the
        key).
      </p>
      <ErrorAlert error={load.error} context="Reading the audit trail" />
      {audit ? (
        <table aria-label="Audit trail" class="audit">
          <thead>
            <tr>
              <th scope="col">Time</th>
              <th scope="col">Principal</th>
              <th scope="col">Operation</th>
              <th scope="col">Outcome</th>
              <th scope="col">Error</th>
              <th scope="col">Source</th>
              <th scope="col">Request ID</th>
            </tr>
          </thead>
          <tbody>
            {(audit.Events ?? []).length === 0 ? (
              <tr>
                <td colSpan={7}>No lines name this key.</td>
              </tr>
            ) : null}
            {(audit.Events ?? []).map((e) => (
              <tr key={`${e.RequestId}-${e.Outcome}`}>
                <td>{e.EventTime}</td>
                <td>{e.Principal ?? "-"}</td>
                <td>{e.Operation}</td>
                <td>{e.Outcome}</td>
                <td>{e.ErrorCode ?? "-"}</td>
                <td>{e.Source ?? "-"}</td>
                <td>
                  <code>{e.RequestId}</code>
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      ) : null}
    </div>
  );
}
