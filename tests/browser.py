"""Real headless Chromium driven through its DevTools protocol: open a page, wait until it
has rendered, evaluate expressions, collect every console error, take a screenshot."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class Visit:
    values: dict
    errors: list = field(default_factory=list)
    screenshot: bytes = b""


def _devtools_page(port: int) -> dict:
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as answer:
                pages = [t for t in json.loads(answer.read()) if t["type"] == "page"]
            if pages:
                return pages[0]
        except OSError:
            pass
        time.sleep(0.3)
    raise AssertionError("Chromium's DevTools endpoint did not come up")


def _is_error(event: dict) -> bool:
    method = event.get("method")
    return (method == "Runtime.exceptionThrown"
            or (method == "Runtime.consoleAPICalled" and event["params"]["type"] == "error")
            or (method == "Log.entryAdded" and event["params"]["entry"]["level"] == "error"))


def visit(url: str, expressions: dict[str, str], ready: str = "true", timeout: float = 90) -> Visit:
    """Load ``url``, wait for its load event and until the JavaScript ``ready`` is truthy,
    then evaluate ``expressions`` ({name: JavaScript}) and take a screenshot."""
    import websocket  # websocket-client, installed with neptune

    port, profile = free_port(), tempfile.mkdtemp()
    browser = subprocess.Popen(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         f"--user-data-dir={profile}", f"--remote-debugging-port={port}", "--remote-allow-origins=*",
         "--window-size=1280,2000", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        connection = websocket.create_connection(_devtools_page(port)["webSocketDebuggerUrl"], timeout=60)
        ids, events = iter(range(1, 100_000)), []

        def call(method, **params):
            message_id = next(ids)
            connection.send(json.dumps({"id": message_id, "method": method, "params": params}))
            while True:
                message = json.loads(connection.recv())
                if message.get("id") == message_id:
                    return message.get("result", {})
                events.append(message)

        def evaluate(expression):
            return call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

        for domain in ("Page", "Runtime", "Log"):
            call(f"{domain}.enable")
        call("Page.navigate", url=url)
        while not any(e.get("method") == "Page.loadEventFired" for e in events):
            events.append(json.loads(connection.recv()))
        deadline = time.time() + timeout
        while not evaluate(ready):
            assert time.time() < deadline, f"{url} did not become ready ({ready}) in {timeout} s"
            time.sleep(0.5)
        values = {name: evaluate(expression) for name, expression in expressions.items()}
        shot = call("Page.captureScreenshot", format="png")
        connection.close()
    finally:
        browser.terminate()
        browser.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)
    return Visit(values, [e for e in events if _is_error(e)], base64.b64decode(shot["data"]))
