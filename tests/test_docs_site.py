"""The docs site as a reader gets it: built, served on 127.0.0.1 and opened in headless Chromium, offline.

* every equation is rendered by the vendored KaTeX (no raw ``\\frac`` or ``\\(`` left in the page text),
  on a component page (Markdown + arithmatex) and on a tutorial page (a notebook's ``$...$``);
* no page requests another host: the built HTML and CSS reference no remote resource, and Chromium's
  network log of the two page loads holds no request that the pages made to a host other than 127.0.0.1;
* the committed tutorial notebooks that the site renders ran at full size, without errors and without
  loader noise (no stderr output).

Chromium is Debian's ``chromium`` package; where it is missing the browser checks skip with a message
(the static checks still run).
"""
from __future__ import annotations

import functools
import glob
import html.parser
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.parse

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "docs", "tutorials", "*.ipynb")))
PAGES = {"component": "wave_index/", "tutorial": "tutorials/01_wave_index/"}
RAW_TEX = re.compile(r"\\frac|\\sqrt|\\sum|\\cdot|\\tilde|\\\(|\\\)|\\\[|\\\]|\$\$|\$[A-Za-z\\]")
# Places in HTML/CSS that make the browser fetch something (links <a href> are not requests).
FETCHING = re.compile(
    r"""<(?:script|img|iframe|source|audio|video|embed|input)\b[^>]*\bsrc\s*=\s*["']?(https?:)?//"""
    r"""|<link\b[^>]*\bhref\s*=\s*["']?(https?:)?//"""
    r"""|\bsrcset\s*=\s*["'][^"']*(https?:)?//"""
    r"""|@import\s+(?:url\()?\s*["']?(https?:)?//"""
    r"""|url\(\s*["']?(https?:)?//"""
    r"""|import\(\s*["'](https?:)?//""",
    re.IGNORECASE)


def chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    pytest.importorskip("mkdocs")
    missing = [p for p in ("00_attention_is_retrieval", "01_wave_index") if
               not os.path.exists(os.path.join(ROOT, "docs", "tutorials", p + ".ipynb"))]
    if missing:
        pytest.skip(f"executed tutorial notebooks missing from docs/tutorials ({missing}); run `make docs`")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"mkdocs build --strict failed:\n{run.stdout}\n{run.stderr}"
    return str(out)


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(Quiet, directory=site)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def load(url, tmp_path, name):
    """Chromium, headless and offline (every host but 127.0.0.1 unresolvable): the DOM after its scripts
    ran, and the URLs that the page itself requested (from the network log)."""
    exe = chromium()
    if exe is None:
        pytest.skip("headless Chromium not installed (Debian: apt-get install chromium); browser checks skipped")
    netlog = tmp_path / f"{name}.netlog.json"
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           f"--user-data-dir={tmp_path / (name + '.profile')}", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-default-apps", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
           f"--log-net-log={netlog}", "--virtual-time-budget=5000", "--dump-dom", url]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "<html" in run.stdout, run.stderr[-2000:]
    return run.stdout, page_requests(netlog, urllib.parse.urlsplit(url))


def page_requests(netlog, page):
    """URLs of the requests the page made (initiated by its origin, or the page itself).

    Chromium's own background requests (initiator "not an origin", e.g. its clock or account checks)
    are not the page's and are left out."""
    with open(netlog) as f:
        log = json.load(f)
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    origin = f"{page.scheme}://{page.netloc}"
    urls = set()
    for e in log["events"]:
        p = e.get("params") or {}
        if e["type"] == start and "url" in p:
            if p.get("initiator") == origin or p["url"].startswith(origin + "/"):
                urls.add(p["url"])
    return urls


class Text(html.parser.HTMLParser):
    """Visible text, without code, scripts, styles and KaTeX's hidden TeX source (<annotation>)."""

    SKIP = {"script", "style", "annotation", "code", "pre", "textarea", "svg"}

    def __init__(self):
        super().__init__()
        self.depth, self.parts = 0, []

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.depth += 1

    def handle_endtag(self, tag):
        if tag in self.SKIP and self.depth:
            self.depth -= 1

    def handle_data(self, data):
        if not self.depth:
            self.parts.append(data)


def visible_text(dom):
    t = Text()
    t.feed(dom)
    return " ".join(t.parts)


@pytest.mark.parametrize("kind", list(PAGES))
def test_equations_render_offline(kind, server, tmp_path):
    dom, requests = load(f"{server}/{PAGES[kind]}", tmp_path, kind)
    n_katex = dom.count('class="katex"') + dom.count('class="katex-display"')
    assert n_katex >= 5, f"{PAGES[kind]}: only {n_katex} KaTeX-rendered equations"
    assert "katex-error" not in dom, f"{PAGES[kind]}: KaTeX could not parse an equation"
    raw = RAW_TEX.findall(visible_text(dom))
    assert not raw, f"{PAGES[kind]}: raw TeX left in the rendered text: {sorted(set(raw))}"
    remote = sorted(u for u in requests if urllib.parse.urlsplit(u).hostname != "127.0.0.1")
    assert not remote, f"{PAGES[kind]} requested other hosts: {remote}"
    assert any(u.endswith(".woff2") for u in requests), "KaTeX fonts were not loaded from the site"


def test_no_remote_resources_in_built_site(site):
    bad = []
    for path in glob.glob(os.path.join(site, "**", "*"), recursive=True):
        if not path.endswith((".html", ".css")):
            continue
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
        for m in FETCHING.finditer(text):
            bad.append(f"{os.path.relpath(path, site)}: {text[m.start():m.end() + 60]!r}")
    assert not bad, "remote resources referenced:\n" + "\n".join(bad[:20])


def test_committed_tutorials_full_size_and_quiet():
    assert NOTEBOOKS, "no executed tutorials in docs/tutorials (run `make docs`)"
    sources = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "tutorials", "[0-9]*.py"))}
    assert sources == {os.path.splitext(os.path.basename(p))[0] for p in NOTEBOOKS}, "a tutorial lacks its notebook"
    for path in NOTEBOOKS:
        name = os.path.basename(path)
        assert os.path.getsize(path) < 3_000_000, f"{name} is too large to commit"
        with open(path) as f:
            nb = json.load(f)
        assert nb["metadata"].get("retrokv", {}).get("size") == "full", f"{name} was not executed at full size"
        for cell in nb["cells"]:
            for out in cell.get("outputs", []):
                assert out["output_type"] != "error", f"{name}: a cell raised {out.get('ename')}"
                assert not (out["output_type"] == "stream" and out.get("name") == "stderr"), \
                    f"{name}: stderr output in the published page: {''.join(out['text'])[:200]!r}"
