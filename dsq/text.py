"""Text that users name things with, and text that reaches a terminal.

- ``check_name(value)`` refuses, in one line, a name that cannot be stored and printed as it is: not a string,
  longer than its column (``jobs.name`` is ``String(200)``: PostgreSQL refuses longer values where SQLite keeps
  them), or holding a character that changes what a terminal shows (``UNPRINTABLE``: controls such as a newline,
  a tab or ESC; and characters that take no space, such as a zero-width space or a tag character).
- ``safe(text)`` is ``text`` made fit to print: those characters as visible escapes (ESC as the four characters
  ``\\x1b``, a newline as ``\\n``) and rich markup neutralised, so a name like ``[red]x[/red]`` or
  ``\\x1b[31m`` prints literally instead of colouring the terminal.

Use ``check_name`` where a name comes in (specs) and ``safe`` on every user-supplied string a table or a line
prints (names stored before the check existed, labels read from files or vision APIs).
"""

from __future__ import annotations

import re

from dsq.errors import InvalidArgument

NAME_MAX_LENGTH = 200  # jobs.name is String(200)
PREVIEW = 40  # characters of a refused name quoted in the message

# Characters that never print as themselves: C0 controls, DEL and C1 controls (Unicode category Cc), lone
# surrogates (Cs, which UTF-8 cannot encode, so no database stores them), the line and paragraph separators
# (Zl, Zp, on which some terminals break lines) and the bidirectional controls that reorder what a terminal
# shows ("Trojan Source", CVE-2021-42574), and the characters that take no space at all, so that a name holding
# them looks like another name: zero-width spaces and joiners, the soft hyphen, word joiners and invisible
# operators, the byte-order mark, Hangul and Mongolian fillers, interlinear annotation marks and the tag
# characters (U+E0000-U+E007F, which can smuggle a hidden text).
CONTROLS = "\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069"
INVISIBLE = ("\u00ad\u034f\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200d\u2060-\u2064\u206a-\u206f\u3164\ufeff"
             "\uffa0\ufff9-\ufffb\U0001d173-\U0001d17a\U000e0000-\U000e007f")
UNPRINTABLE = CONTROLS + INVISIBLE
_INVISIBLE = re.compile(f"[{INVISIBLE}]")
_UNPRINTABLE = re.compile(f"[{UNPRINTABLE}]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def check_name(value, what: str = "name", max_length: int = NAME_MAX_LENGTH) -> str:
    """``value`` if it is a string of at most ``max_length`` printable characters; InvalidArgument otherwise.

    The message shows the name escaped (``repr``) and shortened, never raw.
    """
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string, got {type(value).__name__}")
    if len(value) > max_length:
        raise InvalidArgument(f"{what} {_preview(value)} is {len(value):,} characters long; "
                              f"at most {max_length} are allowed")
    found = _UNPRINTABLE.search(value)
    if found:
        raise InvalidArgument(f"{what} {_preview(value)} contains the {_kind(found.group())} "
                              f"{found.group()!r} at position {found.start()}; use printable characters only")
    return value


def _preview(value: str) -> str:
    return repr(value[:PREVIEW]) + ("..." if len(value) > PREVIEW else "")


def escape_controls(text: str) -> str:
    """``text`` with every unprintable character as a visible escape: ``\\n``, ``\\x1b``, ``\\u202e``."""
    return _UNPRINTABLE.sub(lambda match: _escape(match.group()), text)


def _escape(character: str) -> str:
    if character in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[character]
    code = ord(character)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _kind(character: str) -> str:
    """How a refused character is named: a control, or an invisible character (it takes no space)."""
    return "invisible character" if _INVISIBLE.match(character) else "control character"


def safe(text) -> str:
    """``text`` (any value, as ``str``) fit for a terminal: controls escaped, rich markup printed literally."""
    from rich.markup import escape

    return escape(escape_controls(str(text)))
