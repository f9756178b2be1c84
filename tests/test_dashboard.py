"""`dsq dashboard`'s pages and JSON through Starlette's TestClient on a SQLite file: the numbers are the CLI's,
every user string is escaped, bad ids are 404 pages, the token guards every page, the live poll is one query; and
`--linf` in `dsq results` and `dsq compare`."""

import json
import re
import subprocess
import sys
from datetime import timedelta
from html import unescape
from pathlib import Path

import pytest
from sqlalchemy import event
from starlette.testclient import TestClient

from dsq.dashboard.app import create_app
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from tests.test_reporting import FIXED, SEQUENTIAL, SPEC, add_job, add_training, dsq, ok

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = "<script>alert(1)</script>"
TOKEN = "a-token-long-enough-to-pass"
ABSTAINED = next(i for i, (_, prediction, _) in enumerate(FIXED) if prediction == -1)


@pytest.fixture(scope="module")
def home(tmp_path_factory, opens_database):
    """Experiment "grid": MSE at sigma 0.25 and 0.5, a method named like a script at 0.25, STAB sequential at
    0.5; a training outside it; a job whose images came from a folder of unknown size."""
    home = tmp_path_factory.mktemp("dashboard-home")
    engine = open_database(f"sqlite:///{home / 'dsq.db'}")
    ids = {}
    with session_scope(engine) as session:
        for key, name, sigma, rows, spec in [("mse", "MSE s=0.25", 0.25, FIXED, SPEC),
                                             ("mse half", "MSE s=0.5", 0.5, FIXED[3:], SPEC),
                                             ("script", f"{SCRIPT} s=0.25", 0.25, FIXED, SPEC),
                                             ("stab", "STAB s=0.5", 0.5, SEQUENTIAL, {**SPEC, "radius": 0.3})]:
            ids[key] = add_job(session, rows, spec={**spec, "sigma": sigma}, name=name, experiment="grid",
                               meta={"sigma": sigma})
        repo.add_log(session, ids["script"], f"loaded {SCRIPT}")
        ids["train"] = add_training(session, {"target": "denoiser", "objective": "mse", "sigma": 0.25})
        ids["folder"] = add_job(session, FIXED, spec={**SPEC, "dataset": "folder:/data/x"}, name="folder run")
    engine.dispose()
    return home, ids


@pytest.fixture(scope="module")
def engine(home):
    engine = open_database(f"sqlite:///{home[0] / 'dsq.db'}")
    yield engine
    engine.dispose()


@pytest.fixture(scope="module")
def client(engine):
    with TestClient(create_app(engine, timedelta(seconds=60))) as client:
        yield client


def page(client, url: str) -> str:
    answer = client.get(url)
    assert answer.status_code == 200, (url, answer.text[:500])
    return answer.text


def cells(html: str, table_id: str) -> list[list[str]]:
    """The text of each body row's cells of the table with this id."""
    body = re.search(rf'<table id="{re.escape(table_id)}">.*?<tbody>(.*?)</tbody>', html, re.S).group(1)
    return [[unescape(re.sub(r"<[^>]+>", "", c)).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def markdown_rows(text: str) -> dict[str, list[list[str]]]:
    """Each Markdown table's body rows, by the bold title before it."""
    found, key = {}, None
    for line in text.splitlines():
        if line.startswith("**"):
            key = line.strip("*")
        elif line.startswith("| ") and key and not line.startswith(("| method |", "| job |")):
            found.setdefault(key, []).append([c.replace("\\|", "|") for c in line.strip("| ").split(" | ")])
    return found


def test_every_page_answers_and_escapes_user_text(client, home):
    _, ids = home
    urls = ["/", f"/jobs/{ids['script']}", f"/jobs/{ids['mse']}", f"/jobs/{ids['stab']}", f"/jobs/{ids['train']}",
            "/experiments/grid", f"/jobs/{ids['mse']}/images/{ABSTAINED}", f"/jobs/{ids['mse']}?linf=1",
            "/experiments/grid?linf=1"]
    for url in urls:
        html = page(client, url)
        assert SCRIPT not in html and "alert(1)</script" not in html, url
    escaped = "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert escaped in page(client, "/") and escaped in page(client, "/experiments/grid")
    job = page(client, f"/jobs/{ids['script']}")
    assert f"{escaped} s=0.25" in job and f"loaded {escaped}" in job
    assert "\\u003cscript\\u003e" in job  # the plot's data: JSON with < escaped
    for url in ("/api/jobs", f"/api/jobs/{ids['script']}", "/api/experiments/grid"):
        answer = client.get(url)
        assert answer.headers["content-type"] == "application/json" and SCRIPT in answer.text


def test_the_pages_tables_are_the_clis_to_the_last_digit(client, home):
    home_dir, ids = home
    html = page(client, "/experiments/grid")
    printed = markdown_rows(ok(home_dir, "results", "--experiment", "grid", "--by-sigma", "--format",
                               "markdown").output)
    titles = [unescape(t) for t in re.findall(r"<h2>(.*?)</h2>", html)]
    for key, title in zip(("sigma=0.25", "sigma=0.5", "envelope"), titles):
        assert cells(html, f"table-{key}") == printed[title], key
    job = page(client, f"/jobs/{ids['mse']}")
    [printed_job] = markdown_rows("**job**\n" + ok(home_dir, "results", ids["mse"], "--format", "markdown").output
                                  ).values()
    assert cells(job, "results") == printed_job
    linf = page(client, f"/jobs/{ids['mse']}?linf=1")
    [printed_linf] = markdown_rows("**job**\n" + ok(home_dir, "results", ids["mse"], "--linf", "--format",
                                                    "markdown").output).values()
    assert cells(linf, "results") == printed_linf


def test_the_json_is_the_clis(client, home):
    home_dir, ids = home
    for job_id in (ids["mse"], ids["stab"]):
        answer = client.get(f"/api/jobs/{job_id}").json()
        assert answer["results"] == json.loads(ok(home_dir, "results", job_id, "--format", "json").output)
        summary = json.loads(ok(home_dir, "results", job_id, "--format", "json", "--summary").output)
        assert answer["table"] == summary["rows"] and answer["job"]["id"] == str(job_id)
    for query, options in (("", []), ("?by_sigma=1&linf=1&ci=0.05", ["--by-sigma", "--linf", "--ci"])):
        answer = client.get(f"/api/experiments/grid{query}").json()
        assert answer == json.loads(ok(home_dir, "results", "--experiment", "grid", "--format", "json",
                                       *options).stdout), query  # the warning of different images: stderr
    listed = {job["id"]: job for job in client.get("/api/jobs").json()}
    assert listed[str(ids["script"])]["name"] == f"{SCRIPT} s=0.25" and listed[str(ids["train"])]["kind"] == "train"


def test_an_abstained_image_shows_its_counts(client, home):
    _, ids = home
    html = page(client, f"/jobs/{ids['mse']}/images/{ABSTAINED}")
    assert "abstained" in cells(html, "certificate")[1][1] or "abstain" in html
    assert cells(html, "counts") == [["0", "0", "1"], ["1", "10", "99"]]  # counts_selection [0, 10], estimation [1, 99]
    job = page(client, f"/jobs/{ids['mse']}")
    assert f'href="/jobs/{ids["mse"]}/images/{ABSTAINED}"' in job
    answer = client.get(f"/jobs/{ids['mse']}/images?index={ABSTAINED}", follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == f"/jobs/{ids['mse']}/images/{ABSTAINED}"


@pytest.mark.parametrize("url", ["/jobs/999", "/jobs/abc", "/jobs/1/images/999", "/jobs/1/images/-1",
                                 "/experiments/nope", "/nothing", "/jobs/1/images?index=x", "/static/x.js",
                                 "/experiments/grid?ci=2"])
def test_bad_ids_and_names_are_404_pages(client, url):
    answer = client.get(url)
    assert answer.status_code == 404 and "<h1>404" in answer.text and "Traceback" not in answer.text


def test_bad_ids_under_api_are_404_json(client):
    answer = client.get("/api/jobs/999")
    assert answer.status_code == 404 and "999" in answer.json()["error"]


def test_pages_are_read_only(client):
    for url in ("/", "/jobs/1", "/api/jobs/1"):
        assert client.post(url).status_code == 405
        assert client.delete(url).status_code == 405


def test_the_live_poll_is_one_small_query(client, engine, home):
    _, ids = home
    statements = []
    listen = lambda *args: statements.append(args[2])  # noqa: E731 (conn, cursor, statement, ...)
    event.listen(engine, "before_cursor_execute", listen)
    try:
        answer = client.get("/api/queue").json()
    finally:
        event.remove(engine, "before_cursor_execute", listen)
    assert len(statements) == 1 and "results" not in statements[0]
    assert {"id": ids["stab"], "status": "succeeded", "progress": "20/20"} in answer


def test_the_token_guards_every_page(engine):
    with TestClient(create_app(engine, timedelta(seconds=60), token=TOKEN)) as guarded:
        for url in ("/", "/api/jobs", "/static/plotly.min.js", "/jobs/999"):
            answer = guarded.get(url)
            assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer", url
        assert guarded.get("/", headers={"Authorization": "Bearer wrong-token-of-some-length"}).status_code == 401
        assert guarded.get("/?token=wrong").status_code == 401
        assert guarded.get("/api/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        answer = guarded.get(f"/experiments/grid?linf=1&token={TOKEN}", follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"] == "/experiments/grid?linf=1"
        assert "httponly" in answer.headers["set-cookie"].lower()
        assert guarded.get("/experiments/grid?linf=1").status_code == 200  # the cookie it set


def test_linf_divides_every_radius_by_sqrt_d(home):
    home_dir, ids = home
    # digits: d = 64, so an L2 radius R is an L∞ radius R / 8
    l2 = json.loads(ok(home_dir, "results", ids["mse"], "--format", "json", "--summary", "--radii", "0.2").output)
    linf = json.loads(ok(home_dir, "results", ids["mse"], "--format", "json", "--summary", "--radii", "0.025",
                         "--linf").output)
    assert l2["rows"][0]["r=0.2"] == linf["rows"][0]["r=0.025"] and linf["rows"][0]["acr"] == pytest.approx(
        l2["rows"][0]["acr"] / 8)
    assert any("d = 64" in note for note in linf["notes"])
    compared = ok(home_dir, "compare", ids["mse"], ids["script"], "--linf", "--radii", "0.025", "--format", "json")
    assert [row["r=0.025"] for row in json.loads(compared.output)["rows"]] == [l2["rows"][0]["r=0.2"]] * 2
    sequential = json.loads(ok(home_dir, "results", ids["stab"], "--linf", "--format", "json", "--summary").output)
    assert list(sequential["radii"]) == [pytest.approx(0.3 / 8)]


@pytest.mark.parametrize("args", [["results", "{mse}", "--linf", "--format", "csv"],
                                  ["results", "{folder}", "--linf"], ["compare", "{mse}", "{folder}", "--linf"]])
def test_linf_refusals_are_one_line(home, args):
    home_dir, ids = home
    out = dsq(home_dir, *[a.format(**{k.replace(" ", "_"): v for k, v in ids.items()}) for a in args])
    assert out.exit_code == 2 and out.output.count("\n") == 1 and out.output.startswith("error: "), out.output


def test_a_report_is_one_self_contained_file(home, tmp_path):
    home_dir, ids = home
    for args in (["--experiment", "grid"], ["--job", str(ids["script"]), "--linf"]):
        path = tmp_path / "report.html"
        out = ok(home_dir, "report", *args, "--html", path)
        text = path.read_text()
        assert "report written to" in out.output and "<script src" not in text and "<link href" not in text
        assert "Plotly.newPlot" in text and "plotly.js v" in text.lower() and SCRIPT not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and 'href="/' not in text


@pytest.mark.parametrize("args", [["report", "--html", "x.html"], ["report", "--experiment", "grid", "--job", "1",
                                                                   "--html", "x.html"],
                                  ["report", "--job", "1", "--html", "x.png"],
                                  ["report", "--job", "1", "--html", "/no/such/folder/x.html"],
                                  ["report", "--job", "999", "--html", "{tmp}/x.html"],
                                  ["report", "--experiment", "nope", "--html", "{tmp}/x.html"],
                                  ["dashboard", "--port", "70000"], ["dashboard", "--token", "short"]])
def test_report_and_dashboard_refusals_are_one_line(home, tmp_path, args):
    out = dsq(home[0], *[a.format(tmp=tmp_path) for a in args])
    assert out.exit_code == 2 and out.output.count("\n") == 1 and out.output.startswith("error: "), out.output
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_new_result_shows_at_once(tmp_path, opens_database):
    """The tables are kept between requests until a result is written or a job's state changes."""
    url = f"sqlite:///{tmp_path / 'dsq.db'}"
    engine = open_database(url)
    with session_scope(engine) as session:
        job_id = add_job(session, FIXED[:10], name="MSE s=0.25", experiment="live", status="cancelled", total=20)
    with TestClient(create_app(engine, timedelta(seconds=60))) as client:
        before = client.get("/api/experiments/live").json()
        assert client.get("/api/experiments/live").json() == before
        assert "10 images" in client.get(f"/jobs/{job_id}").text
        with session_scope(engine) as session:
            repo.upsert_result(session, job_id, 10, label=0, prediction=0, radius=0.4, correct=True, p_lower=0.9,
                               counts_selection=[0, 10], counts_estimation=[1, 99], n0=10, n=1000, alpha=0.001,
                               sigma=0.25, seconds=0.1)
        after = client.get("/api/experiments/live").json()
        assert after != before and after["rows"][0]["images"] == "11"
        assert "11 images" in client.get(f"/jobs/{job_id}").text
    engine.dispose()


WITHOUT_TORCH = """
import sys
from datetime import timedelta
from starlette.testclient import TestClient
from dsq.dashboard.app import create_app
from dsq.db.session import open_database

client = TestClient(create_app(open_database(sys.argv[1], read_only=True), timedelta(seconds=60)))
for url in ["/", "/api/queue", "/api/jobs", "/jobs/1", "/api/jobs/1", "/experiments/grid", "/api/experiments/grid",
            "/jobs/1/images/0", "/api/jobs/1/images/0"]:
    assert client.get(url).status_code == 200, url
heavy = sorted({"torch", "ray", "torchvision"} & set(sys.modules))
assert not heavy, heavy
"""


def test_the_dashboard_imports_neither_torch_nor_ray(home, starts_processes):
    done = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, f"sqlite:///{home[0] / 'dsq.db'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr


def test_the_curves_bands_are_clopper_pearson():
    from dsq.dashboard.curves import bands
    from dsq.report.intervals import clopper_pearson

    low, high = bands([0, 3, 17, 20], 20, 0.05)
    expected = [clopper_pearson(k, 20, 0.05) for k in (0, 3, 17, 20)]
    assert low + high == pytest.approx([a for a, _ in expected] + [b for _, b in expected], abs=1e-12)


def test_the_dashboard_bench_builds_and_times_every_page(tmp_path, opens_database):
    from bench import dashboard

    url = f"sqlite:///{tmp_path / 'bench.db'}"
    built = dashboard.build(url, images=10)
    assert len(built["jobs"]) == len(dashboard.METHODS) * len(dashboard.SIGMAS) and built["abstained"] is not None
    times = dashboard.measure(url, built, repeats=1)
    assert set(times) == set(dashboard.pages(built)) and all(t["p95_ms"] >= t["p50_ms"] > 0 for t in times.values())


# -- an image's own sections: its trace, its preview, its stored answers ----------------------------------------

PNG = b"\x89PNG\r\n\x1a\n(the bytes a worker stored)"
TRACE = [[100, 0.41], [200, 0.62], [300, 0.7]]
QUERIES = 1 + 5 + 244  # an API image: its clean query, n0 = 5 and n = 244 noisy ones


def store_result(session, job_id, image, extra, **fields):
    values = dict(label=1, prediction=1, radius=0.31, correct=True, p_lower=0.7, counts_selection=[0, 10],
                  counts_estimation=[1, 299], n0=10, n=300, alpha=0.001, sigma=0.25, seconds=0.1, extra=extra)
    repo.upsert_result(session, job_id, image, **(values | fields))


@pytest.fixture(scope="module")
def shown(tmp_path_factory, opens_database):
    """A sequential job (image 0 with its trace, image 1 stored before traces were kept), a certify job with a
    preview of image 0, a certify-api job whose image 0 has 250 queries (one answer never stored, one label a
    script), and a training."""
    home = tmp_path_factory.mktemp("image-pages")
    engine = open_database(f"sqlite:///{home / 'dsq.db'}")
    with session_scope(engine) as session:
        ids = {"sequential": add_job(session, [], spec={**SPEC, "radius": 0.3}),
               "fixed": add_job(session, FIXED[:3]),
               "api": add_job(session, [], kind="certify_api", spec={**SPEC, "provider": "google"}),
               "train": add_training(session, {"target": "denoiser", "objective": "mse", "sigma": 0.25})}
        sequential = {"mode": "sequential", "target_radius": 0.3, "max_n": 1000}
        store_result(session, ids["sequential"], 0, {**sequential, "trace": TRACE})
        store_result(session, ids["sequential"], 1, sequential)
        repo.upsert_preview(session, ids["fixed"], 0, png=PNG, classes=[1, 1, -1, 1])
        digests = [f"{i:064x}" for i in range(QUERIES)]
        store_result(session, ids["api"], 0, {"provider": "google", "service": "embedded", "labels": ["cat", "dog"],
                                              "sha256": {"clean": digests[0], "selection": digests[1:6],
                                                         "estimation": digests[6:]}})
        for i, digest in enumerate(digests[:-1]):  # the last answer is missing
            repo.store_api_answer(session, provider="google", service="embedded", sha256=digest, answer={},
                                  top_label=SCRIPT if i == 6 else "dog", job_id=ids["api"])
    yield home, ids, engine
    engine.dispose()


@pytest.fixture(scope="module")
def shown_client(shown):
    with TestClient(create_app(shown[2], timedelta(seconds=60))) as client:
        yield client


def test_a_sequential_image_plots_its_bound_against_n_or_says_it_was_not_recorded(shown, shown_client):
    _, ids, _ = shown
    html = page(shown_client, f"/jobs/{ids['sequential']}/images/0")
    data = json.loads(re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', html).group(1))
    from scipy.stats import norm

    assert data["n"] == [100, 200, 300] and data["p_lower"] == [0.41, 0.62, 0.7]
    assert data["p0"] == pytest.approx(norm.cdf(0.3 / 0.25), abs=1e-12) and data["recorded"]
    assert shown_client.get(f"/api/jobs/{ids['sequential']}/images/0").json()["trace"] == data
    older = page(shown_client, f"/jobs/{ids['sequential']}/images/1")
    assert "not recorded" in older and "trace-data" not in older
    assert "p̲A against n" not in page(shown_client, f"/jobs/{ids['fixed']}/images/0")  # a fixed-n image has none


def test_an_image_shows_its_preview_or_how_to_ask_for_one(shown, shown_client):
    _, ids, _ = shown
    job = ids["fixed"]
    html = page(shown_client, f"/jobs/{job}/images/0")
    assert f'<img src="/jobs/{job}/images/0/preview.png"' in html and "1, 1, -1, 1" in html
    answer = shown_client.get(f"/jobs/{job}/images/0/preview.png")
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png" and answer.content == PNG
    assert f"dsq preview {job} 1" in page(shown_client, f"/jobs/{job}/images/1")
    missing = shown_client.get(f"/jobs/{job}/images/1/preview.png")
    assert missing.status_code == 404 and f"dsq preview {job} 1" in missing.text
    assert "<h2>Preview</h2>" not in page(shown_client, f"/jobs/{ids['api']}/images/0")  # no previews of API jobs


def test_an_api_image_lists_its_stored_answers_a_page_at_a_time(shown, shown_client):
    _, ids, _ = shown
    url = f"/jobs/{ids['api']}/images/0"
    first = page(shown_client, url)
    rows = cells(first, "answers")
    assert len(rows) == 100 and rows[0][:4] == ["0", "clean", "0", "dog"] and rows[0][5] == "this job"
    assert rows[1][:3] == ["1", "selection", "0"] and rows[6][:4] == ["6", "estimation", "0", SCRIPT]
    assert SCRIPT not in first and f"{QUERIES} queries" in first and 'id="answers-previous"' not in first
    assert "0" * 60 not in re.search(r'<pre id="extra">(.*?)</pre>', first, re.S).group(1)  # digests: not dumped
    last = page(shown_client, f"{url}?answers=200")
    rows = cells(last, "answers")
    assert len(rows) == QUERIES - 200 and rows[-1][:5] == [str(QUERIES - 1), "estimation", "243", "not stored", ""]
    assert 'id="answers-next"' not in last and 'href="?answers=100"' in last
    listed = shown_client.get(f"/api/jobs/{ids['api']}/images/0?answers=100").json()["answers"]
    assert listed["total"] == QUERIES and listed["start"] == 100 and len(listed["rows"]) == 100
    assert shown_client.get(f"{url}?answers=x").status_code == 404


@pytest.mark.parametrize("args", [["999", "0"], ["{train}", "0"], ["{api}", "0"], ["{fixed}", "5000"],
                                  ["{fixed}", "-1"], ["{fixed}", "x"]])
def test_a_preview_that_cannot_be_made_is_refused_in_one_line(shown, args):
    home, ids, engine = shown
    out = dsq(home, "preview", *[a.format(**ids) for a in args])
    assert out.exit_code == 2 and out.output.count("\n") == 1 and out.output.startswith("error: "), out.output
    with session_scope(engine) as session:
        assert not repo.list_jobs(session, kind="preview")  # nothing queued
def test_the_bench_verdict_counts_the_first_view_and_leaves_out_the_per_image_json():
    from bench import dashboard

    fast = {"first_ms": 100.0, "p50_ms": 10.0, "p95_ms": 20.0}
    times = {page: dict(fast) for page in dashboard.TARGET_PAGES} | {"api job": {**fast, "first_ms": 4000.0}}
    assert dashboard.verdict(times) == {"target_ms": 500, "met": True, "missed": []}
    times["experiment"]["first_ms"], times["job"]["p95_ms"] = 900.0, 600.0
    assert dashboard.verdict(times)["missed"] == ["job", "experiment"]
