"""A W&B GraphQL server stub on 127.0.0.1 for tests: records every request and answers what wandb-workspaces asks
(`viewer`, project look-ups, `upsertView`) with the smallest valid payload."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VIEWER = {"id": "VXNlcjox", "entity": "stub-team", "username": "stub", "flags": "{}", "teams": {"edges": []}}


def answer(body: dict) -> dict:
    query = body.get("query", "")
    if "upsertView" in query:
        return {"upsertView": {"view": {"id": "VmlldzoxMjM=", "name": "nw-stubview-v"}, "inserted": True}}
    if "projectInternalId" in query or "internalId" in query:
        variables = body.get("variables") or {}
        return {"project": {"id": "UHJvamVjdDox", "internalId": "UHJvamVjdDox", "name": variables.get("projectName"),
                            "entityName": variables.get("entityName")}}
    if "GetProjects" in query or "models(" in query:
        name = (body.get("variables") or {}).get("entity") or "stub-team"
        return {"models": {"edges": [{"node": {"id": "UHJvamVjdDox", "name": "hpa_lightning", "entityName": name,
                                               "createdAt": "2026-01-01T00:00:00", "isBenchmark": False,
                                               "user": None}}],
                           "pageInfo": {"endCursor": None, "hasNextPage": False}}}
    if "viewer" in query:
        return {"viewer": VIEWER}
    return {}


class StubServer:
    """`with StubServer() as server:` then WANDB_BASE_URL=server.url; `server.requests` holds (path, body, host)."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"raw": raw.decode(errors="replace")}
                stub.requests.append({"path": self.path, "body": body, "host": self.headers.get("Host")})
                payload = json.dumps({"data": answer(body) if isinstance(body, dict) else {}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:  # noqa: N802
                stub.requests.append({"path": self.path, "body": None, "host": self.headers.get("Host")})
                self.send_response(404)
                self.end_headers()

            def do_CONNECT(self) -> None:  # noqa: N802 - a client tunnelling elsewhere through HTTPS_PROXY=stub
                stub.requests.append({"path": self.path, "body": None, "host": self.path})
                self.send_response(403)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def operations(self, word: str) -> list[dict]:
        return [r["body"] for r in self.requests if isinstance(r["body"], dict) and word in r["body"].get("query", "")]
