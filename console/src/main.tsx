// The hsm-kms console: the AWS KMS console's custom key store and customer managed key
// pages, as one more client of hsm-kms's AWS front. The signed-in credentials live in this
// tab only (memory and sessionStorage); "Sign out" forgets them.
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import { Api, type CallerIdentity, type Credentials, region } from "./api";
import { CreateKey } from "./create-key";
import { Health } from "./health";
import { KeyDetails } from "./key-details";
import { Keys } from "./keys";
import { KeyStores } from "./keystores";
import { SignIn } from "./sign-in";

const SESSION = "hsm-kms-console-credentials";

export interface Session {
  api: Api;
  identity: CallerIdentity;
}

function stored(): Credentials | null {
  try {
    const text = sessionStorage.getItem(SESSION);
    return text ? (JSON.parse(text) as Credentials) : null;
  } catch {
    return null;
  }
}

function useRoute(): string {
  const [route, setRoute] = useState(location.hash.slice(1) || "/keys");
  useEffect(() => {
    const on = () => setRoute(location.hash.slice(1) || "/keys");
    addEventListener("hashchange", on);
    return () => removeEventListener("hashchange", on);
  }, []);
  return route;
}

function App() {
  const [session, setSession] = useState<Session | null>(null);
  const [restoring, setRestoring] = useState(() => stored() !== null);
  const route = useRoute();

  async function signIn(credentials: Credentials) {
    const api = new Api(credentials);
    const identity = await api.own<CallerIdentity>("GetCallerIdentity", {});
    sessionStorage.setItem(SESSION, JSON.stringify(credentials));
    setSession({ api, identity });
  }

  function signOut() {
    sessionStorage.removeItem(SESSION);
    setSession(null);
    location.hash = "";
  }

  // A reload of the tab keeps its sign-in (sessionStorage is this tab's alone).
  useEffect(() => {
    const credentials = stored();
    if (!credentials) return;
    signIn(credentials)
      .catch(() => sessionStorage.removeItem(SESSION))
      .finally(() => setRestoring(false));
  }, []);

  useEffect(() => {
    const title = pageTitle(route);
    document.title = `${title} - hsm-kms console`;
  }, [route]);

  if (restoring) return <p role="status">Signing in…</p>;
  if (!session) return <SignIn onSignIn={signIn} />;
  return (
    <>
      <header class="top">
        <span class="brand">hsm-kms</span>
        <span class="identity">
          Signed in as <strong data-testid="principal">{session.identity.Arn}</strong>
          <span class="region">
            Region <strong data-testid="region">{session.identity.Region || region()}</strong>
          </span>
        </span>
        <button type="button" onClick={signOut}>
          Sign out
        </button>
      </header>
      <div class="layout">
        <nav aria-label="Key Management Service">
          <ul>
            <li>
              <a href="#/keys" aria-current={route.startsWith("/keys") ? "page" : undefined}>
                Customer managed keys
              </a>
            </li>
            <li>
              <a
                href="#/keystores"
                aria-current={route.startsWith("/keystores") ? "page" : undefined}
              >
                AWS CloudHSM key stores
              </a>
            </li>
            <li>
              <a href="#/health" aria-current={route.startsWith("/health") ? "page" : undefined}>
                Key store health
              </a>
            </li>
          </ul>
        </nav>
        <main>
          <Page route={route} session={session} />
        </main>
      </div>
    </>
  );
}

function pageTitle(route: string): string {
  if (route.startsWith("/keystores")) return "AWS CloudHSM key stores";
  if (route === "/keys/create") return "Create key";
  if (route.startsWith("/keys/")) return "Key details";
  if (route.startsWith("/health")) return "Key store health";
  return "Customer managed keys";
}

function Page({ route, session }: { route: string; session: Session }) {
  if (route.startsWith("/keystores")) return <KeyStores api={session.api} />;
  if (route.startsWith("/health")) return <Health api={session.api} />;
  if (route === "/keys/create") return <CreateKey session={session} />;
  if (route.startsWith("/keys/")) {
    const id = decodeURIComponent(route.slice("/keys/".length));
    return <KeyDetails api={session.api} keyId={id} key={id} />;
  }
  return <Keys api={session.api} />;
}

const root = document.getElementById("app");
if (root) {
  root.textContent = "";
  render(<App />, root);
}
