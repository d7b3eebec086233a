"""Look at the documentation site the way a reader gets it: build it, open pages from disk in
headless Chromium (no network, no server) and save full-page screenshots at each width.

    python tools/docs_shots.py OUT_DIR                       # build, then shoot the default pages
    python tools/docs_shots.py OUT_DIR --site SITE_DIR       # shoot a site built already
    python tools/docs_shots.py OUT_DIR --pages cli reference/api --widths 1400 800

Writes ``OUT_DIR/<page>@<width>.png`` (``/`` in the page becomes ``__``) and prints one line per
shot with what a picture does not say at a glance: the page height, content wider than the
window (an element that scrolls sideways or sticks out), Mermaid diagrams left as raw source,
requests that failed (a CDN or a web font, when there is no network). Screenshots are not
committed (keep them out of git, e.g. under /work/shots).

Needs ``chromium`` (``apt-get install chromium``). Chromium is driven through its DevTools
protocol with a small WebSocket client written here, so the tool needs nothing outside the
standard library and the docs extra.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# every page issue 21 names, and the new ones
PAGES = ["index", "getting-started", "recipes", "cli", "reference/cli", "reference/recipes", "reference/api",
         "reference/supported-models", "troubleshooting", "passes/tome", "passes/tofu", "passes/tosa",
         "passes/spa", "results/README", "which-method", "architecture"]
WIDTHS = [1400, 800]
MAX_HEIGHT = 30000          # Chromium draws at most this much of a page in one picture

# What the page reports about itself once loaded: the height, what sticks out sideways, Mermaid left raw.
_PROBE = r"""(() => {
  const W = document.documentElement.clientWidth;
  const wide = [];
  for (const el of document.querySelectorAll('.md-content table, .md-content pre > code, .md-content img, .md-content .md-typeset__scrollwrap')) {
    if (el.offsetParent === null) continue;                       // inside a closed tab
    const r = el.getBoundingClientRect();
    const clipped = el.scrollWidth > el.clientWidth + 1 && getComputedStyle(el).overflowX !== 'visible';
    if (r.right > W + 1 || clipped) {
      const text = (el.innerText || el.getAttribute('alt') || '').trim().split('\n')[0].slice(0, 50);
      const by = clipped ? el.scrollWidth - el.clientWidth : Math.round(r.right - W);
      wide.push(el.tagName.toLowerCase() + (clipped ? ' scrolls ' : ' sticks out ') + by + ' px: ' + text);
    }
  }
  return JSON.stringify({
    height: document.documentElement.scrollHeight,
    pageWidth: document.documentElement.scrollWidth, width: W,
    wide: wide,
    mermaidRaw: document.querySelectorAll('pre.mermaid, .mermaid > code').length,
    mermaidDrawn: document.querySelectorAll('div.mermaid').length,
    title: document.title,
  });
})()"""


class DevTools:
    """One WebSocket connection to a Chromium page target (RFC 6455, client side, text frames)."""

    def __init__(self, ws_url: str):
        m = re.match(r"ws://([^:/]+):(\d+)(/.*)", ws_url)
        host, port, path = m.group(1), int(m.group(2)), m.group(3)
        self.sock = socket.create_connection((host, port), timeout=60)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                           f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
                          .encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise RuntimeError(f"DevTools refused the WebSocket: {head[:200]!r}")
        self.next_id = 0
        self.events: list[dict] = []

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(min(n - len(buf), 1 << 20))
            if not chunk:
                raise RuntimeError("DevTools closed the connection")
            buf += chunk
        return bytes(buf)

    def _recv_message(self) -> dict:
        data = b""
        while True:
            b0, b1 = self._recv_exact(2)
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack(">H", self._recv_exact(2))[0]
            elif n == 127:
                n = struct.unpack(">Q", self._recv_exact(8))[0]
            data += self._recv_exact(n)
            if b0 & 0x80:                      # FIN: the message is whole
                return json.loads(data)

    def send(self, method: str, **params) -> dict:
        self.next_id += 1
        payload = json.dumps({"id": self.next_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        n = len(payload)
        head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else
                                bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else
                                bytes([0x80 | 127]) + struct.pack(">Q", n))
        self.sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            msg = self._recv_message()
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_event(self, method: str, timeout: float = 30) -> None:
        end = time.time() + timeout
        while time.time() < end:
            if any(e.get("method") == method for e in self.events):
                self.events = [e for e in self.events if e.get("method") != method]
                return
            self.sock.settimeout(max(0.1, end - time.time()))
            try:
                self.events.append(self._recv_message())
            except socket.timeout:
                break
            finally:
                self.sock.settimeout(60)
        raise RuntimeError(f"no {method} within {timeout:.0f} s")


def start_chromium(profile: Path) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        sys.exit("error: no chromium on PATH. Install it (apt-get install chromium) and run again.")
    proc = subprocess.Popen([exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--no-first-run",
                             "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.time() + 30
    while time.time() < end:
        line = proc.stderr.readline()
        m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if m:
            port = m.group(1)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
                pages = [t for t in json.load(r) if t["type"] == "page"]
            return proc, pages[0]["webSocketDebuggerUrl"]
    proc.kill()
    sys.exit("error: chromium did not start its DevTools endpoint within 30 s")


def page_file(site: Path, page: str) -> Path:
    """The built page for a docs path without ``.md`` (``README`` and ``index`` are their folder's
    page): ``page.html`` (mkdocs-material's offline plugin turns directory URLs off), else
    ``page/index.html``."""
    page = page.removesuffix("/README").removesuffix("/index")
    if page in ("", "index", "README"):
        return site / "index.html"
    flat = site / f"{page}.html"
    return flat if flat.exists() else site / page / "index.html"


def shoot(dt: DevTools, url: str, width: int, out: Path, settle: float) -> dict:
    dt.send("Emulation.setDeviceMetricsOverride", width=width, height=900, deviceScaleFactor=1, mobile=False)
    dt.events.clear()
    failed: list[str] = []
    dt.send("Page.navigate", url=url)
    dt.wait_event("Page.loadEventFired")
    time.sleep(settle)                  # scripts that draw after load (Mermaid) finish
    for e in dt.events:
        if e.get("method") == "Network.loadingFailed":
            failed.append(e["params"].get("requestId", ""))
    urls = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in dt.events
            if e.get("method") == "Network.requestWillBeSent"}
    facts = json.loads(dt.send("Runtime.evaluate", expression=_PROBE, returnByValue=True)["result"]["value"])
    facts["failed"] = sorted({urls.get(r, r) for r in failed})
    height = min(facts["height"], MAX_HEIGHT)
    shot = dt.send("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                   clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
    out.write_bytes(base64.b64decode(shot["data"]))
    return facts


_SEARCH = r"""(() => {
  const input = document.querySelector('.md-search__input');
  const toggle = document.querySelector('[data-md-toggle=search]');
  if (!input || !toggle) return 'no search box';
  toggle.checked = true;                       // what clicking the search box does: it opens search
  toggle.dispatchEvent(new Event('change', { bubbles: true }));
  input.focus();
  input.value = QUERY;
  input.dispatchEvent(new Event('focus'));
  input.dispatchEvent(new Event('input', { bubbles: true }));
  input.dispatchEvent(new KeyboardEvent('keyup', { bubbles: true, key: 'e' }));
  return 'typed';
})()"""


def search_results(dt: DevTools, url: str, query: str, wait: float = 6.0) -> str:
    """Open ``url``, type ``query`` into the search box, and say how many results the page lists."""
    dt.send("Emulation.setDeviceMetricsOverride", width=1400, height=900, deviceScaleFactor=1, mobile=False)
    dt.events.clear()
    dt.send("Page.navigate", url=url)
    dt.wait_event("Page.loadEventFired")
    time.sleep(2)
    typed = dt.send("Runtime.evaluate", expression=_SEARCH.replace("QUERY", json.dumps(query)),
                    returnByValue=True)["result"]["value"]
    if typed != "typed":
        return typed
    time.sleep(wait)
    dt.send("Runtime.evaluate", expression=_SEARCH.replace("QUERY", json.dumps(query)))   # again, once the index is in
    time.sleep(1)
    count = dt.send("Runtime.evaluate", expression="document.querySelectorAll('.md-search-result__item').length",
                    returnByValue=True)["result"]["value"]
    meta = dt.send("Runtime.evaluate", expression="(document.querySelector('.md-search-result__meta')||{}).textContent",
                   returnByValue=True)["result"].get("value")
    return f"{count} results listed ({meta})"


def build_site(dest: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(dest)], cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"error: mkdocs build --strict failed (exit status {done.returncode}); see its output above")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for the PNGs (created)")
    ap.add_argument("--site", type=Path, help="a built site to shoot (default: build one into OUT/site)")
    ap.add_argument("--pages", nargs="+", default=PAGES, help="pages, as paths without .md (default: %(default)s)")
    ap.add_argument("--widths", nargs="+", type=int, default=WIDTHS, help="window widths in px")
    ap.add_argument("--settle", type=float, default=1.5, help="seconds to wait after load (default %(default)s)")
    ap.add_argument("--search", metavar="WORD", default="recipe",
                    help="type WORD into the search box of the home page and count the results (default %(default)s; "
                         "'' skips it)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    site = args.site
    if site is None:
        site = args.out / "site"
        print(f"mkdocs build --strict: {build_site(site):.0f} s", flush=True)
    with tempfile.TemporaryDirectory(prefix="docs-shots-") as profile:
        proc, ws = start_chromium(Path(profile))
        try:
            dt = DevTools(ws)
            dt.send("Page.enable")
            dt.send("Network.enable")
            for page in args.pages:
                path = page_file(site.resolve(), page)
                if not path.exists():
                    print(f"{page}: not in the site ({path})")
                    continue
                for width in args.widths:
                    png = args.out / f"{page.replace('/', '__') or 'index'}@{width}.png"
                    f = shoot(dt, path.as_uri(), width, png, args.settle)
                    notes = [f"{f['height']} px high"]
                    if f["pageWidth"] > f["width"]:
                        notes.append(f"page {f['pageWidth'] - f['width']} px wider than the window")
                    if f["mermaidRaw"]:
                        notes.append(f"{f['mermaidRaw']} Mermaid raw ({f['mermaidDrawn']} drawn)")
                    notes += [f"wide: {w}" for w in f["wide"][:6]]
                    notes += [f"failed: {u}" for u in f["failed"][:4]]
                    print(f"{png.name}: " + "; ".join(notes), flush=True)
            if args.search:
                home = page_file(site.resolve(), "index").as_uri()
                print(f"search for {args.search!r} on the home page, from disk: "
                      f"{search_results(dt, home, args.search)}", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
