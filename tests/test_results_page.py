"""The results page in a real browser: headless Chromium (Debian's package) driven by Playwright, against a real
`manage.py api` server on PostgreSQL after a small sweep has finished under a real burst worker. Logs in (and is
refused with a wrong or revoked token), sorts the sweep's report by a metric, loads the box plot, reads a job's
examples side by side and compares two variants; screenshots go to test-artifacts/. Cheap checks without the
browser (httpx): the login redirect, no open redirect, escaping, a read-only token's retry refused, and the JSON API
still answering on the paths it shares with the pages."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
import zipfile
from urllib.parse import quote

import httpx
import pytest
import redis
import yaml
from sqlalchemy import select

from tests.conftest import (REDIS_URL, REPO, RUN_ID, _drop_pg_database, _pg_database, cli, create_token, ok_json,
                            session_of, start_api, start_worker)

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts"
HTML = {"Accept": "text/html"}
SWEEP = {"name": "pages", "base": {"model": "tiny-t5", "max_steps": 30, "eval_limit": 16, "eval_steps": 15},
         "grid": {"learning_rate": [1e-3, 3e-3]}, "eval": {"split": "test", "limit": 12}}
BROKEN = {"name": "broken", "base": {"model": "tiny-t5", "max_steps": 5, "eval_split": None,
                                     "target_modules": ["no_such_module"]}, "eval": {"limit": 4}}
EVIL_SWEEP = '<img src=x onerror=alert("sweep")>'  # no "/": a path segment cannot hold one
EVIL_ADAPTER = "<script>alert(1)</script>"


@pytest.fixture(scope="module")
def site(tmp_path_factory, builtin_home):
    """A finished 2-point sweep (and a sweep whose only point failed) on PostgreSQL, a running `manage.py api`, and
    tokens: `writer`, `reader` (read-only), `revoked`."""
    from models.results import Adapter
    from models.sweeps import Sweep

    folder = tmp_path_factory.mktemp("results-page")
    home = folder / "home"
    shutil.copytree(builtin_home / "builtin", home / "builtin")
    database = f"tq_test_{RUN_ID}_{uuid.uuid4().hex[:6]}"
    queue = f"tq-test-{RUN_ID}-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "TUNEQUEUE_HOME": str(home), "DATABASE_URL": _pg_database(database), "REDIS_URL": REDIS_URL,
           "TUNEQUEUE_QUEUE": queue, "PYTHONUNBUFFERED": "1"}
    server = None
    try:
        assert cli(env, "db", "upgrade").returncode == 0
        for data in (SWEEP, BROKEN):
            path = folder / f"{data['name']}.yaml"
            path.write_text(yaml.safe_dump(data))
            queued = cli(env, "sweep", str(path), "--max-attempts", "1")
            assert queued.returncode == 0, queued.stderr
        worker = start_worker(env, "--burst", log=folder / "worker.log")
        assert worker.wait(timeout=600) == 0, (folder / "worker.log").read_text()[-3000:]
        tokens = {name: create_token(env, name, read_only=name == "reader") for name in ("writer", "reader", "revoked")}
        assert cli(env, "tokens", "revoke", "revoked").returncode == 0
        with session_of(env) as session:  # names the CLI refuses, as an older version or a SQL client could write
            session.add(Sweep(name=EVIL_SWEEP, spec={}, points=0))
            session.add(Adapter(name=EVIL_ADAPTER, base_model="tiny-t5", method="lora", hyperparameters={},
                                path="adapters/missing", size_bytes=1, trainable_params=1, total_params=10))
            session.commit()
        server, base = start_api(env, log=folder / "api.log")
        yield {"env": env, "base": base, "tokens": tokens, "log": folder / "api.log"}
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
        _drop_pg_database(database)
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(f"*{queue}*"):
            client.delete(key)


@contextlib.contextmanager
def logged_in(site, token_name: str):
    """An httpx client holding the page cookie of `token_name`, as a browser would after logging in."""
    with httpx.Client(base_url=site["base"], headers=HTML, timeout=60) as client:
        answer = client.post("/login", data={"token": site["tokens"][token_name], "next": "/"})
        assert answer.status_code == 303 and answer.headers["location"] == "/", answer.text
        cookie = answer.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        yield client


def job_statuses(site) -> dict[int, str]:
    from models.jobs import Job

    with session_of(site["env"]) as session:
        return {job.id: job.status.value for job in session.scalars(select(Job))}


# --------------------------------------------------------------------------------------------- without a browser
def test_pages_need_a_login_and_never_redirect_elsewhere(site):
    with httpx.Client(base_url=site["base"], headers=HTML, timeout=60) as client:
        for path in ("/", "/sweeps/pages?sort=rouge1", "/adapters", "/jobs/1"):
            answer = client.get(path)
            assert answer.status_code == 303 and answer.headers["location"] == f"/login?next={quote(path, safe='')}"
        for token in ("tq_wrong", site["tokens"]["revoked"], ""):
            refused = client.post("/login", data={"token": token, "next": "/"})
            assert refused.status_code == 401 and "set-cookie" not in refused.headers
            assert "not valid" in refused.text
        for target, landing in (("//evil.example/x", "/"), ("https://evil.example/", "/"), ("/\\evil.example", "/"),
                                ("/sweeps/pages?sort=rouge2", "/sweeps/pages?sort=rouge2")):
            answer = client.post("/login", data={"token": site["tokens"]["reader"], "next": target})
            assert answer.status_code == 303 and answer.headers["location"] == landing, target
        assert 'name="next" value="/"' in client.get("/login", params={"next": "https://evil.example"}).text


def test_names_are_escaped(site):
    with logged_in(site, "reader") as client:
        for path in ("/", f"/sweeps/{quote(EVIL_SWEEP, safe='')}", "/adapters"):
            page = client.get(path)
            assert page.status_code == 200, (path, page.text[:300])
            assert "<script>alert" not in page.text and "<img src=x" not in page.text, path
        escaped_sweep = "&lt;img src=x onerror=alert(&#34;sweep&#34;)&gt;"
        assert escaped_sweep in client.get("/").text
        assert f"Sweep {escaped_sweep}" in client.get(f"/sweeps/{quote(EVIL_SWEEP, safe='')}").text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in client.get("/adapters").text


def test_read_only_token_cannot_retry(site):
    before = job_statuses(site)
    with logged_in(site, "reader") as client:
        page = client.get("/sweeps/broken")
        assert "no_such_module" in page.text and 'id="retry" disabled' in page.text
        assert client.post("/sweeps/broken/retry").status_code == 403
    assert job_statuses(site) == before


def test_the_json_api_keeps_the_paths_it_shares_with_the_pages(site):
    bearer = {"Authorization": f"Bearer {site['tokens']['reader']}"}
    adapters = httpx.get(site["base"] + "/adapters", headers=bearer, timeout=60)
    assert adapters.status_code == 200, adapters.text
    assert {"pages-01", "pages-02"} <= {a["name"] for a in adapters.json()}
    assert httpx.get(site["base"] + "/adapters", timeout=60).status_code == 401  # curl without a token: no page


# --------------------------------------------------------------------------------------------- in the browser
@pytest.fixture(scope="module")
def browser(site):
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH (Debian: apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    profile = tempfile.mkdtemp(prefix="tq-chromium-")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                               args=CHROMIUM_ARGS, accept_downloads=True,
                                                               viewport={"width": 1400, "height": 900})
        context.set_default_timeout(60_000)
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


def log_in(page, site, token: str, next_path: str) -> None:
    page.goto(f"{site['base']}{next_path}")
    assert "/login?next=" in page.url
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")


def fresh_page(browser, site, token_name: str, next_path: str):
    """A new tab, logged in afresh with token `token_name`, on `next_path`."""
    browser.clear_cookies()
    page = browser.new_page()
    log_in(page, site, site["tokens"][token_name], next_path)
    assert page.url == site["base"] + next_path
    return page


def test_login_refused_then_accepted_and_revocation_logs_out(site, browser):
    browser.clear_cookies()
    page = browser.new_page()
    for wrong in ("tq_not_a_token", site["tokens"]["revoked"]):
        log_in(page, site, wrong, "/sweeps/pages")
        assert "/login" in page.url and "not valid" in page.inner_text(".error")
    assert not browser.cookies()
    temporary = create_token(site["env"], "temporary")
    log_in(page, site, temporary, "/sweeps/pages")
    assert page.url == f"{site['base']}/sweeps/pages" and page.inner_text("h1") == "Sweep pages"
    (cookie,) = browser.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # HttpOnly: no script can read the token
    assert cli(site["env"], "tokens", "revoke", "temporary").returncode == 0
    page.reload()
    assert "/login?next=" in page.url
    page.close()


def test_sweep_page_sorts_plots_and_marks_the_best(site, browser):
    page = fresh_page(browser, site, "writer", "/")
    page.click("text=pages")
    assert page.url.endswith("/sweeps/pages")
    page.click("#report th[data-metric=rouge2] a")
    assert page.url.endswith("/sweeps/pages?metric=rouge&sort=rouge2")
    shown = page.eval_on_selector_all("#report tbody tr", """rows => rows.map(r => ({
        variant: r.dataset.variant, best: r.classList.contains('best'),
        rouge2: parseFloat(r.querySelector('td[data-metric=rouge2]').dataset.value)}))""")
    cli_rows = json.loads(cli(site["env"], "report", "--sweep", "pages", "--sort", "rouge2", "--format", "json").stdout)
    assert [r["variant"] for r in shown] == [r["variant"] for r in cli_rows]
    assert sorted(r["variant"] for r in shown) == ["base", "pages-01", "pages-02"]
    values = [r["rouge2"] for r in shown]
    assert values == sorted(values, reverse=True) and values == pytest.approx([r["rouge2"] for r in cli_rows])
    (best,) = [r for r in shown if r["best"]]
    assert best["rouge2"] == max(r["rouge2"] for r in shown if r["variant"] != "base")
    assert "★" in page.inner_text(f"#report tr[data-variant={best['variant']}]")
    for image in ("#boxplot", "#lossplot"):
        page.wait_for_function(f"() => document.querySelector('{image}').complete")
        assert page.eval_on_selector(image, "img => img.naturalWidth") > 500, image
    assert page.query_selector("#failed") is None  # both points succeeded
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "results-sweep.png"), full_page=True)

    page.goto(f"{site['base']}/sweeps/broken")
    assert "no_such_module" in page.inner_text("#failed") and page.is_enabled("#retry")
    page.close()


def test_examples_side_by_side_and_compared(site, browser):
    from models.results import ExampleScore, Generation

    page = fresh_page(browser, site, "reader", "/sweeps/pages")
    generate_link = page.locator("#sweep-jobs tr", has_text="generate").locator("a").first
    generate_id = int(generate_link.inner_text())
    generate_link.click()
    assert page.url.endswith(f"/jobs/{generate_id}")
    headers = page.eval_on_selector_all("#example-table thead th", "cells => cells.map(c => c.innerText.trim())")
    assert headers == ["example", "input", "reference", "base", "pages-01", "pages-02"]
    assert page.locator("#example-table tbody tr").count() == 10 and "page 1 of 2" in page.inner_text("nav.pages")

    first = page.locator("#example-table tbody tr").first
    example_id = first.get_attribute("data-example")
    with session_of(site["env"]) as session:
        stored = {g.variant: g for g in session.scalars(select(Generation).where(
            Generation.job_id == generate_id, Generation.example_id == example_id))}
        scores = dict(session.execute(select(Generation.variant, ExampleScore.value).join(
            ExampleScore, ExampleScore.generation_id == Generation.id).where(
            Generation.job_id == generate_id, Generation.example_id == example_id,
            ExampleScore.name == "rouge1")).tuples().all())
    assert first.locator("td.source").inner_text().split() == stored["base"].source.split()
    assert first.locator("td.reference").inner_text().split() == stored["base"].reference.split()
    for variant in ("base", "pages-01", "pages-02"):
        cell = first.locator(f"td.output[data-variant={variant}]")
        assert cell.locator(".prediction").inner_text().split() == stored[variant].prediction.split()
        score = cell.locator(".score[data-metric=rouge1]")
        assert float(score.get_attribute("data-value")) == pytest.approx(scores[variant])
        assert f"rouge1 {scores[variant]:.3f}" in score.inner_text()

    page.select_option("select[name=a]", "base")
    page.select_option("select[name=b]", "pages-02")
    page.select_option("select[name=metric]", "rouge1")
    page.click("form.compare button")
    verdict = page.inner_text("#verdict")
    compared = cli(site["env"], "report", "--compare", "base", "pages-02", "--limit", "12")
    assert compared.stdout.splitlines()[0] in verdict
    differences = [float(text) for text in page.eval_on_selector_all(
        "#example-table td.difference", "cells => cells.map(c => c.innerText)")]
    assert differences and [abs(d) for d in differences] == sorted((abs(d) for d in differences), reverse=True)
    cli_pairs = json.loads(cli(site["env"], "report", "--compare", "base", "pages-02", "--limit", "10",
                               "--format", "json").stdout)
    assert differences == pytest.approx([round(p["difference"], 3) for p in cli_pairs], abs=1e-3)
    page.screenshot(path=str(ARTIFACTS / "results-examples.png"), full_page=True)
    page.close()


def test_adapters_and_front_page(site, browser):
    page = fresh_page(browser, site, "reader", "/adapters")
    names = page.eval_on_selector_all("#adapters tbody tr", "rows => rows.map(r => r.dataset.adapter)")
    assert {"pages-01", "pages-02", EVIL_ADAPTER} <= set(names)
    link = page.get_attribute("#adapters tr[data-adapter=pages-01] a.download", "href")
    assert link == "/adapters/pages-01/download"
    with page.expect_download() as download:
        page.click("#adapters tr[data-adapter=pages-01] a.download")
    with zipfile.ZipFile(download.value.path()) as zipped:
        assert "pages-01/adapter_config.json" in zipped.namelist()
    page.goto(site["base"] + "/")
    statuses = page.inner_text("#live")
    assert "pages" in statuses and "succeeded" in statuses and "failed" in statuses
    page.click("text=log out")
    assert "/login" in page.url and not browser.cookies()
    page.close()


def test_writer_retries_failed_points(site, browser):
    from models.jobs import Job
    from models.sweeps import Sweep

    page = fresh_page(browser, site, "writer", "/sweeps/broken")
    page.click("#retry")
    assert page.url.endswith("/sweeps/broken?retried=3") and "Re-queued 3 job(s)" in page.inner_text(".notice")
    with session_of(site["env"]) as session:
        statuses = session.scalars(select(Job.status).join(Sweep, Sweep.id == Job.sweep_id)
                                   .where(Sweep.name == "broken")).all()
    assert [s.value for s in statuses] == ["queued"] * 3
    page.goto(site["base"] + "/")  # unfinished jobs now: the front page polls itself and swaps its tables in
    page.eval_on_selector("#live[data-live='1']", "live => live.dataset.marked = 'old'")
    page.wait_for_function("() => document.getElementById('live').dataset.marked === undefined", timeout=20_000)
    assert "queued" in page.inner_text("#jobs")
    page.close()
