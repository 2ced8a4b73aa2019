// AWS CloudHSM key stores: the table, Create key store, and the Key store actions menu
// (Connect, Disconnect, Edit, Delete), as the guide's procedures walk through them.
import {
  ConnectCustomKeyStoreCommand,
  CreateCustomKeyStoreCommand,
  type CustomKeyStoresListEntry,
  DeleteCustomKeyStoreCommand,
  DescribeCustomKeyStoresCommand,
  DisconnectCustomKeyStoreCommand,
  UpdateCustomKeyStoreCommand,
} from "@aws-sdk/client-kms";
import { useEffect, useState } from "preact/hooks";
import { type Api, everyPage } from "./api";
import { ActionsMenu, ErrorAlert, FormButtons, formatDate, Modal, PageHeader, Success, useAction, usePoll } from "./ui";

/// What each connection error code means and what to do (fix-keystore.md).
export const CONNECTION_ERRORS: Record<string, string> = {
  CLUSTER_NOT_FOUND:
    "hsm-kms cannot find a cluster with this cluster ID. Verify the cluster ID; disconnect the key store, edit its cluster ID, and connect it again.",
  INSUFFICIENT_CLOUDHSM_HSMS:
    "The cluster has no active HSMs. Add at least one HSM (two, in different Availability Zones, are better), then connect again.",
  INSUFFICIENT_FREE_ADDRESSES_IN_SUBNET:
    "A private subnet of the cluster has no free IP address for the connection.",
  INTERNAL_ERROR:
    "The request could not be completed because of an internal error. Disconnect the key store before you try to connect again.",
  INVALID_CREDENTIALS:
    "The kmsuser password is not correct. Disconnect the key store, update its key store password, and connect again.",
  NETWORK_ERRORS:
    "The cluster could not be reached, usually a transient network problem. Disconnect the key store, wait a few minutes, and connect again.",
  SUBNET_NOT_FOUND: "A subnet of the cluster configuration was deleted.",
  USER_LOCKED_OUT:
    "The kmsuser crypto user is locked out after too many failed password attempts. Change its password in the cluster, update the key store password, and connect again.",
  USER_LOGGED_IN:
    "kmsuser is logged in to the cluster, so hsm-kms cannot rotate its password and log in. Log kmsuser out of the cluster, then connect again.",
  USER_NOT_FOUND:
    "There is no kmsuser crypto user in the cluster. Create it, update the key store password, and connect again.",
};

const SETTLING = ["CONNECTING", "DISCONNECTING"];

export function listStores(api: Api): Promise<CustomKeyStoresListEntry[]> {
  return everyPage(async (Marker) => {
    const p = await api.kms.send(new DescribeCustomKeyStoresCommand({ Marker, Limit: 100 }));
    return { items: p.CustomKeyStores, next: p.Truncated ? p.NextMarker : undefined };
  });
}

type Dialog = "create" | "edit" | "delete" | null;

export function KeyStores({ api }: { api: Api }) {
  const [stores, setStores] = useState<CustomKeyStoresListEntry[] | null>(null);
  const [selected, setSelected] = useState<string | null>(null);
  const [dialog, setDialog] = useState<Dialog>(null);
  const [notice, setNotice] = useState<string | null>(null);
  const load = useAction();
  const action = useAction();

  async function refresh() {
    const s = await load.run(() => listStores(api));
    if (s) setStores(s);
  }
  useEffect(() => {
    refresh();
  }, []);
  // Connecting can take many seconds: the table refreshes itself until every store settles.
  const settling = (stores ?? []).some((s) => SETTLING.includes(s.ConnectionState ?? ""));
  usePoll(settling, 1000, refresh);

  const store = stores?.find((s) => s.CustomKeyStoreId === selected) ?? null;
  const state = store?.ConnectionState ?? "";
  // The store being connected: its outcome replaces the notice once its state settles.
  const [watching, setWatching] = useState<string | null>(null);
  const [failure, setFailure] = useState<string | null>(null);
  useEffect(() => {
    const s = stores?.find((x) => x.CustomKeyStoreId === watching);
    if (!s || SETTLING.includes(s.ConnectionState ?? "")) return;
    setWatching(null);
    if (s.ConnectionState === "CONNECTED") {
      setNotice(`Connected ${s.CustomKeyStoreName}.`);
    } else {
      setNotice(null);
      const code = s.ConnectionErrorCode ?? "";
      setFailure(`Connecting ${s.CustomKeyStoreName} failed: ${s.ConnectionState} ${code}. ${CONNECTION_ERRORS[code] ?? ""}`);
    }
  }, [stores, watching]);

  async function connect() {
    if (!store) return;
    setNotice(null);
    setFailure(null);
    const done = await action.run(() =>
      api.kms.send(new ConnectCustomKeyStoreCommand({ CustomKeyStoreId: store.CustomKeyStoreId })),
    );
    await refresh();
    // After the refresh: the table then holds the state the request left (not the old one).
    if (done) {
      setNotice(`Connecting ${store.CustomKeyStoreName}. This page refreshes until the connection state settles.`);
      setWatching(store.CustomKeyStoreId ?? null);
    }
  }

  async function disconnect() {
    if (!store) return;
    setNotice(null);
    setFailure(null);
    const done = await action.run(() =>
      api.kms.send(new DisconnectCustomKeyStoreCommand({ CustomKeyStoreId: store.CustomKeyStoreId })),
    );
    if (done) setNotice(`Disconnected ${store.CustomKeyStoreName}.`);
    await refresh();
  }

  function closed(message?: string) {
    setDialog(null);
    if (message) setNotice(message);
    refresh();
  }

  return (
    <section aria-labelledby="keystores-title">
      <PageHeader title="AWS CloudHSM key stores">
        <button type="button" onClick={refresh} disabled={load.busy}>
          Refresh
        </button>
        <ActionsMenu
          label="Key store actions"
          disabled={!store}
          items={[
            // A FAILED store must be disconnected before it is connected again (AWS's rule).
            { label: "Connect", onSelect: connect, disabled: state !== "DISCONNECTED" },
            {
              label: "Disconnect",
              onSelect: disconnect,
              disabled: !["CONNECTED", "FAILED", "CONNECTING"].includes(state),
            },
            { label: "Edit", onSelect: () => setDialog("edit"), disabled: state !== "DISCONNECTED" },
            { label: "Delete", onSelect: () => setDialog("delete"), disabled: state !== "DISCONNECTED" },
          ]}
        />
        <button type="button" class="primary" onClick={() => setDialog("create")}>
          Create key store
        </button>
      </PageHeader>
      <span id="keystores-title" hidden>
        AWS CloudHSM key stores
      </span>
      {notice ? <Success>{notice}</Success> : null}
      {failure ? (
        <div class="alert error" role="alert">
          {failure}
        </div>
      ) : null}
      <ErrorAlert error={action.error} context="Key store action" />
      <ErrorAlert error={load.error} context="Listing key stores" />
      {settling ? (
        <p role="status" class="progress">
          <span class="spinner" aria-hidden="true" /> Waiting for the connection state to settle…
        </p>
      ) : null}
      {stores === null ? (
        <p role="status">Loading key stores…</p>
      ) : (
        <table aria-label="AWS CloudHSM key stores">
          <thead>
            <tr>
              <th scope="col">
                <span class="visually-hidden">Select</span>
              </th>
              <th scope="col">Custom key store name</th>
              <th scope="col">Custom key store ID</th>
              <th scope="col">AWS CloudHSM cluster ID</th>
              <th scope="col">Connection state</th>
              <th scope="col">Creation date</th>
            </tr>
          </thead>
          <tbody>
            {stores.length === 0 ? (
              <tr>
                <td colSpan={6}>No AWS CloudHSM key stores. Choose Create key store.</td>
              </tr>
            ) : null}
            {stores.map((s) => (
              <tr key={s.CustomKeyStoreId} class={s.CustomKeyStoreId === selected ? "selected" : ""}>
                <td>
                  <input
                    type="radio"
                    name="keystore"
                    aria-label={`Select ${s.CustomKeyStoreName}`}
                    checked={s.CustomKeyStoreId === selected}
                    onChange={() => setSelected(s.CustomKeyStoreId ?? null)}
                  />
                </td>
                <td>{s.CustomKeyStoreName}</td>
                <td>
                  <code>{s.CustomKeyStoreId}</code>
                </td>
                <td>{s.CloudHsmClusterId}</td>
                <td>
                  <StateBadge state={s.ConnectionState ?? ""} />
                  <ConnectionError code={s.ConnectionErrorCode} />
                </td>
                <td>{formatDate(s.CreationDate)}</td>
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {dialog === "create" ? <CreateStore api={api} onClose={closed} /> : null}
      {dialog === "edit" && store ? <EditStore api={api} store={store} onClose={closed} /> : null}
      {dialog === "delete" && store ? <DeleteStore api={api} store={store} onClose={closed} /> : null}
    </section>
  );
}

/// A connection error code and what it means, under a store's state.
export function ConnectionError({ code }: { code?: string }) {
  if (!code) return null;
  return (
    <div class="error-code">
      <code>{code}</code>: {CONNECTION_ERRORS[code] ?? ""}
    </div>
  );
}

export function StateBadge({ state }: { state: string }) {
  const tone =
    state === "CONNECTED" || state === "Enabled" || state === "HEALTHY"
      ? "ok"
      : state === "FAILED" || state === "DEGRADED" || state === "Unavailable"
        ? "bad"
        : "neutral";
  return <span class={`badge ${tone}`}>{state}</span>;
}

function CreateStore({ api, onClose }: { api: Api; onClose: (message?: string) => void }) {
  const [name, setName] = useState("");
  const [cluster, setCluster] = useState("");
  const [anchor, setAnchor] = useState("");
  const [password, setPassword] = useState("");
  const { busy, error, run } = useAction();

  async function readAnchor(e: Event) {
    const file = (e.currentTarget as HTMLInputElement).files?.[0];
    setAnchor(file ? await file.text() : "");
  }

  async function submit(e: Event) {
    e.preventDefault();
    const done = await run(() =>
      api.kms.send(
        new CreateCustomKeyStoreCommand({
          CustomKeyStoreName: name,
          CloudHsmClusterId: cluster,
          TrustAnchorCertificate: anchor,
          KeyStorePassword: password,
        }),
      ),
    );
    if (done) onClose(`Created key store ${name} (${done.CustomKeyStoreId}). Connect it before you create keys in it.`);
  }

  return (
    <Modal title="Create key store" onClose={() => onClose()}>
      <form onSubmit={submit}>
        <label for="store-name">Key store name</label>
        <input id="store-name" required value={name} onInput={(e) => setName(e.currentTarget.value)} />
        <label for="store-cluster">AWS CloudHSM cluster ID</label>
        <input
          id="store-cluster"
          required
          placeholder="cluster-1a23b4cdefg"
          value={cluster}
          onInput={(e) => setCluster(e.currentTarget.value)}
        />
        <label for="store-anchor">Trust anchor certificate</label>
        <input id="store-anchor" type="file" accept=".crt,.pem" required onChange={readAnchor} />
        <p class="hint">The customerCA.crt file of the cluster (PEM).</p>
        <label for="store-password">kmsuser password</label>
        <input
          id="store-password"
          type="password"
          autocomplete="off"
          required
          value={password}
          onInput={(e) => setPassword(e.currentTarget.value)}
        />
        <ErrorAlert error={error} context="Create key store" />
        <FormButtons onCancel={() => onClose()} busy={busy} submit="Create" />
      </form>
    </Modal>
  );
}

function EditStore({
  api,
  store,
  onClose,
}: {
  api: Api;
  store: CustomKeyStoresListEntry;
  onClose: (message?: string) => void;
}) {
  const [name, setName] = useState(store.CustomKeyStoreName ?? "");
  const [cluster, setCluster] = useState(store.CloudHsmClusterId ?? "");
  const [password, setPassword] = useState("");
  const { busy, error, run } = useAction();

  async function submit(e: Event) {
    e.preventDefault();
    const done = await run(() =>
      api.kms.send(
        new UpdateCustomKeyStoreCommand({
          CustomKeyStoreId: store.CustomKeyStoreId,
          NewCustomKeyStoreName: name !== store.CustomKeyStoreName ? name : undefined,
          CloudHsmClusterId: cluster !== store.CloudHsmClusterId ? cluster : undefined,
          KeyStorePassword: password || undefined,
        }),
      ),
    );
    if (done) onClose(`Saved key store ${name}.`);
  }

  return (
    <Modal title="Edit key store" onClose={() => onClose()}>
      <form onSubmit={submit}>
        <p class="hint">A key store can be edited only while it is DISCONNECTED.</p>
        <label for="edit-name">Key store name</label>
        <input id="edit-name" required value={name} onInput={(e) => setName(e.currentTarget.value)} />
        <label for="edit-cluster">AWS CloudHSM cluster ID</label>
        <input id="edit-cluster" required value={cluster} onInput={(e) => setCluster(e.currentTarget.value)} />
        <label for="edit-password">kmsuser password</label>
        <input
          id="edit-password"
          type="password"
          autocomplete="off"
          placeholder="Unchanged"
          value={password}
          onInput={(e) => setPassword(e.currentTarget.value)}
        />
        <ErrorAlert error={error} context="Edit key store" />
        <FormButtons onCancel={() => onClose()} busy={busy} submit="Save" />
      </form>
    </Modal>
  );
}

function DeleteStore({
  api,
  store,
  onClose,
}: {
  api: Api;
  store: CustomKeyStoresListEntry;
  onClose: (message?: string) => void;
}) {
  const [confirm, setConfirm] = useState(false);
  const { busy, error, run } = useAction();

  async function submit(e: Event) {
    e.preventDefault();
    const done = await run(() =>
      api.kms.send(new DeleteCustomKeyStoreCommand({ CustomKeyStoreId: store.CustomKeyStoreId })),
    );
    if (done) onClose(`Deleted key store ${store.CustomKeyStoreName}.`);
  }

  return (
    <Modal title="Delete key store" onClose={() => onClose()}>
      <form onSubmit={submit}>
        <p>
          Delete <strong>{store.CustomKeyStoreName}</strong> (<code>{store.CustomKeyStoreId}</code>)? A key store
          can be deleted only when it is disconnected and holds no KMS keys. Deleting it does not
          touch its cluster or the key material in it.
        </p>
        <label class="check">
          <input type="checkbox" checked={confirm} onChange={(e) => setConfirm(e.currentTarget.checked)} />
          Confirm that you want to delete this custom key store.
        </label>
        <ErrorAlert error={error} context="Delete key store" />
        <div class="buttons">
          <button type="button" onClick={() => onClose()}>
            Cancel
          </button>
          <button type="submit" class="danger" disabled={busy || !confirm}>
            Delete key store
          </button>
        </div>
      </form>
    </Modal>
  );
}
