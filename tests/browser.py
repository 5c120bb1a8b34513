"""Headless Chromium driven over the Chrome DevTools Protocol with aiohttp's websocket client (no
selenium / playwright): enough to open the ComfyUI page, run JavaScript and take screenshots.

- `chromium_path()` / `skip_reason()`: which browser, or why the browser tests are skipped.
- `Chromium(user_dir).start()`: the browser on a free DevTools port, stopped by its process group id.
- `async with chromium.page() as page`: `page.navigate(url)`, `page.evaluate(js)` (awaits promises,
  raises on JavaScript exceptions), `page.wait_for(js, timeout)`, `page.screenshot(path)`, and
  `page.errors`: uncaught exceptions and console.error messages seen so far.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", "--no-default-browser-check",
         "--disable-features=Translate,MediaRouter,OptimizationHints", "--remote-allow-origins=*")


def chromium_path() -> str | None:
    env = os.environ.get("INT8_CONVROT_CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def skip_reason() -> str:
    if os.environ.get("INT8_CONVROT_CHROMIUM"):
        return f"INT8_CONVROT_CHROMIUM={os.environ['INT8_CONVROT_CHROMIUM']} is not an executable"
    return ("no Chromium found (looked for " + ", ".join(CANDIDATES) + "): install Debian's `chromium` package "
            "(scripts/setup.sh does it with INT8_CONVROT_INSTALL_CHROMIUM=1 or CI=1 when run as root)")


class JSError(RuntimeError):
    pass


class Chromium:
    def __init__(self, user_dir, width: int = 1600, height: int = 1000, binary: str | None = None):
        self.user_dir = Path(user_dir)
        self.width, self.height = width, height
        self.binary = binary or chromium_path()
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.log_path = self.user_dir.parent / f"{self.user_dir.name}.log"

    def start(self, timeout: float = 60.0) -> "Chromium":
        if self.binary is None:
            raise RuntimeError(skip_reason())
        self.user_dir.mkdir(parents=True, exist_ok=True)
        port_file = self.user_dir / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)
        cmd = [self.binary, *FLAGS, f"--user-data-dir={self.user_dir}", "--remote-debugging-port=0",
               f"--window-size={self.width},{self.height}", "about:blank"]
        self._log = open(self.log_path, "wb")
        # Its own process group: the browser's helper processes are stopped with it, by that group id.
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                self.port = int(port_file.read_text().split()[0])
                self._json("/json/version")
                return self
            except (OSError, ValueError, IndexError):
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"chromium did not open its DevTools port within {timeout:.0f} s:\n{self.log_tail()}")

    def _json(self, path: str, method: str = "GET"):
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def log_tail(self, n: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    @contextlib.asynccontextmanager
    async def page(self):
        """A new tab, closed afterwards."""
        target = self._json("/json/new?about:blank", method="PUT")
        page = Page(target["webSocketDebuggerUrl"], self.width, self.height)
        try:
            await page.connect()
            yield page
        finally:
            await page.close()
            with contextlib.suppress(Exception):
                self._json(f"/json/close/{target['id']}")


class Page:
    def __init__(self, ws_url: str, width: int, height: int):
        self.ws_url, self.width, self.height = ws_url, width, height
        self.errors: list[str] = []
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._events: dict[str, list[asyncio.Future]] = {}

    async def connect(self):
        import aiohttp
        self._session = aiohttp.ClientSession()
        self._ws = await self._session.ws_connect(self.ws_url, max_msg_size=0)
        self._reader = asyncio.create_task(self._read())
        await self.send("Page.enable")
        await self.send("Runtime.enable")
        await self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height,
                        deviceScaleFactor=1, mobile=False)

    async def close(self):
        if getattr(self, "_reader", None):
            self._reader.cancel()
        if getattr(self, "_ws", None):
            await self._ws.close()
        if getattr(self, "_session", None):
            await self._session.close()

    async def _read(self):
        import aiohttp
        async for msg in self._ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self._pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.exceptionThrown":
                d = params.get("exceptionDetails", {})
                self.errors.append("exception: " + (d.get("exception", {}).get("description") or d.get("text", "")))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                self.errors.append("console.error: " + " ".join(str(a.get("value", a.get("description", "")))
                                                               for a in params.get("args", [])))
            for fut in self._events.pop(method, []):
                if not fut.done():
                    fut.set_result(params)

    async def send(self, method: str, timeout: float = 60.0, **params):
        i = next(self._ids)
        fut = asyncio.get_running_loop().create_future()
        self._pending[i] = fut
        await self._ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        data = await asyncio.wait_for(fut, timeout)
        if "error" in data:
            raise RuntimeError(f"{method}: {data['error']}")
        return data.get("result", {})

    async def navigate(self, url: str, timeout: float = 60.0):
        loaded = asyncio.get_running_loop().create_future()
        self._events.setdefault("Page.loadEventFired", []).append(loaded)
        await self.send("Page.navigate", url=url)
        await asyncio.wait_for(loaded, timeout)

    async def evaluate(self, expression: str, timeout: float = 60.0):
        """The value of a JavaScript expression (promises awaited, result returned by value)."""
        r = await self.send("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                            returnByValue=True)
        if "exceptionDetails" in r:
            d = r["exceptionDetails"]
            raise JSError(d.get("exception", {}).get("description") or d.get("text") or str(d))
        return r.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.2):
        """Poll until the expression is truthy; return its value."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                last = await self.evaluate(expression)
            except JSError as exc:
                last = exc
            else:
                if last:
                    return last
            await asyncio.sleep(interval)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for: {expression}\nlast value: {last!r}\n"
                           f"page errors: {self.errors[-10:]}")

    async def screenshot(self, path) -> Path:
        r = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=False)
        path = Path(path)
        path.write_bytes(base64.b64decode(r["data"]))
        return path


__all__ = ["Chromium", "JSError", "Page", "chromium_path", "skip_reason"]
