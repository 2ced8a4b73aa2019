// Customer managed keys: the key table with a column chooser, a filter and pages, and the
// Key actions menu for the selected key.
import {
  type AliasListEntry,
  DescribeKeyCommand,
  type KeyMetadata,
  ListAliasesCommand,
  ListKeysCommand,
} from "@aws-sdk/client-kms";
import { useEffect, useState } from "preact/hooks";
import { type Api, everyPage } from "./api";
import { KeyActions } from "./key-actions";
import { StateBadge } from "./keystores";
import { ErrorAlert, formatDate, Modal, PageHeader } from "./ui";

export interface KeyRow {
  meta: KeyMetadata;
  aliases: string[];
}

const COLUMNS = [
  "Aliases",
  "Key ID",
  "Status",
  "Description",
  "Creation date",
  "Origin",
  "Custom key store ID",
] as const;
type Column = (typeof COLUMNS)[number];
const DEFAULT_COLUMNS: Column[] = ["Aliases", "Key ID", "Status", "Description", "Creation date"];
// Preferences (which columns show) are not secret: they live in localStorage.
const PREFERENCES = "hsm-kms-console-key-columns";
const PAGE = 10;

export function listAliases(api: Api): Promise<AliasListEntry[]> {
  return everyPage(async (Marker) => {
    const p = await api.kms.send(new ListAliasesCommand({ Marker, Limit: 100 }));
    return { items: p.Aliases, next: p.Truncated ? p.NextMarker : undefined };
  });
}

async function loadKeys(api: Api): Promise<KeyRow[]> {
  const keys = await everyPage(async (Marker) => {
    const p = await api.kms.send(new ListKeysCommand({ Marker, Limit: 100 }));
    return { items: p.Keys, next: p.Truncated ? p.NextMarker : undefined };
  });
  const ids = keys.map((k) => k.KeyId ?? "");
  const aliases = await listAliases(api);
  // DescribeKey for each, a few at a time.
  const rows: KeyRow[] = [];
  for (let i = 0; i < ids.length; i += 8) {
    const metas = await Promise.all(
      ids.slice(i, i + 8).map((KeyId) => api.kms.send(new DescribeKeyCommand({ KeyId }))),
    );
    for (const m of metas) {
      const meta = m.KeyMetadata;
      if (!meta) continue;
      rows.push({
        meta,
        aliases: aliases.filter((a) => a.TargetKeyId === meta.KeyId).map((a) => a.AliasName ?? ""),
      });
    }
  }
  rows.sort((a, b) => (a.aliases[0] ?? "~" + a.meta.KeyId).localeCompare(b.aliases[0] ?? "~" + b.meta.KeyId));
  return rows;
}

function savedColumns(): Column[] {
  try {
    const saved = JSON.parse(localStorage.getItem(PREFERENCES) ?? "null");
    if (Array.isArray(saved)) return COLUMNS.filter((c) => saved.includes(c));
  } catch {
    /* the defaults */
  }
  return DEFAULT_COLUMNS;
}

export function Keys({ api }: { api: Api }) {
  const [rows, setRows] = useState<KeyRow[] | null>(null);
  const [error, setError] = useState<unknown>(null);
  const [filter, setFilter] = useState("");
  const [page, setPage] = useState(0);
  const [columns, setColumns] = useState<Column[]>(savedColumns);
  const [choosing, setChoosing] = useState(false);
  const [selected, setSelected] = useState<string | null>(null);

  async function refresh() {
    setError(null);
    try {
      setRows(await loadKeys(api));
    } catch (e) {
      setError(e);
      setRows([]);
    }
  }
  useEffect(() => {
    refresh();
  }, []);

  const needle = filter.trim().toLowerCase();
  const shown = (rows ?? []).filter(
    (r) =>
      !needle ||
      [r.meta.KeyId, r.meta.KeyState, r.meta.Description, r.meta.CustomKeyStoreId, ...r.aliases].some((v) =>
        (v ?? "").toLowerCase().includes(needle),
      ),
  );
  const pages = Math.max(1, Math.ceil(shown.length / PAGE));
  const current = Math.min(page, pages - 1);
  const visible = shown.slice(current * PAGE, current * PAGE + PAGE);
  const selectedMeta = rows?.find((r) => r.meta.KeyId === selected)?.meta ?? null;

  function cell(c: Column, r: KeyRow) {
    switch (c) {
      case "Aliases":
        return r.aliases.length ? (
          <a href={`#/keys/${r.meta.KeyId}`}>
            {r.aliases[0]}
            {r.aliases.length > 1 ? ` (+${r.aliases.length - 1} more)` : ""}
          </a>
        ) : (
          "-"
        );
      case "Key ID":
        return (
          <a href={`#/keys/${r.meta.KeyId}`}>
            <code>{r.meta.KeyId}</code>
          </a>
        );
      case "Status":
        return <StateBadge state={r.meta.KeyState ?? ""} />;
      case "Description":
        return r.meta.Description || "-";
      case "Creation date":
        return formatDate(r.meta.CreationDate);
      case "Origin":
        return r.meta.Origin === "AWS_CLOUDHSM" ? "AWS CloudHSM" : (r.meta.Origin ?? "-");
      case "Custom key store ID":
        return r.meta.CustomKeyStoreId ? <code>{r.meta.CustomKeyStoreId}</code> : "-";
    }
  }

  return (
    <section>
      <PageHeader title="Customer managed keys">
        <button type="button" onClick={refresh}>
          Refresh
        </button>
        <KeyActions api={api} keyMeta={selectedMeta} onChanged={refresh} />
        <a class="button primary" href="#/keys/create">
          Create key
        </a>
      </PageHeader>
      <ErrorAlert error={error} context="Listing keys" />
      <div class="table-tools">
        <label for="key-filter" class="visually-hidden">
          Filter keys
        </label>
        <input
          id="key-filter"
          type="search"
          placeholder="Filter keys by alias, key ID, status, description"
          value={filter}
          onInput={(e) => {
            setFilter(e.currentTarget.value);
            setPage(0);
          }}
        />
        <nav class="pager" aria-label="Pages of keys">
          <button type="button" disabled={current === 0} onClick={() => setPage(current - 1)}>
            Previous page
          </button>
          <span aria-live="polite">
            Page {current + 1} of {pages}
          </span>
          <button type="button" disabled={current >= pages - 1} onClick={() => setPage(current + 1)}>
            Next page
          </button>
        </nav>
        <button type="button" aria-label="Preferences" title="Preferences" onClick={() => setChoosing(true)}>
          ⚙
        </button>
      </div>
      {rows === null ? (
        <p role="status">Loading keys…</p>
      ) : (
        <table aria-label="Customer managed keys">
          <thead>
            <tr>
              <th scope="col">
                <span class="visually-hidden">Select</span>
              </th>
              {columns.map((c) => (
                <th scope="col" key={c}>
                  {c}
                </th>
              ))}
            </tr>
          </thead>
          <tbody>
            {visible.length === 0 ? (
              <tr>
                <td colSpan={columns.length + 1}>{rows.length ? "No keys match the filter." : "No keys."}</td>
              </tr>
            ) : null}
            {visible.map((r) => (
              <tr key={r.meta.KeyId}>
                <td>
                  <input
                    type="radio"
                    name="key"
                    aria-label={`Select ${r.aliases[0] ?? r.meta.KeyId}`}
                    checked={selected === r.meta.KeyId}
                    onChange={() => setSelected(r.meta.KeyId ?? null)}
                  />
                </td>
                {columns.map((c) => (
                  <td key={c}>{cell(c, r)}</td>
                ))}
              </tr>
            ))}
          </tbody>
        </table>
      )}
      {choosing ? (
        <ColumnChooser
          columns={columns}
          onClose={(next) => {
            setChoosing(false);
            if (next) {
              setColumns(next);
              localStorage.setItem(PREFERENCES, JSON.stringify(next));
            }
          }}
        />
      ) : null}
    </section>
  );
}

function ColumnChooser({ columns, onClose }: { columns: Column[]; onClose: (next?: Column[]) => void }) {
  const [chosen, setChosen] = useState<Column[]>(columns);
  return (
    <Modal title="Preferences" onClose={() => onClose()}>
      <form
        onSubmit={(e) => {
          e.preventDefault();
          onClose(COLUMNS.filter((c) => chosen.includes(c)));
        }}
      >
        <fieldset>
          <legend>Visible columns</legend>
          {COLUMNS.map((c) => (
            <label class="check" key={c}>
              <input
                type="checkbox"
                checked={chosen.includes(c)}
                onChange={(e) =>
                  setChosen(e.currentTarget.checked ? [...chosen, c] : chosen.filter((x) => x !== c))
                }
              />
              {c}
            </label>
          ))}
        </fieldset>
        <div class="buttons">
          <button type="button" onClick={() => onClose()}>
            Cancel
          </button>
          <button type="submit" class="primary">
            Confirm
          </button>
        </div>
      </form>
    </Modal>
  );
}
