"""The browser demo page (docs/demo.html), driven in a real headless Chromium from another origin.

The page is served by a second loopback server, so every call it makes to the edge is a CORS
call with a preflight, exactly as from a website: the X- headers are readable only if the edge
exposes them, and a page on an origin the edge does not list cannot call it at all.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.support.cdp import Page, chromium, find_chromium
from tests.support.cloud import CHAT_MODEL, running_cloud
from tests.support.keyfiles import write_keys
from tests.support.servers import edge, free_port, serving, simulator

ROOT = Path(__file__).resolve().parent.parent
DOCS_PAGE = ROOT / "docs" / "demo.html"
PACKAGE_PAGE = ROOT / "edge" / "http" / "demo.html"

# Fill the form, press Send, and wait (in the page, at most 10 s) until the call has ended;
# return what a person would read: the status line, the answer, the figures.
RUN_DEMO = """
async (fields) => {
  for (const [id, value] of Object.entries(fields)) {
    const el = document.getElementById(id);
    if (el.type === "checkbox") el.checked = value; else el.value = value;
  }
  const status = document.getElementById("status");
  document.getElementById("send").click();
  await new Promise((resolve, reject) => {
    const done = () => status.dataset.state !== "running";
    if (done()) return resolve();
    const timer = setTimeout(() => reject(new Error("still running: " + status.textContent)),
                             10000);
    new MutationObserver((_, observer) => {
      if (done()) { observer.disconnect(); clearTimeout(timer); resolve(); }
    }).observe(status, { attributes: true, childList: true, subtree: true });
  });
  const text = (id) => document.getElementById(id).textContent;
  return {
    state: status.dataset.state, status: status.textContent, output: text("output"),
    source: text("fig-source"), tokens: text("fig-tokens"), tok_per_s: text("fig-tok-per-s"),
    gen_time: text("fig-gen-time"), request_id: text("fig-request-id"),
    served_by: text("fig-served-by"),
  };
}
"""


async def run_demo(page: Page, **fields: Any) -> dict[str, Any]:
    result: dict[str, Any] = await page.evaluate(f"({RUN_DEMO})({json.dumps(fields)})")
    return result


@pytest.fixture
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing in CI: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium); CI runs this test")
    return path


@pytest.fixture
async def page_site() -> AsyncIterator[str]:
    """docs/demo.html, as a website developer would host it: on its own origin."""
    app = web.Application()

    async def page(request: web.Request) -> web.FileResponse:
        return web.FileResponse(DOCS_PAGE)

    app.router.add_get("/demo.html", page)
    async with serving(app) as url:
        yield url


def test_docs_page_is_the_served_page():
    # docs/demo.html (what developers copy) is a link to edge/http/demo.html (what /demo serves).
    assert DOCS_PAGE.resolve() == PACKAGE_PAGE.resolve()


async def test_demo_route_only_when_enabled(tmp_path: Path, http: aiohttp.ClientSession):
    async with simulator() as sim:
        async with edge(sim.url, tmp_path) as e, http.get(f"{e.url}/demo") as r:
            assert r.status == 404
        async with edge(sim.url, tmp_path, demo_page=True) as e, http.get(f"{e.url}/demo") as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/html; charset=utf-8"
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
            assert await r.read() == PACKAGE_PAGE.read_bytes()


@pytest.mark.browser
async def test_page_reads_figures_cross_origin_and_says_offline(
    tmp_path: Path, chromium_path: str, page_site: str
):
    secrets = write_keys(tmp_path / "keys.json", site={})
    feature = {"model": "llama3.2:1b", "system": "Answer in one line.", "anonymous": True}
    async with AsyncExitStack() as agent:
        sim = await agent.enter_async_context(simulator(reply_tokens=12, tok_per_s=200))
        async with (
            edge(
                sim.url,
                tmp_path,
                auth="keys",
                features={"oneline": feature},
                cors_origins=[page_site],
                retry_after=7,
            ) as e,
            chromium(chromium_path, tmp_path / "profile") as browser,
        ):
            assert page_site != e.url  # two origins: every call is a CORS call
            page = await browser.new_page()
            await page.goto(f"{page_site}/demo.html?base={e.url}")

            # A feature, anonymous, not streamed: the figures are response headers, readable
            # only because the edge exposes them to this origin.
            whole = await run_demo(page, path="/features/oneline", stream=False, prompt="sky?")
            assert whole["state"] == "done", (whole, browser.events_text())
            assert whole["source"] == "response headers"
            record = await e.record(whole["request_id"])
            assert record["feature"] == "oneline"
            assert whole["tokens"] == "12" == str(record["tokens"])
            assert float(whole["tok_per_s"]) == pytest.approx(record["tok_per_s"], abs=0.01)
            assert float(whole["gen_time"]) >= 0
            assert whole["output"]
            # Where it was made (X-Backhaul-Served-By): the one upstream's agent, "default".
            assert record["served_by"] == record["agent"] == "default"
            assert whole["served_by"] == "answered by default"

            # Streamed (?stream=1): tokens land in the page; the figures come from the final
            # NDJSON line.
            streamed = await run_demo(page, path="/features/oneline", stream=True, prompt="sky?")
            assert streamed["state"] == "done", (streamed, browser.events_text())
            assert streamed["source"].startswith("final stream line")
            assert streamed["tokens"] == "12"
            assert float(streamed["tok_per_s"]) > 0
            assert streamed["output"]
            assert streamed["served_by"] == "answered by default"
            assert (await e.record(streamed["request_id"]))["stream"] is True

            # The Ollama API needs a key: the page says so, then sends the one typed in (an
            # Authorization header, so a preflight the edge must allow).
            keyless = await run_demo(page, path="/api/chat", stream=True, key="")
            assert keyless["state"] == "error" and "401 unauthorized" in keyless["status"]
            keyed = await run_demo(page, path="/api/chat", stream=True, key=secrets["site"])
            assert keyed["state"] == "done", (keyed, browser.events_text())
            assert (await e.record(keyed["request_id"]))["key"] == "site"

            # The agent goes away: the page says the model is offline and when to retry.
            await agent.aclose()
            offline = await run_demo(page, path="/features/oneline", stream=False, key="")
            assert offline["state"] == "offline", offline
            assert "Model offline (agent_unavailable)" in offline["status"]
            assert "Try again in 7 s." in offline["status"]  # Retry-After, an exposed header
            assert offline["served_by"] == "-"  # nothing answered
            assert (await e.record(offline["request_id"]))["status"] == 503

            # Control: from an origin the edge does not list, the browser refuses the call.
            other_origin = page_site.replace("127.0.0.1", "localhost")
            await page.goto(f"{other_origin}/demo.html?base={e.url}")
            refused = await run_demo(page, path="/features/oneline", stream=False)
            assert refused["state"] == "error"
            assert "not in the edge's BACKHAUL_EDGE_CORS_ORIGINS" in refused["status"]


@pytest.mark.browser
async def test_page_says_when_the_cloud_answered(
    tmp_path: Path, chromium_path: str, page_site: str
):
    """The workstation is off and the feature may fall back: the page says the cloud answered,
    streamed or not, from the header the edge exposes to this origin."""
    feature = {"model": "llama3.2:1b", "anonymous": True, "fallback": "test"}
    async with running_cloud() as cloud:
        key_file = tmp_path / "cloud-key"
        key_file.write_text(cloud.api_key + "\n")
        models = {"llama3.2:1b": CHAT_MODEL}
        clouds = {
            "test": {"base_url": f"{cloud.url}/v1", "api_key_file": key_file, "models": models}
        }
        away = f"http://127.0.0.1:{free_port()}"
        async with (
            edge(
                away,
                tmp_path,
                features={"oneline": feature},
                clouds=clouds,
                cors_origins=[page_site],
            ) as e,
            chromium(chromium_path, tmp_path / "profile") as browser,
        ):
            page = await browser.new_page()
            await page.goto(f"{page_site}/demo.html?base={e.url}")
            for stream in (False, True):
                shown = await run_demo(page, path="/features/oneline", stream=stream, prompt="?")
                assert shown["state"] == "done", (shown, browser.events_text())
                assert shown["served_by"] == "answered by the cloud (cloud:test)"
                assert shown["output"]
                record = await e.record(shown["request_id"])
                assert record["served_by"] == "cloud:test" and record["stream"] is stream
            assert len(cloud.requests) == 2
