"""``dsq dashboard``: the queue, results and images in a browser, read-only, from the database the CLI reads.

Neither torch nor Ray is imported here (``tests/test_dashboard.py`` checks it in a fresh process): the pages are
the CLI's own numbers (``dsq.views``, ``dsq.report``) rendered as HTML.

- ``curves``: certified accuracy against radius as plot data (step curves, Clopper-Pearson bands, envelopes)
- ``pages``: what each page and its JSON show, read in one session
- ``render``: the Jinja2 templates (autoescaped), plotly.js from the plotly wheel, one self-contained file
- ``app``: the Starlette application: routes, the token guard, 404 pages
"""
