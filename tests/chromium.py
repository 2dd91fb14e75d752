"""Headless Chromium (Debian's package) driven over the DevTools protocol, as a person uses a page:
open a URL, type into a field, press a button, read the DOM, take a screenshot. One browser profile
per instance, so two instances are two people with their own cookies."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import websocket

from tests.htmldom import Node, parse
from tests.integration.servers import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class Browser:
    def __init__(self, profile: Path, *, width: int = 1280, height: int = 1400) -> None:
        assert Path(CHROMIUM).exists(), "chromium is not installed: apt-get install -y chromium (scripts/setup.sh)"
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--remote-debugging-port={self.port}",
                "--remote-allow-origins=*",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self._ids = itertools.count(1)
        self._loads = 0  # Page.loadEventFired events seen and not yet waited for
        url = self._page_ws(time.monotonic() + 60)
        self.ws = websocket.create_connection(url, timeout=60, suppress_origin=True)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self._loads = 0

    def _page_ws(self, deadline: float) -> str:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as resp:
                    pages = [t for t in json.load(resp) if t.get("type") == "page"]
                if pages:
                    return pages[0]["webSocketDebuggerUrl"]
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}")
            time.sleep(0.2)
        raise TimeoutError("chromium's DevTools endpoint did not come up")

    def call(self, method: str, **params: Any) -> dict:
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("method") == "Page.loadEventFired":
                self._loads += 1
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def _wait_load(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not self._loads:
            if time.monotonic() > deadline:
                raise TimeoutError("the page did not load")
            msg = json.loads(self.ws.recv())
            if msg.get("method") == "Page.loadEventFired":
                self._loads += 1
        self._loads -= 1

    def js(self, expression: str) -> Any:
        res = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res.get("result", {}).get("value")

    def open(self, url: str) -> Node:
        self.call("Page.navigate", url=url)
        self._wait_load()
        return self.dom()

    def click(self, selector: str) -> Node:
        """Press the button (or follow the link) ``selector`` names, and wait for the page it leads to."""
        found = self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false; "
            "e.click(); return true; })()"
        )
        assert found, f"nothing matches {selector!r} on {self.url()}"
        self._wait_load()
        return self.dom()

    def fill(self, selector: str, value: str) -> None:
        ok = self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return false; "
            f"e.value = {json.dumps(value)}; return true; }})()"
        )
        assert ok, f"nothing matches {selector!r} on {self.url()}"

    def url(self) -> str:
        return str(self.js("location.href"))

    def dom(self) -> Node:
        return parse(str(self.js("document.documentElement.outerHTML")))

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(OSError, RuntimeError, websocket.WebSocketException):
            self.call("Browser.close")
        try:
            self.ws.close()
        finally:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
