"""The web dashboard, end to end: a real daemon serving the built dashboard, driven in
Debian's headless chromium by Playwright (no browser download), plus a check that the
fixtures the dashboard's Vitest suite folds still match exo's Python `apply`."""

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Request, expect, sync_playwright

from exo.models.convert import MARKER_NAME
from exo.shared.apply import fold
from exo.shared.types.events import IndexedEvent
from exo.shared.types.state import State
from tests.conftest import BUILTIN
from tests.daemon import Daemon
from tests.fake_hub import FakeHub, FakeRepo, serving

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboard"
FIXTURES = DASHBOARD / "src" / "test" / "fixtures"
SCREENSHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = os.environ.get("EXO_CHROMIUM", "/usr/bin/chromium")
# What works on these machines (shared/design/FINDINGS.md): no sandbox as root, and none
# of chromium's own network traffic (the machine's network is closed).
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# --- the fixtures of the TypeScript fold ------------------------------------------------


def _events(raw: list[Any]) -> list[IndexedEvent]:
    return [IndexedEvent.model_validate_json(json.dumps(e)) for e in raw]


def _assert_state_matches(state: State, expected: dict[str, Any]) -> None:
    """Every field the fixture holds is what Python folds (a newer State may add fields)."""
    actual = json.loads(state.model_dump_json())
    for key, value in expected.items():
        assert actual[key] == value, f"state.{key} differs: regenerate the dashboard fixtures"


def test_recorded_events_fold_to_recorded_state() -> None:
    lines = (FIXTURES / "events.jsonl").read_text().splitlines()
    events = _events([json.loads(line) for line in lines if line.strip()])
    for index in (34, 36, 74):
        expected = json.loads((FIXTURES / f"state-{index}.json").read_text())
        _assert_state_matches(fold(State(), events[: index + 1]), expected["state"])


def test_synthetic_fixture_matches_python_apply() -> None:
    """dashboard/scripts/gen_fixtures.py wrote it; the TypeScript fold must give the same."""
    fixture = json.loads((FIXTURES / "synthetic.json").read_text())
    _assert_state_matches(fold(State(), _events(fixture["events"])), fixture["state"])


# --- the browser ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard_dist() -> Path:
    """dashboard/dist, built (or rebuilt when stale) with npm; skips when npm is absent."""
    if shutil.which("npm") is None:
        pytest.skip(
            "npm is not installed, so the dashboard cannot be built (the daemon serves its "
            "'not built' page at /); install Node.js and npm to run this test"
        )
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build-dashboard.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, f"dashboard build failed:\n{result.stdout}\n{result.stderr}"
    dist = DASHBOARD / "dist"
    assert (dist / "index.html").is_file()
    return dist


HUB_REPO = "exo-test/smollm2-copy"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no chromium at {CHROMIUM} (scripts/test.sh installs Debian's as root)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def hub(shared_models: Path) -> Iterator[FakeHub]:
    """A hub on loopback holding the built-in model's files as a repository."""
    builtin = shared_models / BUILTIN
    files = {p.name: p.read_bytes() for p in builtin.iterdir() if p.name != MARKER_NAME}
    with serving(FakeHub(repos={HUB_REPO: FakeRepo(files)})) as hub:
        yield hub


@pytest.fixture
def node(
    tmp_path_factory: pytest.TempPathFactory,
    shared_models: Path,
    dashboard_dist: Path,
    hub: FakeHub,
) -> Iterator[Daemon]:
    daemon = Daemon(
        tmp_path_factory.mktemp("dash"),
        shared_models,
        "--dashboard-dir",
        str(dashboard_dist),
        "--hf-endpoint",
        hub.url,
    ).start()
    try:
        yield daemon
    finally:
        daemon.stop()


def _shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_dashboard_places_chats_and_deletes(node: Daemon, browser: Browser) -> None:
    node_id: str = node.get("/healthz")["node_id"]
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    external: list[str] = []
    errors: list[str] = []

    def on_request(request: Request) -> None:
        if not request.url.startswith((node.url, "data:")):
            external.append(request.url)

    page.on("request", on_request)
    page.on("pageerror", lambda exc: errors.append(str(exc)))

    # The node, live.
    page.goto(node.url)
    expect(page.get_by_test_id("connection")).to_have_attribute("data-status", "live")
    card = page.locator(f'[data-testid="node-card"][data-node-id="{node_id}"]')
    expect(card.get_by_test_id("node-master")).to_be_visible()  # a lone node is its master
    expect(card).to_be_visible()
    expect(card).to_contain_text("this node")
    expect(page.locator(f'[data-testid="topology-node"][data-node-id="{node_id}"]')).to_be_visible()
    expect(page.get_by_test_id("no-instances")).to_be_visible()

    # A model from the hub: a wrong id is refused with the reason; a repository joins the
    # model list through the catalogue's event, selected.
    page.get_by_test_id("hub-repo").fill("not-a-repo")
    page.get_by_test_id("hub-add").click()
    expect(page.get_by_test_id("hub-error")).to_contain_text("owner/name")
    page.get_by_test_id("hub-repo").fill(HUB_REPO)
    page.get_by_test_id("hub-add").click()
    expect(page.get_by_test_id("hub-added")).to_contain_text(HUB_REPO, timeout=30_000)
    expect(page.get_by_test_id("model-select")).to_have_value(HUB_REPO, timeout=15_000)
    assert HUB_REPO in node.get("/state")["state"]["models"]

    # A placement the master refuses shows the master's reason. (The picker lists only
    # known nodes: pin to one that is not in the cluster by adding it to the list.)
    page.get_by_test_id("model-select").select_option(BUILTIN)
    page.get_by_test_id("node-select").evaluate("s => s.add(new Option('gone', 'node-gone'))")
    page.get_by_test_id("node-select").select_option("node-gone")
    page.get_by_test_id("place-button").click()
    expect(page.get_by_test_id("place-error")).to_contain_text("node-gone", timeout=30_000)
    page.get_by_test_id("node-select").select_option("")

    # Place the built-in model through the picker and watch it load (pushed, not polled).
    page.get_by_test_id("place-button").click()
    instance = page.get_by_test_id("instance-card")
    expect(instance).to_be_visible(timeout=30_000)
    expect(instance).to_contain_text(BUILTIN)
    _shot(page, "dashboard-placing")
    expect(instance).to_have_attribute("data-status", "serving", timeout=240_000)
    placed = node.get("/instances")["data"]
    assert [v["instance"]["instance_id"] for v in placed] == [
        instance.get_attribute("data-instance-id")
    ]
    # The solver's placement carries its prediction (none if telemetry had not reported yet).
    if placed[0]["instance"].get("prediction") is not None:
        expect(instance.get_by_test_id("predicted-tps")).not_to_have_text("–")

    # Chat: the reply streams in token by token, then shows TTFT and tokens/s.
    page.get_by_label("max tokens").fill("24")
    page.get_by_test_id("chat-input").fill("Name three colours.")
    page.get_by_test_id("chat-input").press("Enter")
    reply = page.get_by_test_id("assistant-turn").last
    figures = reply.get_by_test_id("chat-figures")
    lengths: set[int] = set()
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = reply.locator(".text").inner_text()
        if text.strip():
            lengths.add(len(text))
        if "tokens/s" in figures.inner_text() and page.get_by_test_id("chat-send").count():
            break
        page.wait_for_timeout(50)
    final = reply.locator(".text").inner_text().strip()
    assert final, "no text streamed"
    assert len(lengths) > 1, f"the reply arrived in one piece, not streamed: {lengths}"
    expect(figures).to_contain_text("TTFT")
    expect(figures).to_contain_text("tokens/s")
    # The finished request reaches the dashboard through the event stream.
    expect(page.get_by_test_id("counter-finished")).to_have_text("1", timeout=30_000)
    expect(instance.get_by_test_id("measured-tps")).not_to_have_text("–")
    # The state's own measured figure, folded from TaskFinished.
    expect(instance.get_by_test_id("measured-mean-tps")).not_to_have_text("–")
    _shot(page, "dashboard-chat")

    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True)
    phone_page = phone.new_page()
    phone_page.goto(node.url)
    expect(phone_page.get_by_test_id("instance-card")).to_be_visible()
    _shot(phone_page, "dashboard-phone")
    phone.close()

    # Delete it from the card.
    instance.get_by_role("button", name="Delete instance").click()
    expect(page.get_by_test_id("no-instances")).to_be_visible(timeout=30_000)
    assert node.get("/instances")["data"] == []

    # A node that cannot join (another secret) is named, with why, until it gives up.
    expect(page.get_by_test_id("refused")).to_have_count(0)
    intruder = Daemon(
        node.home.parent / f"intruder-{node.port}",
        None,
        "--peer",
        node.mesh_address,
        "--secret",
        "x",
    ).start()
    try:
        expect(page.get_by_test_id("refused")).to_contain_text("auth_mismatch", timeout=30_000)
        _shot(page, "dashboard-refused")
    finally:
        intruder.stop()

    # A dropped stream: the node greys out, then the dashboard reconnects and resyncs.
    node.stop()
    expect(page.get_by_test_id("connection")).not_to_have_attribute(
        "data-status", "live", timeout=15_000
    )
    expect(card).to_have_class(re.compile(r"\bdown\b"))
    node.start()
    expect(page.get_by_test_id("connection")).to_have_attribute(
        "data-status", "live", timeout=30_000
    )
    expect(card.get_by_test_id("node-status")).to_have_text("up")
    index = httpx.get(f"{node.url}/state", timeout=10).json()["last_index"]
    expect(page.get_by_title("last event index folded")).to_have_text(f"#{index}", timeout=15_000)

    assert external == [], f"the dashboard made external requests: {external}"
    assert errors == [], f"page errors: {errors}"
    context.close()
