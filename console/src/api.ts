// The console's only way to the server: AWS KMS calls to hsm-kms's AWS front (this page's
// origin), signed here with SigV4 by the AWS SDK for JavaScript v3. hsm-kms's own operations
// (GetCallerIdentity, DescribeCustomKeyStoreHealth, ListKeyAuditEvents) are the same
// protocol under the target prefix `HsmKms.`, signed with the SDK's signer.
import { KMSClient } from "@aws-sdk/client-kms";
import { Sha256 } from "@smithy/core/checksum";
import { SignatureV4 } from "@smithy/signature-v4";

export interface Credentials {
  accessKeyId: string;
  secretAccessKey: string;
}

/// An error as the server answered it: the AWS exception name and message.
export class ApiError extends Error {
  constructor(
    public readonly exception: string,
    message: string,
  ) {
    super(message);
  }
}

/// The exception name and message of anything a call threw.
export function describe(e: unknown): { exception: string; message: string } {
  if (e instanceof ApiError) return { exception: e.exception, message: e.message };
  if (e instanceof Error) {
    // The SDK's exceptions carry the server's __type as their name.
    const name = e.name && e.name !== "Error" ? e.name : "Error";
    return { exception: name, message: e.message };
  }
  return { exception: "Error", message: String(e) };
}

/// The region this hsm-kms serves, as the server wrote it into the page.
export function region(): string {
  const meta = document.querySelector('meta[name="hsm-kms-region"]');
  return meta?.getAttribute("content") ?? "us-east-1";
}

export class Api {
  readonly kms: KMSClient;
  private readonly signer: SignatureV4;

  constructor(credentials: Credentials) {
    const creds = {
      accessKeyId: credentials.accessKeyId,
      secretAccessKey: credentials.secretAccessKey,
    };
    this.kms = new KMSClient({
      region: region(),
      endpoint: location.origin,
      credentials: creds,
      // Throttled calls are retried with back-off, as any SDK client does.
      maxAttempts: 3,
    });
    this.signer = new SignatureV4({
      service: "kms",
      region: region(),
      credentials: creds,
      sha256: Sha256,
    });
  }

  /// One of hsm-kms's own operations (target `HsmKms.<operation>`).
  async own<T>(operation: string, input: object): Promise<T> {
    const url = new URL("/", location.origin);
    const body = JSON.stringify(input);
    const signed = await this.signer.sign({
      method: "POST",
      protocol: url.protocol,
      hostname: url.hostname,
      port: url.port ? Number(url.port) : undefined,
      path: "/",
      query: {},
      headers: {
        host: url.host,
        "content-type": "application/x-amz-json-1.1",
        "x-amz-target": `HsmKms.${operation}`,
      },
      body,
    });
    const headers = { ...signed.headers };
    // The browser sends Host itself (the same value).
    delete headers.host;
    const response = await fetch(url, { method: "POST", headers, body, credentials: "omit" });
    const text = await response.text();
    let json: Record<string, unknown> = {};
    try {
      json = text ? JSON.parse(text) : {};
    } catch {
      throw new ApiError("Error", `HTTP ${response.status}: ${text.slice(0, 200)}`);
    }
    if (!response.ok) {
      const type = String(json.__type ?? `HTTP ${response.status}`);
      throw new ApiError(type.split("#").pop() ?? type, String(json.message ?? ""));
    }
    return json as T;
  }
}

/// Every item of a paginated AWS list operation: `page` asks for one page after `marker`
/// and says its items and the next marker (none on the last page).
export async function everyPage<T>(
  page: (marker: string | undefined) => Promise<{ items?: T[]; next?: string }>,
): Promise<T[]> {
  const all: T[] = [];
  let marker: string | undefined;
  do {
    const p = await page(marker);
    all.push(...(p.items ?? []));
    marker = p.next;
  } while (marker);
  return all;
}

export interface CallerIdentity {
  Arn: string;
  Account: string;
  Region: string;
}

export interface StoreHealth {
  CustomKeyStoreId: string;
  CustomKeyStoreName: string;
  CloudHsmClusterId: string;
  ConnectionState: string;
  ConnectionErrorCode?: string;
  Health: string;
  Requests: number;
  Throttled: number;
  HsmErrors: number;
  Sessions: number;
  SessionsInUse: number;
}

export interface HealthResponse {
  CustomKeyStores?: StoreHealth[];
  Replica: string;
  CountingSinceDate?: number;
}

export interface AuditEvent {
  EventTime: string;
  RequestId: string;
  Principal?: string;
  Source?: string;
  Operation: string;
  Outcome: string;
  ErrorCode?: string;
}

export interface AuditResponse {
  KeyId: string;
  Events?: AuditEvent[];
  Truncated?: boolean;
}
