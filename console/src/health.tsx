// Key store health (hsm-kms's own view): each store's state and this replica's counts of its
// cryptographic requests, throttles and HSM errors, refreshed every few seconds.
import { useEffect, useState } from "preact/hooks";
import type { Api, HealthResponse } from "./api";
import { ConnectionError, StateBadge } from "./keystores";
import { ErrorAlert, formatDate, PageHeader, useAction, usePoll } from "./ui";

export function Health({ api }: { api: Api }) {
  const [health, setHealth] = useState<HealthResponse | null>(null);
  const load = useAction();
  async function refresh() {
    const h = await load.run(() => api.own<HealthResponse>("DescribeCustomKeyStoreHealth", {}));
    if (h) setHealth(h);
  }
  useEffect(() => {
    refresh();
  }, []);
  usePoll(true, 5000, refresh);

  return (
    <section>
      <PageHeader title="Key store health">
        <button type="button" onClick={refresh}>
          Refresh
        </button>
      </PageHeader>
      <p class="hint">
        As replica <code>{health?.Replica ?? "…"}</code> sees it, counted since{" "}
        {formatDate(health?.CountingSinceDate)} (needs kms:DescribeCustomKeyStoreHealth). Refreshes every 5 seconds.
      </p>
      <ErrorAlert error={load.error} context="Key store health" />
      {health ? (
        <table aria-label="Key store health">
          <thead>
            <tr>
              <th scope="col">Custom key store name</th>
              <th scope="col">Custom key store ID</th>
              <th scope="col">Health</th>
              <th scope="col">Requests</th>
              <th scope="col">Throttled</th>
              <th scope="col">HSM errors</th>
              <th scope="col">Sessions (busy)</th>
            </tr>
          </thead>
          <tbody>
            {(health.CustomKeyStores ?? []).length === 0 ? (
              <tr>
                <td colSpan={7}>No key stores.</td>
              </tr>
            ) : null}
            {(health.CustomKeyStores ?? []).map((s) => (
              <tr key={s.CustomKeyStoreId}>
                <td>{s.CustomKeyStoreName}</td>
                <td>
                  <code>{s.CustomKeyStoreId}</code>
                </td>
                <td>
                  <StateBadge state={s.Health} />
                  <ConnectionError code={s.ConnectionErrorCode} />
                </td>
                <td data-testid="requests">{s.Requests ?? 0}</td>
                <td>{s.Throttled ?? 0}</td>
                <td>{s.HsmErrors ?? 0}</td>
                <td>
                  {s.Sessions ?? 0} ({s.SessionsInUse ?? 0})
                </td>
              </tr>
            ))}
          </tbody>
        </table>
      ) : null}
    </section>
  );
}
