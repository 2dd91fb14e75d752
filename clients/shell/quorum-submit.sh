#!/usr/bin/env bash
# quorum-submit.sh: the README's "Submitting a search without Python" recipe as a script, with
# redis-cli, openssl, jq, base64 and ajv-cli (validation against the published JSON Schema).
#
#   export QUORUM_REDIS_USER=agency-lasd REDISCLI_AUTH=<the agency's Redis password> QUORUM_AGENCY_SECRET=<secret>
#   clients/shell/quorum-submit.sh submit probe.jpg --agency lasd --user inv-0042 --case 2026-001234 \
#       --offence PC211 --purpose criminal-investigation [--candidates N] [--face-index I] [--request-id ID]
#   clients/shell/quorum-submit.sh sign < payload.json     # the entry's fields as JSON (QUORUM_TIMESTAMP,
#                                                         # QUORUM_NONCE fix them); the image is hashed, not sent
#
# Environment: QUORUM_REDIS_HOST (127.0.0.1), QUORUM_REDIS_PORT (6390), QUORUM_REDIS_USER (the agency's
# Redis ACL user, agency-<id>), REDISCLI_AUTH (its password: redis-cli reads it from the environment, so it
# is not on any command line), QUORUM_AGENCY_SECRET (the signing secret; note that openssl takes the HMAC
# key on its command line), QUORUM_AJV (the ajv-cli command; default: ajv on PATH, else
# clients/node/node_modules/.bin/ajv), QUORUM_SCHEMA_DIR (default: schemas/json of this repository).
#
# Exit status: 0 a candidate list (printed as JSON), 2 an error result (its code on stderr), 3 refused
# before sending (the request breaks the schema, or lies outside what this script can canonicalise),
# 1 anything else (a tool missing, the login refused, no answer in time).
#
# The canonical form signed is RFC 8785 (JCS). This script makes it with `jq -S -c`, which coincides with
# RFC 8785 only for JSON of strings, integers within +-(2**53 - 1) (not -0), true/false/null, objects with
# ASCII keys and arrays, and no DEL (U+007F) in a string (jq escapes it, RFC 8785 does not). Every probe
# request is such a document; anything else (a float, a non-ASCII key) is refused here, exit 3: sign it
# with an RFC 8785 library (the Node or Python client). Non-ASCII text in values is fine.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
SCHEMA_DIR=${QUORUM_SCHEMA_DIR:-$REPO/schemas/json}
HOST=${QUORUM_REDIS_HOST:-127.0.0.1}
PORT=${QUORUM_REDIS_PORT:-6390}

die() { # die STATUS MESSAGE
  echo "quorum-submit: $2" >&2
  exit "$1"
}
log() { # one structured line on stderr: log EVENT key=value ...
  local line
  line="ts=$(date -u +%Y-%m-%dT%H:%M:%SZ) logger=quorum-submit.sh event=$1"
  shift
  for kv in "$@"; do line+=" $kv"; done
  echo "$line" >&2
}
need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || die 1 "$tool is not installed (the shell client needs redis-cli, openssl, jq, base64)"
  done
}

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# A jq filter: true when `jq -S -c` prints the document exactly as RFC 8785 does (see above).
JCS_SUBSET='def ok: if type == "object" then (keys | all(test("^[ -~]*$"))) and all(.[]; ok)
  elif type == "array" then all(.[]; ok)
  elif type == "number" then . == floor and . >= -9007199254740991 and . <= 9007199254740991
  elif type == "string" then (test("\u007f") | not)
  else true end; ok'

# canonical PAYLOAD_FILE OUT_FILE: step 1-2 of the recipe (image.data_b64 -> image.sha256, canonical form)
canonical() {
  local payload=$1 out=$2 sha=""
  jq -e 'type == "object"' "$payload" >/dev/null 2>&1 || die 3 "the payload is not a JSON object"
  jq -e "$JCS_SUBSET" "$payload" >/dev/null ||
    die 3 "the payload holds a float, a non-ASCII key, an unsafe integer or DEL: its RFC 8785 form needs a JCS library (use the Node or Python client)"
  if jq -e '.image | type == "object" and has("data_b64")' "$payload" >/dev/null; then
    jq -j '.image.data_b64' "$payload" >"$TMP/image.b64"
    base64 -d "$TMP/image.b64" >"$TMP/image.bin" 2>/dev/null || die 3 "image.data_b64 is not valid base64"
    sha=$(openssl dgst -sha256 -r "$TMP/image.bin" | cut -d' ' -f1)
    jq -S -c -j --arg sha "$sha" '.image = (.image | del(.data_b64) | .sha256 = $sha)' "$payload" >"$out"
  else
    jq -S -c -j . "$payload" >"$out"
  fi
}

# sign PAYLOAD_FILE TIMESTAMP NONCE -> the hex signature on stdout (step 3-4)
sign() {
  local payload=$1 ts=$2 nonce=$3
  canonical "$payload" "$TMP/canonical.json"
  { printf 'quorum-v1\n%s\n%s\n' "$ts" "$nonce"; cat "$TMP/canonical.json"; } >"$TMP/to-sign"
  openssl dgst -sha256 -hmac "$QUORUM_AGENCY_SECRET" -r "$TMP/to-sign" | cut -d' ' -f1
}

rcli() { # redis-cli as the agency's ACL user (the password comes from REDISCLI_AUTH)
  redis-cli -h "$HOST" -p "$PORT" --user "$QUORUM_REDIS_USER" "$@"
}

validate() { # validate PAYLOAD_FILE against the published schema, before anything is sent
  local ajv=${QUORUM_AJV:-}
  if [ -z "$ajv" ]; then
    if command -v ajv >/dev/null; then ajv=ajv; else ajv=$REPO/clients/node/node_modules/.bin/ajv; fi
  fi
  [ -x "$ajv" ] || command -v "$ajv" >/dev/null ||
    die 1 "ajv-cli not found: run 'npm ci' in clients/node (or npm install -g ajv-cli ajv-formats), or set QUORUM_AJV"
  # draft 2020-12 and the date-time format: these two flags, nothing else (the schemas pass strict mode)
  if ! "$ajv" validate --spec=draft2020 -c ajv-formats --all-errors --errors=line \
    -s "$SCHEMA_DIR/probe-request.schema.json" -d "$1" >"$TMP/ajv.out" 2>&1; then
    die 3 "not sent, the request breaks the schema: $(tail -n 1 "$TMP/ajv.out" | cut -c1-600)"
  fi
}

cmd_sign() {
  : "${QUORUM_AGENCY_SECRET:?set QUORUM_AGENCY_SECRET}"
  need jq openssl base64
  cat >"$TMP/payload.json"
  local ts=${QUORUM_TIMESTAMP:-$(date +%s)} nonce=${QUORUM_NONCE:-$(openssl rand -hex 16)}
  local sig
  sig=$(sign "$TMP/payload.json" "$ts" "$nonce")
  jq -c -n --rawfile payload "$TMP/payload.json" --arg ts "$ts" --arg nonce "$nonce" --arg sig "$sig" \
    '{payload: $payload, timestamp: $ts, nonce: $nonce, signature: $sig}'
}

cmd_submit() {
  local image="" agency="" user="" case="" offence="" purpose="" candidates=250 face_index="" rid="" timeout=300
  while [ $# -gt 0 ]; do
    case $1 in
      --agency) agency=$2; shift 2 ;;
      --user) user=$2; shift 2 ;;
      --case) case=$2; shift 2 ;;
      --offence) offence=$2; shift 2 ;;
      --purpose) purpose=$2; shift 2 ;;
      --candidates) candidates=$2; shift 2 ;;
      --face-index) face_index=$2; shift 2 ;;
      --request-id) rid=$2; shift 2 ;;
      --timeout) timeout=$2; shift 2 ;;
      -*) die 1 "unknown option $1" ;;
      *) [ -z "$image" ] || die 1 "one image only"; image=$1; shift ;;
    esac
  done
  [ -n "$image" ] && [ -n "$agency" ] && [ -n "$user" ] || die 1 "IMAGE, --agency and --user are required"
  need redis-cli openssl jq base64
  : "${QUORUM_AGENCY_SECRET:?set QUORUM_AGENCY_SECRET}"
  : "${QUORUM_REDIS_USER:?set QUORUM_REDIS_USER to the Redis user of the agency (agency-$agency)}"
  : "${REDISCLI_AUTH:?set REDISCLI_AUTH to the password of $QUORUM_REDIS_USER}"
  rid=${rid:-$(openssl rand -hex 16)}

  # The payload, built in a file (an image of any size: nothing large goes through argv).
  local img_arg=(--rawfile b64 "$TMP/image.b64")
  if [[ $image == probes/* ]]; then
    img_arg=(--arg key "$image")
  else
    [ -r "$image" ] || die 1 "cannot read $image"
    base64 -w0 "$image" >"$TMP/image.b64"
  fi
  # Whole numbers go in as numbers, anything else as a string (which the schema then refuses).
  jq -n -j "${img_arg[@]}" --arg rid "$rid" --arg agency "$agency" --arg user "$user" --arg case "$case" \
    --arg offence "$offence" --arg purpose "$purpose" --arg candidates "$candidates" --arg fi "$face_index" '
    def num: if test("^-?[0-9]+$") then tonumber else . end;
    {schema_version: 1, request_id: $rid, agency_id: $agency, user_id: $user, case_number: $case,
     offence_code: $offence, purpose: $purpose,
     image: (if $ARGS.named.key then {key: $ARGS.named.key} else {data_b64: $ARGS.named.b64} end),
     candidates: ($candidates | num)}
    + (if $fi == "" then {} else {face_index: ($fi | num)} end)' >"$TMP/payload.json"
  validate "$TMP/payload.json"

  # Log in as the agency's user. redis-cli goes on as the default user when AUTH fails (a warning on
  # stderr only): that is checked here, so nothing is ever sent under another identity.
  local pong
  pong=$(rcli PING 2>"$TMP/login.err") || true
  if grep -q "AUTH failed" "$TMP/login.err" || [ "$pong" != "PONG" ]; then
    die 1 "Redis refused the login as $QUORUM_REDIS_USER ($(head -c 300 "$TMP/login.err")). On the local stack the agency users exist only after 'quorum registry redis-acl --apply'"
  fi

  local ts nonce sig entry
  ts=$(date +%s)
  nonce=$(openssl rand -hex 16)
  sig=$(sign "$TMP/payload.json" "$ts" "$nonce")
  # -x: the last argument (the payload) comes from stdin, so its size is not bound by ARG_MAX.
  entry=$(rcli -x XADD "quorum:intake:$agency" '*' timestamp "$ts" nonce "$nonce" signature "$sig" payload \
    <"$TMP/payload.json" 2>&1) || true
  [[ $entry =~ ^[0-9]+-[0-9]+$ ]] || die 1 "XADD failed: $entry"
  log submitted agency="$agency" request_id="$rid" entry_id="$entry"

  # Wait: the result key, or an error on the results stream naming our intake entry.
  local ms="${entry%%-*}" now_ms=$(($(date +%s) * 1000))
  # A stream pushed into the future (XADD <id>) gives later entries future ids; answers keep Redis's
  # clock: read them from 5 minutes ago.
  if [ "$ms" -gt $((now_ms + 300000)) ]; then ms=$((now_ms - 300000)); fi
  local last="$((ms - 1))-0" deadline=$(($(date +%s) + timeout)) raw
  while :; do
    raw=$(rcli --json -2 GET "quorum:result:$agency:$rid")
    if [ "$raw" != "null" ] && [ -n "$raw" ]; then
      jq -r . <<<"$raw" >"$TMP/result.json"
      break
    fi
    [ "$(date +%s)" -lt "$deadline" ] || die 1 "no answer to $rid in $timeout s"
    rcli --json -2 XREAD COUNT 500 BLOCK 1000 STREAMS "quorum:results:$agency" "$last" >"$TMP/xread.json"
    if [ "$(jq -c . "$TMP/xread.json")" != "null" ]; then
      last=$(jq -r '.[0][1][-1][0]' "$TMP/xread.json")
      # each entry: [id, [field, value, ...]]; the answer is the error whose stream_entry_id is ours
      if jq -e --arg e "$entry" '[.[0][1][] | .[1] as $f | ($f | [range(0; length; 2) as $i | {key: $f[$i], value: $f[$i + 1]}]
            | from_entries) | select(.type == "error") | .payload | fromjson | select(.stream_entry_id == $e)]
            | first // empty' "$TMP/xread.json" >"$TMP/result.json"; then
        break
      fi
    fi
  done
  local type code
  type=$(jq -r .type "$TMP/result.json")
  code=$(jq -r '.code // ""' "$TMP/result.json")
  log answered agency="$agency" request_id="$rid" type="$type" code="${code:-none}" \
    candidates="$(jq '.candidates // [] | length' "$TMP/result.json")"
  jq -c . "$TMP/result.json"
  if [ "$type" = "error" ]; then
    echo "quorum-submit: refused: $code: $(jq -r .message "$TMP/result.json")" >&2
    exit 2
  fi
}

case ${1:-} in
  submit) shift; cmd_submit "$@" ;;
  sign) shift; cmd_sign ;;
  *) die 1 "usage: quorum-submit.sh submit IMAGE --agency A --user U --case C --offence O --purpose P | sign < payload.json" ;;
esac
