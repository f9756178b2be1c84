"""HTML from the Jinja2 templates beside this module, every value autoescaped; plotly.js from the plotly wheel
(``plotly/package_data/plotly.min.js``), served by the dashboard or inlined in a self-contained report. Nothing is
loaded from the network."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

HERE = Path(__file__).parent


@functools.lru_cache(maxsize=1)
def environment():
    from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

    return Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                       undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)


def page(template: str, **values) -> str:
    """A page: ``template`` with ``values``; ``inline`` True puts plotly.js and the page's script in the file."""
    values.setdefault("inline", False)
    values.setdefault("token_query", "")
    if values["inline"]:
        values.update(plotly_js=_script(plotly_path().read_text(encoding="utf-8")),
                      dashboard_js=_script(dashboard_js_path().read_text(encoding="utf-8")))
    return environment().get_template(template).render(**values)


def _script(code: str) -> str:
    """JavaScript fit to stand between <script> tags: no ``</script`` may end the element early."""
    from markupsafe import Markup

    return Markup(code.replace("</script", "<\\/script"))


def plotly_path() -> Path:
    """plotly.min.js inside the installed plotly package (found without importing plotly)."""
    found = importlib.util.find_spec("plotly")
    if found is None or not found.submodule_search_locations:
        from dsq.errors import DsqError

        raise DsqError("plotly is not installed: pip install plotly (its wheel ships plotly.min.js)")
    return Path(next(iter(found.submodule_search_locations))) / "package_data" / "plotly.min.js"


def dashboard_js_path() -> Path:
    return HERE / "static" / "dashboard.js"
