// Small pieces every page uses: the error alert, a modal dialog, a menu of actions, dates.
import type { ComponentChildren } from "preact";
import { useEffect, useRef, useState } from "preact/hooks";
import { describe } from "./api";

/// An error as AWS's console shows it: the exception name and the server's message, next to
/// the action that failed.
export function ErrorAlert({ error, context }: { error: unknown; context?: string }) {
  if (!error) return null;
  const { exception, message } = describe(error);
  return (
    <div class="alert error" role="alert">
      <strong>{context ? `${context} failed: ` : ""}{exception}</strong>
      {message ? <p>{message}</p> : null}
    </div>
  );
}

export function Success({ children }: { children: ComponentChildren }) {
  return (
    <div class="alert success" role="status">
      {children}
    </div>
  );
}

/// Runs `action`, keeping its error and whether it runs, for a button and its alert.
export function useAction() {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState<unknown>(null);
  async function run<T>(action: () => Promise<T>): Promise<T | undefined> {
    setBusy(true);
    setError(null);
    try {
      return await action();
    } catch (e) {
      setError(e);
      return undefined;
    } finally {
      setBusy(false);
    }
  }
  return { busy, error, setError, run };
}

/// A modal dialog (the platform's <dialog>: focus is kept inside, Escape closes it).
export function Modal({
  title,
  onClose,
  children,
}: {
  title: string;
  onClose: () => void;
  children: ComponentChildren;
}) {
  const ref = useRef<HTMLDialogElement>(null);
  useEffect(() => {
    const d = ref.current;
    if (d && !d.open) d.showModal();
    return () => d?.close();
  }, []);
  const id = `dialog-${title.replace(/\W+/g, "-").toLowerCase()}`;
  return (
    <dialog ref={ref} aria-labelledby={id} onClose={onClose} onCancel={onClose}>
      <h2 id={id}>{title}</h2>
      {children}
    </dialog>
  );
}

/// A button that opens a list of actions ("Key actions", "Key store actions").
export function ActionsMenu({
  label,
  items,
  disabled,
}: {
  label: string;
  items: { label: string; onSelect: () => void; disabled?: boolean }[];
  disabled?: boolean;
}) {
  const [open, setOpen] = useState(false);
  const id = `menu-${label.replace(/\W+/g, "-").toLowerCase()}`;
  return (
    <div
      class="menu"
      onKeyDown={(e) => {
        // Escape closes the menu, as a menu does.
        if (e.key === "Escape" && open) {
          e.stopPropagation();
          setOpen(false);
        }
      }}
    >
      <button
        type="button"
        aria-haspopup="true"
        aria-expanded={open}
        aria-controls={id}
        disabled={disabled}
        onClick={() => setOpen(!open)}
      >
        {label} <span aria-hidden="true">▾</span>
      </button>
      {open ? (
        <ul id={id} class="menu-items" aria-label={label}>
          {items.map((item) => (
            <li key={item.label}>
              <button
                type="button"
                disabled={item.disabled}
                onClick={() => {
                  setOpen(false);
                  item.onSelect();
                }}
              >
                {item.label}
              </button>
            </li>
          ))}
        </ul>
      ) : null}
    </div>
  );
}

export function formatDate(d?: Date | number | string): string {
  if (d === undefined || d === null || d === "") return "-";
  const date = d instanceof Date ? d : typeof d === "number" ? new Date(d * 1000) : new Date(d);
  return date.toLocaleString("en-US", {
    year: "numeric",
    month: "short",
    day: "numeric",
    hour: "2-digit",
    minute: "2-digit",
    second: "2-digit",
    timeZoneName: "short",
  });
}

/// A heading and the page's actions beside it.
export function PageHeader({ title, children }: { title: string; children?: ComponentChildren }) {
  return (
    <div class="page-header">
      <h1>{title}</h1>
      <div class="page-actions">{children}</div>
    </div>
  );
}

/// Polls `tick` every `ms` while `active`.
export function usePoll(active: boolean, ms: number, tick: () => void) {
  const saved = useRef(tick);
  saved.current = tick;
  useEffect(() => {
    if (!active) return;
    const t = setInterval(() => saved.current(), ms);
    return () => clearInterval(t);
  }, [active, ms]);
}

export interface TagDraft {
  key: string;
  value: string;
}

/// Rows of Tag key and Tag value, with Add tag and Remove tag (Create key, a key's Tags tab).
export function TagEditor({ tags, onChange }: { tags: TagDraft[]; onChange: (tags: TagDraft[]) => void }) {
  const set = (i: number, change: Partial<TagDraft>) => onChange(tags.map((t, j) => (j === i ? { ...t, ...change } : t)));
  return (
    <>
      {tags.map((t, i) => (
        <div class="tag-row" key={i}>
          <label for={`tag-key-${i}`}>Tag key</label>
          <input id={`tag-key-${i}`} value={t.key} onInput={(e) => set(i, { key: e.currentTarget.value })} />
          <label for={`tag-value-${i}`}>Tag value</label>
          <input id={`tag-value-${i}`} value={t.value} onInput={(e) => set(i, { value: e.currentTarget.value })} />
          <button
            type="button"
            aria-label={`Remove tag ${t.key || i + 1}`}
            onClick={() => onChange(tags.filter((_, j) => j !== i))}
          >
            Remove tag
          </button>
        </div>
      ))}
      <button type="button" onClick={() => onChange([...tags, { key: "", value: "" }])}>
        Add tag
      </button>
    </>
  );
}

/// A form's Cancel and submit buttons.
export function FormButtons({ onCancel, busy, submit }: { onCancel: () => void; busy: boolean; submit: string }) {
  return (
    <div class="buttons">
      <button type="button" onClick={onCancel}>
        Cancel
      </button>
      <button type="submit" class="primary" disabled={busy}>
        {submit}
      </button>
    </div>
  );
}
