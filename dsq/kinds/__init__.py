"""Job kinds: one module each (its spec, its submit-time check, what a running job holds), registered here once.

Adding a kind is one module here (with its ``KIND``) and its entry in ``KINDS``, and its loop on the Ray
side, which owns the table from a kind to its loop (DESIGN.md, "Adding a job kind"). The kind modules import no
torch at module level, so rebuilding a stored spec
(``from_dict``) is cheap: ``dsq cancel`` and ``dsq resume`` do it without loading a model.
"""

from __future__ import annotations

from typing import Any

from dsq import specs
from dsq.errors import InvalidArgument, UnknownName
from dsq.kinds import certify, certify_api, preview, train

KINDS = {kind.name: kind for kind in (train.KIND, certify.KIND, certify_api.KIND, preview.KIND)}


def get(name: str) -> specs.Kind:
    if name not in KINDS:
        raise UnknownName(f"unknown job kind {name!r}; expected one of {', '.join(KINDS)}")
    return KINDS[name]


def from_dict(data: dict[str, Any]):
    """Rebuild (and so validate again) a stored spec from its JSON form."""
    if not isinstance(data, dict):
        raise InvalidArgument(f"a job spec must be a JSON object, got {type(data).__name__}")
    return specs.rebuild(get(data.get("kind")).spec, data)
