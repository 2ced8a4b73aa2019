// The console in a real browser (Debian's Chromium, driven by playwright-core), against a
// real hsm-kms that tests/console.rs started. Each test walks one procedure as an operator
// would (by the controls' accessible names), then checks the result through the AWS SDK.
// CONSOLE_PHASE=dev: every procedure; CONSOLE_PHASE=tls: once over TLS under `serve`.
import assert from "node:assert/strict";
import { mkdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { after, before, test } from "node:test";
import {
  CreateGrantCommand,
  CreateKeyCommand,
  DescribeCustomKeyStoresCommand,
  DescribeKeyCommand,
  EncryptCommand,
  GetKeyPolicyCommand,
  KMSClient,
  ListAliasesCommand,
  ListGrantsCommand,
  ListResourceTagsCommand,
  ConnectCustomKeyStoreCommand,
} from "@aws-sdk/client-kms";
import { chromium } from "playwright-core";

const env = process.env;
const phase = env.CONSOLE_PHASE ?? "dev";
const consoleUrl = env.CONSOLE_URL;
assert.ok(consoleUrl, "CONSOLE_URL is not set: tests/console.rs runs these tests");
const origin = new URL(consoleUrl).origin;
const shots = env.SCREENSHOT_DIR ?? "screenshots";
mkdirSync(shots, { recursive: true });
const axeSource = readFileSync(createRequire(import.meta.url).resolve("axe-core/axe.min.js"), "utf8");

const kms = new KMSClient({
  endpoint: env.AWS_ENDPOINT_URL_KMS,
  region: env.AWS_REGION,
  credentials: { accessKeyId: env.AWS_ACCESS_KEY_ID, secretAccessKey: env.AWS_SECRET_ACCESS_KEY },
});

let browser;
let context;
let page;
// Requests to anywhere but the page's origin, and Content-Security-Policy violations.
const foreign = [];
const violations = [];

before(async () => {
  browser = await chromium.launch({
    executablePath: env.CHROMIUM ?? "/usr/bin/chromium",
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  // The TLS phase's certificate is the test CA's.
  context = await browser.newContext({ ignoreHTTPSErrors: true, viewport: { width: 1280, height: 900 } });
  await context.addInitScript(() => {
    window.__violations = [];
    document.addEventListener("securitypolicyviolation", (e) =>
      window.__violations.push(`${e.violatedDirective}: ${e.blockedURI}`),
    );
  });
  page = await context.newPage();
  page.setDefaultTimeout(20_000);
  page.on("request", (r) => {
    if (!r.url().startsWith(origin)) foreign.push(r.url());
  });
  page.on("console", (m) => {
    if (/Content Security Policy/i.test(m.text())) violations.push(m.text());
  });
});

after(async () => {
  await browser?.close();
});

// ---------------------------------------------------------------- helpers

const checkedDialogs = new Set();

async function axeCheck(where) {
  await page.evaluate(axeSource);
  const result = await page.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
  const serious = result.violations
    .filter((v) => v.impact === "serious" || v.impact === "critical")
    .map((v) => `${v.id} (${v.impact}): ${v.help} at ${v.nodes.map((n) => n.target.join(" ")).join(", ")}`);
  assert.deepEqual(serious, [], `accessibility violations on ${where}`);
}

async function shot(name) {
  await page.screenshot({ path: `${shots}/${phase}-${name}.png`, fullPage: true });
}

const nav = (name) => page.getByRole("navigation", { name: "Key Management Service" }).getByRole("link", { name });
const button = (name) => page.getByRole("button", { name, exact: true });

async function menu(label, item) {
  await button(label).click();
  await button(item).click();
}

async function signIn(id, secret) {
  await page.getByLabel("Access key ID").fill(id);
  await page.getByLabel("Secret access key").fill(secret);
  await button("Sign in").click();
}

async function alertText() {
  const alert = page.getByRole("alert").first();
  await alert.waitFor();
  return alert.innerText();
}

/// Waits until `check` returns a truthy value (the SDK's view of a change settling).
async function eventually(check, what, ms = 20_000) {
  const until = Date.now() + ms;
  let last;
  while (Date.now() < until) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  assert.fail(`${what} did not happen: ${last}`);
}

async function storeNamed(name) {
  const out = await kms.send(new DescribeCustomKeyStoresCommand({}));
  return out.CustomKeyStores.find((s) => s.CustomKeyStoreName === name);
}

async function row(text) {
  const r = page.getByRole("row").filter({ hasText: text });
  await r.first().waitFor();
  return r.first();
}

async function selectStore(name) {
  await page.getByRole("radio", { name: `Select ${name}`, exact: true }).check();
}

async function createStore(name, cluster, password) {
  await button("Create key store").click();
  const dialog = page.getByRole("dialog", { name: "Create key store" });
  await dialog.getByLabel("Key store name").fill(name);
  await dialog.getByLabel("AWS CloudHSM cluster ID").fill(cluster);
  await dialog.getByLabel("Trust anchor certificate").setInputFiles(env.TRUST_ANCHOR_FILE);
  await dialog.getByLabel("kmsuser password").fill(password);
  if (!checkedDialogs.has("create key store")) {
    checkedDialogs.add("create key store");
    await axeCheck("the create key store dialog");
  }
  await dialog.getByRole("button", { name: "Create", exact: true }).click();
  return dialog;
}

async function keyArn(alias) {
  const out = await kms.send(new ListAliasesCommand({}));
  const a = out.Aliases.find((x) => x.AliasName === alias);
  assert.ok(a, `${alias} does not exist`);
  return (await kms.send(new DescribeKeyCommand({ KeyId: a.TargetKeyId }))).KeyMetadata;
}

async function createKeyThroughWizard(storeName, { alias, description, tag, admin, user } = {}) {
  await page.getByRole("link", { name: "Create key", exact: true }).click();
  await page.getByRole("heading", { name: "Configure key" }).waitFor();
  await button("Advanced options").click();
  await page.getByRole("radio", { name: "AWS CloudHSM key store", exact: true }).check();
  await button("Next").click();
  await page.getByRole("heading", { name: "Choose AWS CloudHSM key store" }).waitFor();
  await page.getByRole("radio", { name: new RegExp(`^${storeName} `) }).check();
  await button("Next").click();
  if (alias) await page.getByLabel("Alias", { exact: true }).fill(alias);
  if (description) await page.getByLabel("Description", { exact: true }).fill(description);
  if (tag) {
    await button("Add tag").click();
    await page.getByLabel("Tag key", { exact: true }).fill(tag[0]);
    await page.getByLabel("Tag value", { exact: true }).fill(tag[1]);
  }
  await button("Next").click();
  if (admin) {
    await page.getByLabel("Key administrators", { exact: true }).fill(admin);
    await page.getByLabel("Allow key administrators to delete this key").uncheck();
  }
  await button("Next").click();
  if (user) await page.getByLabel("Key users", { exact: true }).fill(user);
  await button("Next").click();
  await page.getByRole("heading", { name: "Review" }).waitFor();
}

// ---------------------------------------------------------------- the dev instance

if (phase === "dev") {
  let renamedStoreId;
  let key; // the KeyMetadata of the key made through the wizard

  test("the sign-in page is accessible and shows a refused secret as the server says it", async () => {
    const response = await page.goto(consoleUrl);
    const csp = response.headers()["content-security-policy"];
    assert.match(csp, /script-src 'self'/);
    assert.match(csp, /connect-src 'self'/);
    assert.match(csp, /frame-ancestors 'none'/);
    await page.getByLabel("Access key ID").waitFor();
    await shot("sign-in");
    await axeCheck("the sign-in page");
    await signIn(env.AWS_ACCESS_KEY_ID, "not-the-secret-access-key-0123456789abcd");
    const text = await alertText();
    assert.match(text, /Sign in failed: InvalidSignatureException/);
    assert.equal(await page.evaluate(() => sessionStorage.length), 0, "a refused secret is not kept");
  });

  test("signs in; the principal and region show; the secret stays in the tab", async () => {
    await signIn(env.AWS_ACCESS_KEY_ID, env.AWS_SECRET_ACCESS_KEY);
    await page.getByTestId("principal").waitFor();
    assert.equal(await page.getByTestId("principal").innerText(), env.ROOT_ARN);
    assert.equal(await page.getByTestId("region").innerText(), env.AWS_REGION);
    const secret = env.AWS_SECRET_ACCESS_KEY;
    const where = await page.evaluate(() => ({
      local: JSON.stringify(localStorage),
      cookie: document.cookie,
      url: location.href,
      session: JSON.stringify(sessionStorage),
    }));
    assert.ok(!where.local.includes(secret), "the secret is in localStorage");
    assert.ok(!where.url.includes(secret), "the secret is in the URL");
    assert.equal(where.cookie, "");
    assert.deepEqual(await context.cookies(), []);
    assert.ok(where.session.includes(secret), "the tab keeps the secret in sessionStorage");
  });

  test("AWS CloudHSM key stores: the dev store is listed CONNECTED", async () => {
    await nav("AWS CloudHSM key stores").click();
    const dev = await row("cks-");
    await dev.getByText("CONNECTED").waitFor();
    await shot("keystores");
    await axeCheck("the key stores page");
  });

  test("Create key store: two stores created; a cluster already in use is refused in AWS's words", async () => {
    let dialog = await createStore("console-second", env.SECOND_CLUSTER_ID, env.SECOND_PASSWORD);
    await page.getByText("Created key store console-second").waitFor();
    const second = await storeNamed("console-second");
    assert.equal(second.ConnectionState, "DISCONNECTED");
    assert.equal(second.CloudHsmClusterId, env.SECOND_CLUSTER_ID);

    dialog = await createStore("console-again", env.SECOND_CLUSTER_ID, env.SECOND_PASSWORD);
    const refusal = await dialog.getByRole("alert").innerText();
    assert.match(refusal, /Create key store failed: CloudHsmClusterInUseException/);
    await dialog.getByRole("button", { name: "Cancel" }).click();
    assert.equal(await storeNamed("console-again"), undefined, "nothing half-done");

    await createStore("console-absent", env.ABSENT_CLUSTER_ID, env.SECOND_PASSWORD);
    await page.getByText("Created key store console-absent").waitFor();
  });

  test("Connect a store whose cluster is unreachable: FAILED, with the error code and what it means", async () => {
    await selectStore("console-absent");
    await menu("Key store actions", "Connect");
    const absent = await row("console-absent");
    await absent.getByText("CLUSTER_NOT_FOUND").waitFor();
    await absent.getByText(/cannot find a cluster with this cluster ID/).waitFor();
    assert.match(await alertText(), /Connecting console-absent failed: FAILED CLUSTER_NOT_FOUND/);
    const s = await storeNamed("console-absent");
    assert.equal(s.ConnectionState, "FAILED");
    assert.equal(s.ConnectionErrorCode, "CLUSTER_NOT_FOUND");
    await shot("keystore-failed");
  });

  test("Edit is refused while the store is connected, and the server's refusal is shown", async () => {
    await selectStore("console-second");
    await menu("Key store actions", "Edit");
    const dialog = page.getByRole("dialog", { name: "Edit key store" });
    // A new kmsuser password needs a disconnected store (a name alone AWS lets change).
    await dialog.getByLabel("kmsuser password").fill("Another-Passw0rd");
    // Connected behind the console's back, after it offered Edit.
    const id = (await storeNamed("console-second")).CustomKeyStoreId;
    await kms.send(new ConnectCustomKeyStoreCommand({ CustomKeyStoreId: id }));
    await eventually(async () => (await storeNamed("console-second"))?.ConnectionState === "CONNECTED", "connect");
    await dialog.getByRole("button", { name: "Save" }).click();
    assert.match(await dialog.getByRole("alert").innerText(), /Edit key store failed: CustomKeyStoreInvalidStateException/);
    await dialog.getByRole("button", { name: "Cancel" }).click();
    assert.equal((await storeNamed("console-second")).ConnectionState, "CONNECTED", "nothing changed");
    // Once the table knows, Edit is not offered for a connected store.
    await button("Refresh").click();
    await (await row("console-second")).getByText("CONNECTED").waitFor();
    await selectStore("console-second");
    await button("Key store actions").click();
    assert.equal(await button("Edit").isDisabled(), true);
    await button("Key store actions").click();
  });

  test("Disconnect, Edit (name), Connect: the table follows the state until it settles", async () => {
    await menu("Key store actions", "Disconnect");
    await (await row("console-second")).getByText("DISCONNECTED").waitFor();
    assert.equal((await storeNamed("console-second")).ConnectionState, "DISCONNECTED");
    await menu("Key store actions", "Edit");
    const dialog = page.getByRole("dialog", { name: "Edit key store" });
    await dialog.getByLabel("Key store name").fill("console-renamed");
    await dialog.getByRole("button", { name: "Save" }).click();
    await page.getByText("Saved key store console-renamed").waitFor();
    const renamed = await storeNamed("console-renamed");
    assert.ok(renamed, "renamed through the console");
    renamedStoreId = renamed.CustomKeyStoreId;
    await selectStore("console-renamed");
    await menu("Key store actions", "Connect");
    await (await row("console-renamed")).getByText("CONNECTED", { exact: true }).waitFor();
    await eventually(async () => (await storeNamed("console-renamed")).ConnectionState === "CONNECTED", "connected");
  });

  test("Create key: symmetric, AWS CloudHSM key store, alias, description, tags, administrators, users, review", async () => {
    await nav("Customer managed keys").click();
    await createKeyThroughWizard("console-renamed", {
      alias: "console-key",
      description: "made in the console",
      tag: ["team", "security"],
      admin: env.BOB_ARN,
      user: env.BOB_ARN,
    }).catch(async (e) => {
      await shot("create-key-failure");
      throw e;
    });
    const review = await page.getByLabel("Key policy", { exact: true }).inputValue();
    assert.ok(review.includes(env.BOB_ARN), "the review shows the key policy with the administrators");
    await shot("create-key-review");
    await axeCheck("the create key review");
    await button("Finish").click();
    await page.getByRole("heading", { name: "alias/console-key", level: 1 }).waitFor();

    key = await keyArn("alias/console-key");
    assert.equal(key.Origin, "AWS_CLOUDHSM");
    assert.equal(key.CustomKeyStoreId, renamedStoreId);
    assert.equal(key.CloudHsmClusterId, env.SECOND_CLUSTER_ID);
    assert.equal(key.Description, "made in the console");
    const tags = await kms.send(new ListResourceTagsCommand({ KeyId: key.KeyId }));
    assert.deepEqual(tags.Tags, [{ TagKey: "team", TagValue: "security" }]);
    const policy = JSON.parse((await kms.send(new GetKeyPolicyCommand({ KeyId: key.KeyId, PolicyName: "default" }))).Policy);
    const admins = policy.Statement.find((s) => s.Sid === "Allow access for Key Administrators");
    assert.deepEqual(admins.Principal.AWS, [env.BOB_ARN]);
    assert.ok(!admins.Action.includes("kms:ScheduleKeyDeletion"), "administrators may not delete it");
    const users = policy.Statement.find((s) => s.Sid === "Allow use of the key");
    assert.ok(users.Action.includes("kms:Decrypt"));
  });

  test("A disconnected store cannot be chosen for a new key", async () => {
    await nav("Customer managed keys").click();
    await page.getByRole("link", { name: "Create key", exact: true }).click();
    await button("Advanced options").click();
    await page.getByRole("radio", { name: "AWS CloudHSM key store", exact: true }).check();
    await button("Next").click();
    const failed = page.getByRole("radio", { name: /^console-absent / });
    await failed.waitFor();
    assert.equal(await failed.isDisabled(), true, "a FAILED store is offered");
    await button("Next").click();
    assert.match(await alertText(), /Choose a CONNECTED AWS CloudHSM key store/);
    await page.getByRole("link", { name: "Cancel" }).click();
  });

  test("Key details: general and cryptographic configuration", async () => {
    await page.goto(`${consoleUrl}#/keys/${key.KeyId}`);
    await page.getByRole("heading", { name: "General configuration" }).waitFor();
    assert.equal(await page.getByTestId("key-arn").innerText(), key.Arn);
    await page.getByTestId("key-policy").waitFor();
    await shot("key-details");
    await axeCheck("the key details page");
    await page.getByRole("tab", { name: "Cryptographic configuration" }).click();
    assert.equal(await page.getByTestId("origin").innerText(), "AWS CloudHSM");
    assert.equal(await page.getByTestId("store-id").innerText(), renamedStoreId);
    assert.equal(await page.getByTestId("cluster-id").innerText(), env.SECOND_CLUSTER_ID);
    await page.getByText("console-renamed").waitFor();
    await axeCheck("the cryptographic configuration tab");
  });

  test("Key policy: a malformed document is refused with the server's error; a valid edit is saved", async () => {
    await page.getByRole("tab", { name: "Key policy" }).click();
    await button("Edit").click();
    await page.getByLabel("Key policy (JSON)").fill('{"Statement": [');
    await button("Save changes").click();
    assert.match(await alertText(), /Save key policy failed: MalformedPolicyDocumentException/);
    const current = JSON.parse((await kms.send(new GetKeyPolicyCommand({ KeyId: key.KeyId, PolicyName: "default" }))).Policy);
    current.Statement[0].Sid = "Enable IAM policies";
    await page.getByLabel("Key policy (JSON)").fill(JSON.stringify(current, null, 2));
    await button("Save changes").click();
    await page.getByText("Key policy saved.").waitFor();
    const saved = JSON.parse((await kms.send(new GetKeyPolicyCommand({ KeyId: key.KeyId, PolicyName: "default" }))).Policy);
    assert.equal(saved.Statement[0].Sid, "Enable IAM policies");
  });

  test("Tags: add, edit and remove", async () => {
    await page.getByRole("tab", { name: "Tags" }).click();
    await button("Edit tags").click();
    await button("Add tag").click();
    await page.getByLabel("Tag key", { exact: true }).nth(1).fill("env");
    await page.getByLabel("Tag value", { exact: true }).nth(1).fill("test");
    await page.getByLabel("Tag value", { exact: true }).nth(0).fill("secops");
    await button("Save changes").click();
    await page.getByRole("cell", { name: "secops" }).waitFor();
    const tags = async () =>
      Object.fromEntries(
        (await kms.send(new ListResourceTagsCommand({ KeyId: key.KeyId }))).Tags.map((t) => [t.TagKey, t.TagValue]),
      );
    assert.deepEqual(await tags(), { team: "secops", env: "test" });
    await button("Edit tags").click();
    await button("Remove tag team").click();
    await button("Save changes").click();
    await page.getByRole("cell", { name: "env" }).waitFor();
    await eventually(async () => JSON.stringify(await tags()) === JSON.stringify({ env: "test" }), "team removed");
  });

  test("Aliases: add and delete", async () => {
    await page.getByRole("tab", { name: "Aliases" }).click();
    await page.getByLabel("Alias", { exact: true }).fill("console-other");
    await button("Create alias").click();
    await page.getByRole("cell", { name: "alias/console-other", exact: true }).waitFor();
    assert.equal((await keyArn("alias/console-other")).KeyId, key.KeyId);
    await page.getByRole("button", { name: "Delete alias alias/console-other" }).click();
    await eventually(
      async () => !(await kms.send(new ListAliasesCommand({}))).Aliases.some((a) => a.AliasName === "alias/console-other"),
      "alias deleted",
    );
  });

  test("Grants: listed, and revoked", async () => {
    const grant = await kms.send(
      new CreateGrantCommand({ KeyId: key.KeyId, GranteePrincipal: env.BOB_ARN, Operations: ["Decrypt"], Name: "console-grant" }),
    );
    await page.getByRole("tab", { name: "Grants" }).click();
    await page.getByRole("cell", { name: "console-grant" }).waitFor();
    await page.getByRole("button", { name: `Revoke grant ${grant.GrantId}` }).click();
    await page.getByText("No grants.").waitFor();
    const left = await kms.send(new ListGrantsCommand({ KeyId: key.KeyId }));
    assert.deepEqual(left.Grants, []);
  });

  test("Disable: the key then refuses to encrypt; Enable brings it back", async () => {
    await menu("Key actions", "Disable");
    await page.getByText("Disable: done.").waitFor();
    assert.equal((await kms.send(new DescribeKeyCommand({ KeyId: key.KeyId }))).KeyMetadata.KeyState, "Disabled");
    await assert.rejects(
      kms.send(new EncryptCommand({ KeyId: key.KeyId, Plaintext: new TextEncoder().encode("x") })),
      (e) => e.name === "DisabledException",
    );
    await page.getByText("Disabled", { exact: true }).first().waitFor();
    await menu("Key actions", "Enable");
    await page.getByText("Enable: done.").waitFor();
    for (let i = 0; i < 3; i++) {
      await kms.send(new EncryptCommand({ KeyId: key.KeyId, Plaintext: new TextEncoder().encode("x") }));
    }
  });

  test("Schedule key deletion (7 to 30 days, with AWS's confirmation), then Cancel key deletion", async () => {
    await menu("Key actions", "Schedule key deletion");
    const dialog = page.getByRole("dialog", { name: "Schedule key deletion" });
    await dialog.getByLabel("Waiting period (in days)").fill("31");
    assert.equal(await dialog.getByRole("button", { name: "Schedule deletion" }).isDisabled(), true);
    await dialog.getByLabel("Waiting period (in days)").fill("7");
    assert.equal(await dialog.getByRole("button", { name: "Schedule deletion" }).isDisabled(), true, "needs the confirmation");
    await dialog.getByLabel("Confirm you want to schedule this key for deletion in 7 days.").check();
    await axeCheck("the schedule key deletion dialog");
    await dialog.getByRole("button", { name: "Schedule deletion" }).click();
    await page.getByText(/is pending deletion/).waitFor();
    const m = (await kms.send(new DescribeKeyCommand({ KeyId: key.KeyId }))).KeyMetadata;
    assert.equal(m.KeyState, "PendingDeletion");
    const days = (m.DeletionDate.getTime() - Date.now()) / 86_400_000;
    assert.ok(days > 6.9 && days <= 7.01, `deletion in ${days} days`);
    await menu("Key actions", "Cancel key deletion");
    await page.getByText("Cancel key deletion: done.").waitFor();
    assert.equal((await kms.send(new DescribeKeyCommand({ KeyId: key.KeyId }))).KeyMetadata.KeyState, "Disabled");
    await menu("Key actions", "Enable");
    await page.getByText("Enable: done.").waitFor();
  });

  test("Audit trail: who did what with the key", async () => {
    await page.getByRole("tab", { name: "Audit trail" }).click();
    const table = page.getByRole("table", { name: "Audit trail" });
    await table.getByRole("cell", { name: "ScheduleKeyDeletion", exact: true }).first().waitFor();
    await table.getByRole("cell", { name: "CancelKeyDeletion", exact: true }).first().waitFor();
    await table.getByRole("cell", { name: env.ROOT_ARN }).first().waitFor();
    await shot("key-audit");
    await axeCheck("the audit trail tab");
  });

  test("Customer managed keys: the column chooser, the filter and pages", async () => {
    for (let i = 0; i < 11; i++) {
      await kms.send(new CreateKeyCommand({ Description: `bulk key ${i}` }));
    }
    await nav("Customer managed keys").click();
    const table = page.getByRole("table", { name: "Customer managed keys" });
    await table.getByRole("row").nth(1).waitFor();
    assert.equal(await table.getByRole("columnheader", { name: "Custom key store ID" }).count(), 0);
    await button("Preferences").click();
    await page.getByRole("dialog", { name: "Preferences" }).getByLabel("Custom key store ID").check();
    await button("Confirm").click();
    await table.getByRole("columnheader", { name: "Custom key store ID" }).waitFor();
    await page.getByLabel("Filter keys").fill("console-key");
    await table.getByRole("cell", { name: renamedStoreId }).waitFor();
    assert.equal(await table.getByRole("row").count(), 2, "one key and the header");
    await page.getByLabel("Filter keys").fill("");
    await page.getByText("Page 1 of 2").waitFor();
    await shot("keys");
    await axeCheck("the keys page");
    await button("Next page").click();
    await page.getByText("Page 2 of 2").waitFor();
  });

  test("Key store health: the store's requests, throttles and HSM errors", async () => {
    await nav("Key store health").click();
    const r = await row("console-renamed");
    const requests = Number(await r.getByTestId("requests").innerText());
    assert.ok(requests >= 3, `${requests} requests counted for the store`);
    await r.getByText("HEALTHY").waitFor();
    await (await row("console-absent")).getByText("FAILED").waitFor();
    await shot("health");
    await axeCheck("the key store health page");
  });

  test("Delete key store: only when disconnected, with AWS's confirmation; a store with keys is refused", async () => {
    await nav("AWS CloudHSM key stores").click();
    await selectStore("console-absent");
    await button("Key store actions").click();
    assert.equal(await button("Delete").isDisabled(), true, "Delete offered for a FAILED store");
    await button("Disconnect").click();
    await (await row("console-absent")).getByText("DISCONNECTED").waitFor();
    await menu("Key store actions", "Delete");
    const dialog = page.getByRole("dialog", { name: "Delete key store" });
    assert.equal(await dialog.getByRole("button", { name: "Delete key store" }).isDisabled(), true);
    await dialog.getByLabel("Confirm that you want to delete this custom key store.").check();
    await axeCheck("the delete key store dialog");
    await dialog.getByRole("button", { name: "Delete key store" }).click();
    await page.getByText("Deleted key store console-absent").waitFor();
    assert.equal(await storeNamed("console-absent"), undefined);

    await selectStore("console-renamed");
    await menu("Key store actions", "Disconnect");
    await (await row("console-renamed")).getByText("DISCONNECTED").waitFor();
    await menu("Key store actions", "Delete");
    const again = page.getByRole("dialog", { name: "Delete key store" });
    await again.getByLabel("Confirm that you want to delete this custom key store.").check();
    await again.getByRole("button", { name: "Delete key store" }).click();
    assert.match(await again.getByRole("alert").innerText(), /Delete key store failed: CustomKeyStoreHasCMKsException/);
    await again.getByRole("button", { name: "Cancel" }).click();
    assert.ok(await storeNamed("console-renamed"), "the store with a key is still there");
  });

  test("Sign out forgets the secret; a principal without permission is refused, as an SDK would be", async () => {
    await button("Sign out").click();
    await page.getByLabel("Access key ID").waitFor();
    assert.equal(await page.evaluate(() => sessionStorage.length), 0);
    // Bob signs in with the keyboard alone.
    await page.locator("body").focus();
    await page.keyboard.press("Tab");
    await page.keyboard.type(env.BOB_ACCESS_KEY_ID);
    await page.keyboard.press("Tab");
    await page.keyboard.type(env.BOB_SECRET_ACCESS_KEY);
    await page.keyboard.press("Enter");
    await page.getByTestId("principal").waitFor();
    assert.equal(await page.getByTestId("principal").innerText(), env.BOB_ARN);
    assert.match(await alertText(), /Listing keys failed: AccessDeniedException/);
    await nav("Key store health").focus();
    await page.keyboard.press("Enter");
    assert.match(await alertText(), /Key store health failed: AccessDeniedException/);
    await shot("denied");
    await axeCheck("a refused page");
    await button("Sign out").click();
    await page.getByLabel("Access key ID").waitFor();
  });

  test("An injected inline script is blocked by the page's policy; nothing left the origin", async () => {
    assert.deepEqual(foreign, [], "requests to other origins");
    assert.deepEqual(violations, [], "policy violations during the walk");
    assert.deepEqual(await page.evaluate(() => window.__violations), []);
    // The attack: an inline script added to the page.
    const ran = await page.evaluate(() => {
      const s = document.createElement("script");
      s.textContent = "window.__injected = true";
      document.body.appendChild(s);
      return { added: document.body.contains(s), injected: window.__injected === true };
    });
    assert.equal(ran.added, true, "the script element was added");
    assert.equal(ran.injected, false, "the inline script ran");
    await eventually(async () => (await page.evaluate(() => window.__violations)).length > 0, "the violation report");
  });
}

// ---------------------------------------------------------------- TLS, under serve

if (phase === "tls") {
  test("over TLS: sign in, create and connect a store, create a key through the wizard", async () => {
    const response = await page.goto(consoleUrl);
    assert.match(response.headers()["content-security-policy"], /default-src 'none'/);
    assert.ok(consoleUrl.startsWith("https://"));
    await signIn(env.AWS_ACCESS_KEY_ID, env.AWS_SECRET_ACCESS_KEY);
    assert.equal(await page.getByTestId("principal").innerText(), env.ROOT_ARN);
    await nav("AWS CloudHSM key stores").click();
    await createStore("tls-store", env.SECOND_CLUSTER_ID, env.SECOND_PASSWORD);
    await page.getByText("Created key store tls-store").waitFor();
    await selectStore("tls-store");
    await menu("Key store actions", "Connect");
    await (await row("tls-store")).getByText("CONNECTED", { exact: true }).waitFor();
    await shot("keystores");
    await axeCheck("the key stores page over TLS");
    await nav("Customer managed keys").click();
    await createKeyThroughWizard("tls-store", { alias: "tls-key" });
    await button("Finish").click();
    await page.getByRole("heading", { name: "alias/tls-key", level: 1 }).waitFor();
    const key = await keyArn("alias/tls-key");
    assert.equal(key.Origin, "AWS_CLOUDHSM");
    assert.equal(key.CustomKeyStoreId, (await storeNamed("tls-store")).CustomKeyStoreId);
    assert.deepEqual(foreign, []);
    assert.deepEqual(violations, []);
  });
}
