"""`dsq dashboard` in a real headless Chromium (Debian's chromium and chromium-driver, driven by Selenium): served
on a loopback address that is not 127.0.0.1, so it makes a token and the browser comes in by its link; pages load
with no console error, the curves are drawn, the numbers are the CLI's, an abstained image shows its counts, a
sequential image its bound against n, an image its preview, a script in a job's name stays text; SIGTERM stops the server with 143. One dashboard and one browser for the module."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dsq.db import repo
from dsq.db.session import open_database, session_scope
from tests.test_dashboard import ABSTAINED, ROOT, SCRIPT, TRACE, store_result
from tests.test_reporting import FIXED, SEQUENTIAL, SPEC, add_job, ok

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
HOST = "127.0.0.2"  # loopback, but not 127.0.0.1: the dashboard must make a token
DEADLINE = 120  # seconds for the server to say its address, and for a page's plot to be drawn (a loaded machine)


@pytest.fixture(scope="module")
def served(tmp_path_factory, starts_processes):
    home = tmp_path_factory.mktemp("dashboard-browser")
    url = f"sqlite:///{home / 'dsq.db'}"
    engine = open_database(url)
    with session_scope(engine) as session:
        for name, sigma, rows, spec in [("MSE s=0.25", 0.25, FIXED, SPEC), ("MSE s=0.5", 0.5, FIXED, SPEC),
                                        (f"{SCRIPT} s=0.25", 0.25, FIXED, SPEC),
                                        ("STAB s=0.5", 0.5, SEQUENTIAL, {**SPEC, "radius": 0.3})]:
            add_job(session, rows, spec={**spec, "sigma": sigma}, name=name, experiment="grid", meta={"sigma": sigma})
        repo.create_job(session, kind="certify", spec=SPEC, seed=0, name="waiting", total=20)
        store_result(session, 4, 0, {"mode": "sequential", "target_radius": 0.3, "max_n": 1000, "trace": TRACE},
                     sigma=0.5)
        repo.upsert_preview(session, 1, 0, png=tiny_png(), classes=[0, 0, 1, 0])
    engine.dispose()
    server = subprocess.Popen([sys.executable, "-m", "cli", "--db", url, "dashboard", "--host", HOST, "--port", "0"],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "DSQ_HOME": str(home)})
    try:
        line = server.stdout.readline()  # blocks until the server has bound its socket (or died)
        found = re.search(r"(http://\S+\?token=\S+)", line)
        assert found, (line, server.poll())
        yield home, found.group(1), server
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(30)


def tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (5 * 64 + 8, 130), "grey").save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def browser(served):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,1500"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    driver.set_page_load_timeout(DEADLINE)
    try:
        yield driver
    finally:
        driver.quit()


def visit(browser, address: str) -> None:
    """Load a page; fail on any console error it logs."""
    browser.get(address)
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, (address, errors)


def wait_for(browser, css: str):
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, DEADLINE).until(expected_conditions.presence_of_element_located(("css selector",
                                                                                                    css)))


def table_text(browser, table_id: str) -> list[list[str]]:
    rows = browser.find_elements("css selector", f"#{table_id} tbody tr")
    return [[cell.text for cell in row.find_elements("css selector", "td")] for row in rows]


def test_pages_in_a_real_browser(served, browser):
    from selenium.common.exceptions import NoAlertPresentException

    home, link, _ = served
    base = link.split("?")[0]
    visit(browser, link)  # ?token= sets the cookie and leads to the queue without it in the address bar
    assert browser.current_url == base and browser.find_element("css selector", "h1").text == "dsq queue"
    names = [row[2] for row in table_text(browser, "jobs")]
    assert f"{SCRIPT} s=0.25" in names and "waiting" in names
    wait_for(browser, "#updated")
    deadline = time.monotonic() + DEADLINE  # the live poll answers: its line changes
    while "updated" not in browser.find_element("css selector", "#updated").text.split(" ")[0]:
        assert time.monotonic() < deadline, "the queue's live poll never answered"
        time.sleep(0.2)

    visit(browser, base + "experiments/grid")
    wait_for(browser, "#curves-plot .main-svg .scatterlayer .trace")
    traces = browser.find_elements("css selector", "#curves-plot .scatterlayer .trace")
    assert len(traces) >= 4  # curves, bands, the envelope and the sequential point
    legend = browser.find_element("css selector", "#curves-plot .legend").text
    assert f"{SCRIPT} s=0.25" in legend  # shown as text, not run
    printed = json.loads(ok(home, "results", "--experiment", "grid", "--format", "json").stdout)
    envelope = {row["label"]: row for row in printed["rows"] if row["table"] == "envelope"}
    shown = {row[0]: row for row in table_text(browser, "table-envelope")}
    for label, row in envelope.items():
        cells = [None if row[f"r={r:g}"] is None else f"{100 * row[f'r={r:g}']:.1f}" for r in printed["radii"]]
        assert [cell.split(" ")[0].rstrip("†") for cell in shown[label][1:1 + len(cells)]] == [c or "—" for c in cells], label
    browser.save_screenshot(str(home / "experiment.png"))

    visit(browser, base + "jobs/3")
    wait_for(browser, "#curve-plot .main-svg .scatterlayer .trace")
    assert browser.find_element("css selector", "#job-name").text == f"{SCRIPT} s=0.25"
    with pytest.raises(NoAlertPresentException):
        browser.switch_to.alert.text
    browser.find_element("css selector", f'#abstained a[href$="/images/{ABSTAINED}"]').click()
    wait_for(browser, "#counts")
    assert "abstained" in browser.find_element("css selector", "#verdict").text
    assert table_text(browser, "counts") == [["0", "0", "1"], ["1", "10", "99"]]
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]

    visit(browser, base + "jobs/4/images/0")  # a sequential image's p_lower against n, and the level p0
    wait_for(browser, "#trace-plot .main-svg .scatterlayer .trace")
    assert len(browser.find_elements("css selector", "#trace-plot .scatterlayer .trace")) == 2
    visit(browser, base + "jobs/1/images/0")  # its preview, loaded with the token's cookie
    image = wait_for(browser, "#preview img")
    deadline = time.monotonic() + DEADLINE
    while not browser.execute_script("return arguments[0].complete", image):
        assert time.monotonic() < deadline, "the preview never loaded"
        time.sleep(0.2)
    assert browser.execute_script("return arguments[0].naturalWidth", image) == 5 * 64 + 8
    screenshots = os.environ.get("DSQ_SCREENSHOTS")
    if screenshots:  # the README's picture is taken from a real run this way
        browser.get(base + "experiments/grid")
        wait_for(browser, "#curves-plot .main-svg .scatterlayer .trace")
        browser.save_screenshot(os.path.join(screenshots, "dashboard.png"))


def test_a_report_is_one_file_that_draws_offline(served, browser):
    home, _, _ = served
    path = home / "report.html"
    ok(home, "report", "--experiment", "grid", "--html", path)
    visit(browser, path.as_uri())  # a file: no server, and any network load would be a console error
    wait_for(browser, "#curves-plot .main-svg .scatterlayer .trace")
    assert not [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]


def test_sigterm_stops_the_dashboard(served, browser):
    _, link, server = served
    server.send_signal(signal.SIGTERM)
    assert server.wait(DEADLINE) == 128 + signal.SIGTERM
    assert "dashboard stopped" in server.stderr.read()
