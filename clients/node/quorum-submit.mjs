#!/usr/bin/env node
// quorum-submit: submit a probe from Node.js and print its answer, or sign a payload.
//
//   QUORUM_REDIS_URL=redis://agency-lasd:<redis password>@127.0.0.1:6390/0 QUORUM_AGENCY_SECRET=<secret> \
//     node quorum-submit.mjs submit probe.jpg --agency lasd --user inv-0042 --case 2026-001234 \
//       --offence PC211 --purpose criminal-investigation [--candidates N] [--face-index I] [--request-id ID]
//   node quorum-submit.mjs sign < payload.json   # the entry's fields as JSON (QUORUM_TIMESTAMP, QUORUM_NONCE fix them)
//
// Exit status: 0 a candidate list, 2 an error result (its code on stderr), 3 refused before sending
// (the request breaks the schema), 1 anything else.
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";

import { InvalidRequest, QuorumClient, buildRequest, sign, validateRequest } from "./quorum-client.mjs";

function env(name) {
  const v = process.env[name];
  if (!v) {
    process.stderr.write(`quorum-submit: set ${name}\n`);
    process.exit(1);
  }
  return v;
}

async function main() {
  const [command, ...rest] = process.argv.slice(2);
  if (command === "sign") {
    const ts = process.env.QUORUM_TIMESTAMP;
    const fields = sign(env("QUORUM_AGENCY_SECRET"), readFileSync(0, "utf8"), {
      timestamp: ts ? Number(ts) : undefined,
      nonce: process.env.QUORUM_NONCE || undefined,
    });
    process.stdout.write(JSON.stringify(fields) + "\n");
    return 0;
  }
  if (command !== "submit") {
    process.stderr.write("usage: quorum-submit.mjs submit IMAGE --agency A --user U --case C --offence O --purpose P | sign\n");
    return 1;
  }
  const { values, positionals } = parseArgs({
    args: rest,
    allowPositionals: true,
    options: {
      agency: { type: "string" },
      user: { type: "string" },
      case: { type: "string" },
      offence: { type: "string" },
      purpose: { type: "string" },
      candidates: { type: "string", default: "250" },
      "face-index": { type: "string" },
      "request-id": { type: "string" },
      timeout: { type: "string", default: "300" },
    },
  });
  if (positionals.length !== 1 || !values.agency || !values.user) {
    process.stderr.write("quorum-submit: IMAGE, --agency and --user are required\n");
    return 1;
  }
  const image = positionals[0].startsWith("probes/") ? positionals[0] : readFileSync(positionals[0]);
  // Numbers are passed on as numbers (a non-number stays a string, and the schema refuses it).
  const num = (s) => (s === undefined ? undefined : /^-?\d+$/.test(s) ? Number(s) : s);
  const doc = buildRequest(values.agency, values.user, image, {
    caseNumber: values.case,
    offenceCode: values.offence,
    purpose: values.purpose,
    candidates: num(values.candidates),
    faceIndex: num(values["face-index"]),
    requestId: values["request-id"],
  });
  const client = new QuorumClient(env("QUORUM_REDIS_URL"), values.agency, values.user, env("QUORUM_AGENCY_SECRET"));
  try {
    try {
      validateRequest(doc); // before connecting: an invalid request never reaches Redis
      await client.connect();
    } catch (e) {
      if (e instanceof InvalidRequest) {
        process.stderr.write(`quorum-submit: not sent, the request breaks the schema: ${e.message}\n`);
        return 3;
      }
      process.stderr.write(`quorum-submit: cannot log in to Redis as the agency's user: ${e.message}\n`);
      return 1;
    }
    const { requestId, entryId } = await client.submitDoc(doc);
    const result = await client.wait(requestId, entryId, Number(values.timeout) * 1000);
    process.stdout.write(JSON.stringify(result) + "\n");
    if (result.type === "error") {
      process.stderr.write(`quorum-submit: refused: ${result.code}: ${result.message}\n`);
      return 2;
    }
    return 0;
  } catch (e) {
    process.stderr.write(`quorum-submit: ${e.message}\n`);
    return 1;
  } finally {
    await client.close();
  }
}

process.exitCode = await main();
