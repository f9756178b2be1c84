"""Names users give and text that reaches a terminal (dsq.text)."""

import io
import unicodedata

import pytest
from rich.console import Console

from dsq.errors import InvalidArgument
from dsq.text import NAME_MAX_LENGTH, check_name, escape_controls, safe

ESC = "\x1b"


@pytest.mark.parametrize("name", ["mse-0.25", "débruiteur σ=0.5", "[red]x[/red]", "👍 job", "a" * NAME_MAX_LENGTH])
def test_printable_names_pass_unchanged(name):
    assert check_name(name) == name


@pytest.mark.parametrize("name, shown", [
    ("two\nlines", r"'\n'"), ("tab\there", r"'\t'"), (f"{ESC}[31mred", r"'\x1b'"), ("nul\0", r"'\x00'"),
    ("del\x7f", r"'\x7f'"), ("c1\x9b31m", r"'\x9b'"), ("cr\r", r"'\r'"), ("rtl\u202eevil", r"'\u202e'"),
    ("line\u2028sep", r"'\u2028'"), ("surrogate\udcff", r"'\udcff'"),
])
def test_control_characters_are_refused_and_shown_escaped(name, shown):
    with pytest.raises(InvalidArgument) as refused:
        check_name(name, what="job name")
    message = str(refused.value)
    assert message.startswith("job name ") and "control character" in message and shown in message
    assert escape_controls(message) == message  # nothing raw


def test_too_long_and_not_a_string():
    with pytest.raises(InvalidArgument, match=r"is 10,000 characters long; at most 200") as refused:
        check_name("x" * 10_000)
    assert len(str(refused.value)) < 200  # quotes a preview, not the name
    with pytest.raises(InvalidArgument, match="at most 5"):
        check_name("abcdef", max_length=5)
    for value in (None, 7, b"bytes", ["a"]):
        with pytest.raises(InvalidArgument, match="name must be a string"):
            check_name(value)


def test_every_c0_c1_control_and_del_is_refused():
    for code in [*range(0x20), 0x7F, *range(0x80, 0xA0)]:
        assert unicodedata.category(chr(code)) == "Cc"
        with pytest.raises(InvalidArgument):
            check_name(f"a{chr(code)}b")


def test_safe_escapes_controls_visibly():
    assert escape_controls("a\nb\tc\rd") == "a\\nb\\tc\\rd"
    assert escape_controls(f"{ESC}[31mred{ESC}[0m") == "\\x1b[31mred\\x1b[0m"
    assert escape_controls("\x00\x7f\x9b\u202e\udcff") == "\\x00\\x7f\\x9b\\u202e\\udcff"
    assert safe("plain σ 👍") == "plain σ 👍" and safe(3) == "3"


@pytest.mark.parametrize("name, printed", [
    ("[red]x[/red]", "[red]x[/red]"),
    ("[bold]", "[bold]"),
    (f"{ESC}[31mred", "\\x1b[31mred"),
    ("two\nlines", "two\\nlines"),
    ("[link=http://evil.example]click[/link]", "[link=http://evil.example]click[/link]"),
    ("trailing backslash \\", "trailing backslash \\"),
])
def test_safe_text_prints_literally_through_rich(name, printed):
    """Inside the caller's own markup too: the name styles nothing and does not close the caller's tags."""
    console = Console(file=io.StringIO(), force_terminal=True, color_system="truecolor", highlight=False, width=200)
    console.print(f"[bold]{safe(name)}[/bold]")
    assert console.file.getvalue() == f"{ESC}[1m{printed}{ESC}[0m\n"  # the caller's bold, nothing else


@pytest.mark.parametrize("name, shown", [
    ("zero\u200bwidth", r"'\u200b'"), ("join\u200dme", r"'\u200d'"), ("bom\ufeff", r"'\ufeff'"),
    ("soft\u00adhyphen", r"'\xad'"), ("word\u2060joiner", r"'\u2060'"), ("hidden\U000e0041\U000e007f", r"'\U000e0041'"),
])
def test_invisible_characters_are_refused_and_shown_escaped(name, shown):
    with pytest.raises(InvalidArgument) as refused:
        check_name(name, what="job name")
    message = str(refused.value)
    assert "invisible character" in message and shown in message
    assert escape_controls(name) != name and "\u200b" not in escape_controls("a\u200bb")  # printed visibly too


def test_an_invisible_name_is_one_line_and_exit_2_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, ["--db", f"sqlite:///{tmp_path / 'dsq.db'}", "submit", "certify", "--dataset",
                                      "digits", "--classifier", "f.pt", "--sigma", "0.25", "--name", "a\u200bb"],
                                env={"DSQ_HOME": str(tmp_path), "DSQ_WORKER_AUTOSTART": "0"})
    assert result.exit_code == 2 and "invisible character '\\u200b'" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "dsq.db").exists()
