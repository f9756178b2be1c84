"""Job ids that no job can have (beyond 64 bits, zero, negative) are one line and exit 2, on both databases."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from cli.main import app

HUGE = "99999999999999999999"  # above 2^63 - 1: SQLite cannot even bind it


@pytest.mark.parametrize("args", [
    ["status", HUGE], ["cancel", HUGE], ["resume", HUGE], ["show", HUGE], ["logs", HUGE], ["results", HUGE],
    ["compare", HUGE], ["status", "0"], ["cancel", "--", "-3"],
    ["submit", "certify", "--dataset", "digits", "--classifier", f"job:{HUGE}", "--sigma", "0.25"],
    ["submit", "train", "--dataset", "digits", "--target", "classifier", "--arch", "small_cnn", "--objective",
     "standard", "--sigma", "0", "--after", HUGE],
])
def test_an_id_no_job_can_have_is_one_line(args, db_url, tmp_path):
    result = CliRunner().invoke(app, ["--db", db_url, *args],
                                env={"DSQ_HOME": str(tmp_path), "DSQ_WORKER_AUTOSTART": "0"})
    assert result.exit_code == 2, result.output
    assert "no job with id" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
