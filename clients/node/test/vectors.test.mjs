// The shared signing vectors (clients/vectors.json): the Node client reproduces every canonical form
// and signature the server computes; and validation refuses a request that breaks the schema.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import { InvalidRequest, buildRequest, canonicalPayload, sign, validateRequest } from "../quorum-client.mjs";

const V = JSON.parse(readFileSync(new URL("../../vectors.json", import.meta.url), "utf8"));

for (const v of V.vectors) {
  test(`vector: ${v.name}`, () => {
    assert.equal(canonicalPayload(JSON.parse(v.payload)).toString("utf8"), v.canonical);
    const fields = sign(V.secret, v.payload, { timestamp: V.timestamp, nonce: V.nonce });
    assert.equal(fields.signature, v.signature);
  });
}

test("a request breaking the schema is refused before sending", () => {
  const doc = buildRequest("lasd", "inv-1", Buffer.from("x"), {
    caseNumber: "C-1",
    offenceCode: "PC211",
    purpose: "criminal-investigation",
    candidates: 0,
  });
  assert.throws(() => validateRequest(doc), InvalidRequest);
  doc.candidates = 10;
  validateRequest(doc);
});

test("numbers with no canonical form are refused", () => {
  assert.throws(() => canonicalPayload({ n: Number.POSITIVE_INFINITY }), InvalidRequest);
  assert.throws(() => canonicalPayload({ image: { data_b64: "@@ not base64" } }), InvalidRequest);
});
