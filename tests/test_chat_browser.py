"""The chat page in a real browser: Playwright (sync API) driving Debian's chromium.

Two users sign up through the page in two browser contexts, Alice finds Bob and sends him a direct message,
Bob opens Alice's conversation and sees it, and both activity feeds show it (the page polls every second; the
feed is filled by the outbox relay). A screenshot is kept in test-artifacts/ at the repo root.

`make test` installs chromium with apt-get when it is missing and the machine allows it. Where it is still
missing the test is skipped with a loud reason, except under CI=true, where that is a failure.
"""

from __future__ import annotations

import os
import pathlib
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers_real import MissingComponentWarning, missing_component

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `examples` is a top-level directory, not an installed package
    sys.path.insert(0, str(REPO))

CHROMIUM = pathlib.Path("/usr/bin/chromium")
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 15_000

PASSWORD = "correct horse battery"

pytestmark = pytest.mark.slow


def require_chromium() -> None:
    if CHROMIUM.exists() and os.access(CHROMIUM, os.X_OK):
        return
    missing_component("BROWSER TEST", f"{CHROMIUM} is missing. Install Debian's chromium "
                      "(`make browser` does it as root with apt-get: apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def base_url(tmp_path: pathlib.Path) -> Iterator[str]:
    """The chat app under uvicorn in a background thread, on a fresh data root and a free port."""
    import uvicorn

    from examples.chat.app import create_app

    config = uvicorn.Config(create_app(str(tmp_path / "data")), host="127.0.0.1", port=free_port(),
                            log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="chat-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive():
            pytest.fail("uvicorn stopped before it started")
        if time.monotonic() > deadline:
            pytest.fail("uvicorn did not start within 20 s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{config.port}"
    finally:
        server.should_exit = True
        thread.join(20)
        assert not thread.is_alive(), "uvicorn did not stop"


def sign_up(page: Any, base_url: str, email: str, name: str) -> None:
    from playwright.sync_api import expect

    page.goto(base_url + "/")
    form = page.locator("#signup-form")
    form.locator("input[name=email]").fill(email)
    form.locator("input[name=name]").fill(name)
    form.locator("input[name=password]").fill(PASSWORD)
    form.locator("button[type=submit]").click()
    expect(page.locator("#me")).to_contain_text(name)  # set once /api/me answers for the new session
    expect(page.locator("#logout")).to_be_visible()
    expect(page.locator("#auth-error")).to_have_text("")


def open_dm(page: Any, search: str, name: str) -> None:
    from playwright.sync_api import expect

    page.locator("#user-search").fill(search)
    button = page.locator("#user-results button[data-user-id]", has_text=name)
    expect(button).to_have_count(1)
    button.click()
    expect(page.locator("#conv-title")).to_contain_text(name)
    expect(page.locator("#send-form")).to_be_visible()


def watch_csp(page: Any, errors: list[str]) -> None:
    """Append every Content-Security-Policy violation chromium reports on ``page``'s console to ``errors``."""
    def on_console(message: Any) -> None:
        if "Content Security Policy" in message.text:
            errors.append(message.text)

    page.on("console", on_console)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    require_chromium()
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, timeout=60_000)
        try:
            yield chromium
        finally:
            chromium.close()


def test_two_users_exchange_a_direct_message(browser: Any, base_url: str) -> None:
    from playwright.sync_api import expect

    text = f"hello bob {uuid.uuid4().hex[:8]}"
    reply = f"hi alice {uuid.uuid4().hex[:8]}"
    ARTIFACTS.mkdir(exist_ok=True)
    errors: list[str] = []
    alice_ctx = browser.new_context(viewport={"width": 1200, "height": 800})
    bob_ctx = browser.new_context(viewport={"width": 1200, "height": 800})
    alice, bob = alice_ctx.new_page(), bob_ctx.new_page()
    for page in (alice, bob):
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        watch_csp(page, errors)
    try:
        sign_up(alice, base_url, "alice@example.com", "Alice")
        sign_up(bob, base_url, "bob@example.com", "Bob")

        # the session cookie is HttpOnly and SameSite: the page's scripts cannot read it
        cookies = alice_ctx.cookies(base_url)
        assert [c["name"] for c in cookies] == ["shardlite_chat"]
        assert cookies[0]["httpOnly"] and cookies[0]["sameSite"] in ("Strict", "Lax")
        assert "shardlite_chat" not in alice.evaluate("document.cookie")

        # Alice finds Bob and writes to him
        open_dm(alice, "bo", "Bob")
        alice.locator("#send-text").fill(text)
        alice.locator("#send-form button[type=submit]").click()
        expect(alice.locator("#messages li.message", has_text=text)).to_have_count(1)
        expect(alice.locator("#send-text")).to_have_value("")
        expect(alice.locator("#chat-error")).to_have_text("")

        # Bob's feed fills (relay + the page's one-second poll), then he opens the conversation
        expect(bob.locator("#feed li.feed-item", has_text=text)).to_have_count(1)
        open_dm(bob, "ali", "Alice")
        expect(bob.locator("#messages li.message", has_text=text)).to_have_count(1)
        expect(bob.locator("#messages li.message").first).to_contain_text("Alice")
        expect(alice.locator("#feed li.feed-item", has_text=text)).to_have_count(1)

        # Bob answers; Alice sees it in the open conversation and in her feed without reloading
        bob.locator("#send-text").fill(reply)
        bob.locator("#send-text").press("Enter")
        expect(bob.locator("#messages li.message", has_text=reply)).to_have_count(1)
        expect(alice.locator("#messages li.message", has_text=reply)).to_have_count(1)
        expect(alice.locator("#messages li.message")).to_have_count(2)
        for page in (alice, bob):
            expect(page.locator("#feed li.feed-item", has_text=reply)).to_have_count(1)
            expect(page.locator("#feed li.feed-item")).to_have_count(2)

        alice.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
        bob.screenshot(path=str(ARTIFACTS / "chat-bob.png"), full_page=True)
    except Exception:
        for name, page in (("alice", alice), ("bob", bob)):
            try:
                page.screenshot(path=str(ARTIFACTS / f"chat-failure-{name}.png"), full_page=True)
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
        raise
    finally:
        alice_ctx.close()
        bob_ctx.close()

    assert not errors, f"JavaScript errors on the page: {errors}"
    assert (ARTIFACTS / "chat.png").stat().st_size > 1000


def test_panels_follow_the_session(browser: Any, base_url: str) -> None:
    from playwright.sync_api import expect

    ctx = browser.new_context()
    try:
        page = ctx.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(base_url + "/")
        expect(page.locator("#signup-form")).to_be_visible()
        expect(page.locator("#chat")).to_be_hidden(timeout=3000)
        sign_up(page, base_url, "carol@example.com", "Carol")
        expect(page.locator("#chat")).to_be_visible()
        expect(page.locator("#send-form")).to_be_hidden(timeout=3000)  # no conversation picked yet
        expect(page.locator("#auth")).to_be_hidden(timeout=3000)
    finally:
        ctx.close()


def test_page_runs_under_its_content_security_policy_and_cannot_be_framed(browser: Any, base_url: str) -> None:
    """The page is served with its strict policy and works under it (sign-up, log-in, rooms, log-out: no
    violation reported). Chromium names the page's origin in every POST it sends, body-less ones (room join,
    log-out) included, which the app requires. A page of another origin that frames it gets nothing
    (frame-ancestors 'none', X-Frame-Options)."""
    from playwright.sync_api import expect

    from examples.chat.security import CONTENT_SECURITY_POLICY

    ctx = browser.new_context()
    errors: list[str] = []
    posts: list[Any] = []  # the POST requests the page sent
    try:
        page = ctx.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("request", lambda request: posts.append(request) if request.method == "POST" else None)
        watch_csp(page, errors)
        response = page.goto(base_url + "/")
        assert response is not None and response.status == 200
        assert response.headers.get("content-security-policy") == CONTENT_SECURITY_POLICY
        assert response.headers.get("x-frame-options") == "DENY"
        sign_up(page, base_url, "frank@example.com", "Frank")
        page.locator("#new-room-form input[name=name]").fill("csp room")
        page.locator("#new-room-form button[type=submit]").click()
        expect(page.locator("#conv-title")).to_contain_text("csp room")
        expect(page.locator("#rooms button[data-room-id]", has_text="csp room")).to_have_count(1)
        expect(page.locator("#chat-error")).to_have_text("")  # the room's join POST went through
        page.locator("#logout").click()
        expect(page.locator("#signup-form")).to_be_visible()
        page.reload()  # the session really ended on the server: the page comes back logged out
        expect(page.locator("#signup-form")).to_be_visible()
        expect(page.locator("#chat")).to_be_hidden()
        assert not errors, errors
        paths = [request.url.removeprefix(base_url) for request in posts]
        assert paths[:2] == ["/api/signup", "/api/login"] and paths[-1] == "/api/logout", paths
        assert any(p.endswith("/join") for p in paths), paths
        sent = [(request.url, request.all_headers().get("origin")) for request in posts]  # as sent on the wire
        assert all(origin == base_url for _, origin in sent), sent

        # a document of another origin (about:blank, no policy of its own) frames the page
        other = ctx.new_page()
        other.evaluate("""(src) => new Promise((resolve) => {
            const frame = document.createElement("iframe");
            frame.onload = () => resolve(); frame.src = src; document.body.append(frame);
        })""", base_url + "/")
        framed = [f for f in other.frames if f is not other.main_frame]
        assert len(framed) == 1
        assert framed[0].locator("#signup-form").count() == 0, "the page rendered inside another origin's frame"
    finally:
        ctx.close()


def test_people_search_lists_buttons(browser: Any, base_url: str) -> None:
    import httpx
    from playwright.sync_api import expect

    r = httpx.post(base_url + "/api/signup", json={"email": "dave@example.com", "password": PASSWORD, "name": "Dave"},
                   headers={"Origin": base_url})  # the app refuses state changes from elsewhere
    assert r.status_code == 201, r.text
    ctx = browser.new_context()
    errors: list[str] = []
    try:
        page = ctx.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        sign_up(page, base_url, "erin@example.com", "Erin")
        page.locator("#user-search").fill("da")
        expect(page.locator("#user-results button[data-user-id]", has_text="Dave")).to_have_count(1, timeout=3000)
        assert not errors, errors
    finally:
        ctx.close()


def test_missing_browser_skips_loudly_but_fails_under_ci(monkeypatch: pytest.MonkeyPatch,
                                                         tmp_path: pathlib.Path) -> None:
    """The policy itself, without a browser: skip with a loud reason, or fail when CI=true."""
    monkeypatch.setattr(sys.modules[__name__], "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="BROWSER TEST NOT RUN"), pytest.warns(MissingComponentWarning):
        require_chromium()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_chromium()
