"""What an API job spent: queries paid, answers reused from the cache, and the estimated dollars, in `dsq show`,
`dsq status` and `dsq results`."""

from __future__ import annotations

from typer.testing import CliRunner

from cli.main import app
from dsq.db import repo
from dsq.db.session import open_database, session_scope
from dsq.kinds.certify_api import ApiCertifySpec


def test_show_status_and_results_say_what_an_api_job_paid_and_reused(sqlite_url, tmp_path):
    spec = ApiCertifySpec(provider="google", sigma=0.25, dataset="digits", endpoint="embedded", n0=2, n=10,
                          price_per_1000=2.0)
    engine = open_database(sqlite_url)
    digests = [f"{i:064x}" for i in range(8)]
    with session_scope(engine) as session:
        earlier = repo.create_job(session, kind="certify_api", spec=spec.to_dict(), seed=0, total=1).id
        job = repo.create_job(session, kind="certify_api", spec=spec.to_dict(), seed=0, total=2).id
        for number, digest in enumerate(digests):  # the earlier job paid for 3 answers the new one reuses
            repo.store_api_answer(session, provider="google", service="embedded", sha256=digest, answer={},
                                  top_label="cat", job_id=earlier if number < 3 else job)
        for index, used in ((0, digests[:4]), (1, digests[4:])):
            extra = {"provider": "google", "service": "embedded",
                     "sha256": {"clean": used[0], "selection": used[1:2], "estimation": used[2:]}}
            repo.upsert_result(session, job, index, label=1, prediction=1, radius=0.3, correct=True, p_lower=0.9,
                               counts_selection=[0, 1], counts_estimation=[0, 2], n0=1, n=2, alpha=0.001,
                               sigma=0.25, seconds=1.0, extra=extra)
        repo.mark_running(session, job, "w")
        repo.set_progress(session, job, 2)
        repo.mark_finished(session, job, "succeeded")
    engine.dispose()
    expected = "API spend: 5 queries paid, 3 answers reused from the cache, about $0.01 at $2 per 1,000 queries"
    for command in ("show", "status", "results"):
        out = CliRunner().invoke(app, ["--db", sqlite_url, command, str(job)], env={"DSQ_HOME": str(tmp_path)})
        assert out.exit_code == 0 and expected in out.output, (command, out.output)
