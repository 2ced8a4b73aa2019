// The Key actions menu (Enable, Disable, Schedule key deletion, Cancel key deletion), on the
// keys table and on a key's details page.
import {
  CancelKeyDeletionCommand,
  DisableKeyCommand,
  EnableKeyCommand,
  type KeyMetadata,
  ScheduleKeyDeletionCommand,
} from "@aws-sdk/client-kms";
import { useState } from "preact/hooks";
import type { Api } from "./api";
import { ActionsMenu, ErrorAlert, Modal, Success, useAction } from "./ui";

export function KeyActions({
  api,
  keyMeta,
  onChanged,
}: {
  api: Api;
  keyMeta: KeyMetadata | null;
  onChanged: () => void;
}) {
  const [scheduling, setScheduling] = useState(false);
  const [notice, setNotice] = useState<string | null>(null);
  const action = useAction();
  const state = keyMeta?.KeyState ?? "";
  const KeyId = keyMeta?.KeyId;

  async function act(label: string, send: () => Promise<unknown>) {
    setNotice(null);
    const done = await action.run(send);
    if (done) setNotice(`${label}: done.`);
    onChanged();
  }

  return (
    <div class="key-actions">
      <ActionsMenu
        label="Key actions"
        disabled={!keyMeta}
        items={[
          {
            label: "Enable",
            disabled: state !== "Disabled",
            onSelect: () => act("Enable", () => api.kms.send(new EnableKeyCommand({ KeyId }))),
          },
          {
            label: "Disable",
            disabled: state !== "Enabled",
            onSelect: () => act("Disable", () => api.kms.send(new DisableKeyCommand({ KeyId }))),
          },
          {
            label: "Schedule key deletion",
            disabled: state === "PendingDeletion",
            onSelect: () => setScheduling(true),
          },
          {
            label: "Cancel key deletion",
            disabled: state !== "PendingDeletion",
            onSelect: () =>
              act("Cancel key deletion", () => api.kms.send(new CancelKeyDeletionCommand({ KeyId }))),
          },
        ]}
      />
      {notice ? <Success>{notice}</Success> : null}
      <ErrorAlert error={action.error} context="Key action" />
      {scheduling && keyMeta ? (
        <ScheduleDeletion
          api={api}
          keyMeta={keyMeta}
          onClose={(message) => {
            setScheduling(false);
            if (message) setNotice(message);
            onChanged();
          }}
        />
      ) : null}
    </div>
  );
}

function ScheduleDeletion({
  api,
  keyMeta,
  onClose,
}: {
  api: Api;
  keyMeta: KeyMetadata;
  onClose: (message?: string) => void;
}) {
  const [days, setDays] = useState(30);
  const [confirm, setConfirm] = useState(false);
  const { busy, error, run } = useAction();
  const valid = Number.isInteger(days) && days >= 7 && days <= 30;

  async function submit(e: Event) {
    e.preventDefault();
    const done = await run(() =>
      api.kms.send(new ScheduleKeyDeletionCommand({ KeyId: keyMeta.KeyId, PendingWindowInDays: days })),
    );
    if (done) onClose(`Key ${keyMeta.KeyId} is pending deletion.`);
  }

  return (
    <Modal title="Schedule key deletion" onClose={() => onClose()}>
      <form onSubmit={submit}>
        <div class="alert warning" role="note">
          <strong>Deleting a KMS key is destructive and potentially dangerous.</strong> Once the key and
          its key material in the HSM are deleted, all data encrypted under it cannot be decrypted.
          During the waiting period the key cannot be used, and you can cancel its deletion.
        </div>
        <label for="waiting-period">Waiting period (in days)</label>
        <input
          id="waiting-period"
          type="number"
          min={7}
          max={30}
          required
          value={days}
          aria-describedby="waiting-hint"
          onInput={(e) => setDays(Number(e.currentTarget.value))}
        />
        <p class="hint" id="waiting-hint">
          Enter a waiting period between 7 and 30 days.
        </p>
        <p>
          Key: <code>{keyMeta.KeyId}</code>
        </p>
        <label class="check">
          <input type="checkbox" checked={confirm} onChange={(e) => setConfirm(e.currentTarget.checked)} />
          Confirm you want to schedule this key for deletion in {valid ? days : "…"} days.
        </label>
        <ErrorAlert error={error} context="Schedule key deletion" />
        <div class="buttons">
          <button type="button" onClick={() => onClose()}>
            Cancel
          </button>
          <button type="submit" class="danger" disabled={busy || !confirm || !valid}>
            Schedule deletion
          </button>
        </div>
      </form>
    </Modal>
  );
}
