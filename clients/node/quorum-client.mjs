// Quorum from Node.js: validate against the published JSON Schemas, sign (RFC 8785 + HMAC-SHA256),
// submit on the agency's intake stream, wait for the answer. The recipe is README "Accountability" /
// broker/signing.py; clients/vectors.json holds the signatures every client must reproduce.
import { createHash, createHmac, randomBytes, randomUUID } from "node:crypto";
import { readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import Ajv2020 from "ajv/dist/2020.js";
import addFormats from "ajv-formats";
import canonicalize from "canonicalize";
import Redis from "ioredis";

const HERE = dirname(fileURLToPath(import.meta.url));
// The published schemas (python -m quorum.schemas.export); QUORUM_SCHEMA_DIR points elsewhere if this folder
// is copied out of the repository.
const SCHEMA_DIR = process.env.QUORUM_SCHEMA_DIR || join(HERE, "..", "..", "schemas", "json");

export class InvalidRequest extends Error {
  constructor(problems) {
    super(problems.join("; "));
    this.name = "InvalidRequest";
    this.problems = problems;
  }
}

let validators;
function schemaValidators() {
  if (!validators) {
    // Strict mode, no extra flags: the published schemas pass it (draft 2020-12, formats from ajv-formats).
    const ajv = new Ajv2020({ strict: true, allErrors: true });
    addFormats(ajv);
    const load = (name) => JSON.parse(readFileSync(join(SCHEMA_DIR, name), "utf8"));
    validators = {
      request: ajv.compile(load("probe-request.schema.json")),
      result: ajv.compile(load("result.schema.json")),
    };
  }
  return validators;
}

/** Throws InvalidRequest when doc breaks probe-request.schema.json. */
export function validateRequest(doc) {
  const v = schemaValidators().request;
  if (!v(doc)) {
    throw new InvalidRequest(v.errors.slice(0, 5).map((e) => `${e.instancePath || "(root)"}: ${e.message}`));
  }
}

/** The payload as signed: image.data_b64 replaced by image.sha256, in RFC 8785 form (a Buffer, UTF-8). */
export function canonicalPayload(doc) {
  const obj = { ...doc };
  const image = obj.image;
  if (image && typeof image === "object" && typeof image.data_b64 === "string") {
    if (!/^[A-Za-z0-9+/]*={0,2}$/.test(image.data_b64) || image.data_b64.length % 4 !== 0) {
      throw new InvalidRequest(["image.data_b64 is not valid base64"]);
    }
    const { data_b64, ...rest } = image;
    obj.image = { ...rest, sha256: createHash("sha256").update(Buffer.from(data_b64, "base64")).digest("hex") };
  }
  // (An integer literal beyond 2**53 - 1 reads here as a double, 1e21 alike: the gateway, which tells
  // them apart, refuses the former as INVALID_MESSAGE. No request this client builds holds one.)
  for (const n of numbers(obj)) {
    if (!Number.isFinite(n)) throw new InvalidRequest([`${n} has no canonical form (RFC 8785)`]);
  }
  return Buffer.from(canonicalize(obj), "utf8");
}

function* numbers(v) {
  if (typeof v === "number") yield v;
  else if (v && typeof v === "object") for (const x of Object.values(v)) yield* numbers(x);
}

/** The intake entry's fields for payload (JSON text of an object). */
export function sign(secret, payload, { timestamp, nonce } = {}) {
  const ts = String(timestamp ?? Math.floor(Date.now() / 1000));
  const n = nonce ?? randomBytes(18).toString("base64url");
  const msg = Buffer.concat([Buffer.from(`quorum-v1\n${ts}\n${n}\n`, "ascii"), canonicalPayload(JSON.parse(payload))]);
  const signature = createHmac("sha256", Buffer.from(secret, "utf8")).update(msg).digest("hex");
  return { payload, timestamp: ts, nonce: n, signature };
}

/** A probe request document. image: a Buffer, or "probes/<sha256>" for an image already stored. */
export function buildRequest(agencyId, userId, image, opts) {
  const doc = {
    schema_version: 1,
    request_id: opts.requestId ?? randomUUID().replaceAll("-", ""),
    agency_id: agencyId,
    user_id: userId,
    case_number: opts.caseNumber,
    offence_code: opts.offenceCode,
    purpose: opts.purpose,
    image: typeof image === "string" ? { key: image } : { data_b64: image.toString("base64") },
    candidates: opts.candidates ?? 250,
  };
  if (opts.faceIndex !== undefined && opts.faceIndex !== null) doc.face_index = opts.faceIndex;
  return doc;
}

function log(event, fields) {
  // One JSON line per event on stderr (structured, like the services' logs).
  process.stderr.write(JSON.stringify({ ts: new Date().toISOString(), logger: "quorum-client", event, ...fields }) + "\n");
}

export class QuorumClient {
  /** redisUrl logs in as the agency's Redis ACL user: redis://agency-<id>:<password>@host:port/0 */
  constructor(redisUrl, agencyId, userId, secret) {
    // No ready check (INFO) and no retries on a refused login: the agency's ACL user may run only
    // XADD, XREAD, GET, MGET, PING and XRANGE on its own keys.
    this.redis = new Redis(redisUrl, { enableReadyCheck: false, lazyConnect: true, maxRetriesPerRequest: 1 });
    this.agencyId = agencyId;
    this.userId = userId;
    this.secret = secret;
  }

  /** Log in (a wrong password or a disabled user fails here) and check the connection. */
  async connect() {
    await this.redis.connect();
    await this.redis.ping();
  }

  async close() {
    this.redis.disconnect();
  }

  /** Validate (throws InvalidRequest, nothing sent), sign and XADD; returns { requestId, entryId }. */
  async submitDoc(doc) {
    validateRequest(doc);
    const payload = JSON.stringify(doc);
    const fields = sign(this.secret, payload);
    const entryId = await this.redis.xadd(
      `quorum:intake:${this.agencyId}`,
      "*",
      ...Object.entries(fields).flat(),
    );
    log("submitted", { agency: this.agencyId, request_id: doc.request_id, entry_id: entryId });
    return { requestId: doc.request_id, entryId };
  }

  async submit(image, opts) {
    return this.submitDoc(buildRequest(this.agencyId, this.userId, image, opts));
  }

  /** The published result (GET quorum:result:<agency>:<id>) or an error on the results stream naming
   * the intake entry (refusals decided before the request id is trusted are only there). */
  async wait(requestId, entryId, timeoutMs = 300_000) {
    const key = `quorum:result:${this.agencyId}:${requestId}`;
    const stream = `quorum:results:${this.agencyId}`;
    let ms = Number(entryId.split("-")[0]);
    // A stream pushed into the future (XADD <id>) gives later entries future ids, while answers keep
    // Redis's clock: read them from 5 minutes ago.
    if (ms > Date.now() + 300_000) ms = Date.now() - 300_000;
    let last = `${Math.max(ms - 1, 0)}-0`;
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const raw = await this.redis.get(key);
      if (raw) return this.answer(requestId, JSON.parse(raw));
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new Error(`no answer to ${requestId} in ${timeoutMs / 1000} s`);
      const resp = await this.redis.xread("COUNT", 500, "BLOCK", Math.max(Math.min(remaining, 1000), 1), "STREAMS", stream, last);
      for (const [, entries] of resp || []) {
        for (const [id, flat] of entries) {
          last = id;
          const f = {};
          for (let i = 0; i < flat.length; i += 2) f[flat[i]] = flat[i + 1];
          if (f.type !== "error") continue;
          const result = JSON.parse(f.payload);
          if (result.stream_entry_id === entryId) return this.answer(requestId, result);
        }
      }
    }
  }

  answer(requestId, result) {
    const v = schemaValidators().result;
    if (!v(result)) log("result_off_schema", { request_id: requestId, errors: v.errors.slice(0, 3) });
    log("answered", {
      agency: this.agencyId,
      request_id: requestId,
      type: result.type,
      code: result.code ?? null,
      candidates: (result.candidates || []).length,
    });
    return result;
  }
}
