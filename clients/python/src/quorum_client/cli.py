"""``quorum-client``: submit a probe and print its answer, or sign a payload.

    QUORUM_REDIS_URL=redis://agency-lasd:<redis password>@127.0.0.1:6390/0 QUORUM_AGENCY_SECRET=<secret> \\
        quorum-client submit probe.jpg --agency lasd --user inv-0042 --case 2026-001234 \\
        --offence PC211 --purpose criminal-investigation
    quorum-client sign < payload.json      # the entry's fields, as JSON (QUORUM_TIMESTAMP, QUORUM_NONCE fix them)

Exit status: 0 a candidate list, 2 an error result (its code on stderr), 3 refused before sending (the
request breaks the schema), 1 anything else (no answer in time, Redis unreachable or the login refused).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

import redis

from quorum_client.client import InvalidRequest, QuorumClient, sign


def _env(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        raise SystemExit(f"quorum-client: set {name}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="quorum-client", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("submit", help="sign, submit and wait for the answer")
    s.add_argument("image", help="JPEG/PNG file, or probes/<sha256> for an image already stored")
    s.add_argument("--agency", required=True)
    s.add_argument("--user", required=True)
    s.add_argument("--case", required=True)
    s.add_argument("--offence", required=True)
    s.add_argument("--purpose", required=True)
    s.add_argument("--candidates", type=int, default=250)
    s.add_argument("--face-index", type=int, default=None)
    s.add_argument("--request-id", default=None)
    s.add_argument("--timeout", type=float, default=300.0)
    sub.add_parser("sign", help="sign the payload read from stdin; print the entry's fields as JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")

    if args.command == "sign":
        ts = os.environ.get("QUORUM_TIMESTAMP")
        fields = sign(
            _env("QUORUM_AGENCY_SECRET"),
            sys.stdin.read(),
            timestamp=int(ts) if ts else None,
            nonce=os.environ.get("QUORUM_NONCE") or None,
        )
        print(json.dumps(fields, ensure_ascii=False))
        return 0

    client = QuorumClient(_env("QUORUM_REDIS_URL"), args.agency, args.user, _env("QUORUM_AGENCY_SECRET"))
    try:
        client.check_login()
        rid, entry = client.submit(
            args.image,
            case_number=args.case,
            offence_code=args.offence,
            purpose=args.purpose,
            candidates=args.candidates,
            face_index=args.face_index,
            request_id=args.request_id,
        )
        answer = client.wait(rid, entry, timeout=args.timeout)
    except InvalidRequest as exc:
        print(f"quorum-client: not sent, the request breaks the schema: {exc}", file=sys.stderr)
        return 3
    except redis.AuthenticationError as exc:
        print(f"quorum-client: Redis refused the login ({exc}): check the agency's Redis user", file=sys.stderr)
        return 1
    except (redis.RedisError, TimeoutError) as exc:
        print(f"quorum-client: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(answer.result, ensure_ascii=False))
    if answer.type == "error":
        print(f"quorum-client: refused: {answer.code}: {answer.result.get('message')}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
