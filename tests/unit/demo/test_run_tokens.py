"""The demo reads its own API even when the operator's environment configures API tokens."""

from __future__ import annotations

import hashlib
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

from pydantic import SecretStr

from driftline.config import load_settings
from driftline.demo.run import demo_tokens, show_thumbnail


def test_no_configured_tokens_add_none() -> None:
    assert demo_tokens(None) == ({}, None)
    assert demo_tokens(SecretStr("  ")) == ({}, None)


def test_configured_tokens_keep_theirs_and_gain_a_fresh_viewer_token() -> None:
    mine = "ops:operator:0123456789abcdef-ops"
    overrides, token = demo_tokens(SecretStr(mine))
    assert token is not None and len(token) >= 16
    settings = load_settings(**overrides)
    got = {(t.name, t.role, t.sha256) for t in settings.tokens()}
    assert got == {("ops", "operator", hashlib.sha256(b"0123456789abcdef-ops").hexdigest()),
                   ("demo", "viewer", hashlib.sha256(token.encode()).hexdigest())}
    assert demo_tokens(SecretStr(mine))[1] != token  # made for each run


def test_the_thumbnail_is_fetched_with_the_token() -> None:
    """Over real HTTP: the server answers only a request carrying the bearer token."""
    from io import BytesIO

    from PIL import Image

    buf = BytesIO()
    Image.new("RGB", (8, 6)).save(buf, "JPEG")
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            seen.append(self.headers.get("Authorization"))
            ok = self.headers.get("Authorization") == "Bearer t0ken-for-this-run-123"
            self.send_response(200 if ok else 401)
            self.end_headers()
            self.wfile.write(buf.getvalue() if ok else b'{"detail": "missing bearer token"}')

        def log_message(self, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        api = f"http://127.0.0.1:{server.server_port}"
        incident = {"id": "DL-000001", "evidence": {"exemplars": [{"event_id": "e/1"}]}}
        assert show_thumbnail(api, incident, "t0ken-for-this-run-123")
        assert not show_thumbnail(api, incident)
        assert seen == ["Bearer t0ken-for-this-run-123", None]
    finally:
        server.shutdown()
        server.server_close()
