// Sign-in: an access key of `[[auth.access_keys]]`. The secret is checked by a signed call
// (GetCallerIdentity) and then kept in this tab only.
import { useState } from "preact/hooks";
import type { Credentials } from "./api";
import { region } from "./api";
import { ErrorAlert, useAction } from "./ui";

export function SignIn({ onSignIn }: { onSignIn: (c: Credentials) => Promise<void> }) {
  const [accessKeyId, setAccessKeyId] = useState("");
  const [secretAccessKey, setSecretAccessKey] = useState("");
  const { busy, error, run } = useAction();

  function submit(e: Event) {
    e.preventDefault();
    run(() => onSignIn({ accessKeyId: accessKeyId.trim(), secretAccessKey }));
  }

  return (
    <main class="sign-in">
      <h1>hsm-kms console</h1>
      <p>
        Sign in with an access key that hsm-kms knows (<code>[[auth.access_keys]]</code> in its
        configuration; <code>hsm-kms dev</code> writes one to <code>aws.env</code>). Every action
        is an AWS KMS request signed in this tab, authorized and audited as the key's principal.
      </p>
      <form onSubmit={submit}>
        <label for="access-key-id">Access key ID</label>
        <input
          id="access-key-id"
          name="access-key-id"
          autocomplete="username"
          required
          value={accessKeyId}
          onInput={(e) => setAccessKeyId(e.currentTarget.value)}
        />
        <label for="secret-access-key">Secret access key</label>
        <input
          id="secret-access-key"
          name="secret-access-key"
          type="password"
          autocomplete="current-password"
          required
          value={secretAccessKey}
          onInput={(e) => setSecretAccessKey(e.currentTarget.value)}
        />
        <p class="hint">
          Region: <strong>{region()}</strong>. The secret stays in this browser tab (session
          storage) until you sign out or close the tab.
        </p>
        <button type="submit" class="primary" disabled={busy}>
          {busy ? "Signing in…" : "Sign in"}
        </button>
      </form>
      <ErrorAlert error={error} context="Sign in" />
    </main>
  );
}
