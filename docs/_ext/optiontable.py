"""
The configuration reference, generated at build time.

``configuration.md`` holds the line ``% ocppgw: option tables``; when Sphinx
reads that page this extension puts there the tables that
``python -m ocppgw.config --markdown`` prints, generated from the option
table in ``ocppgw/config.py``. The reference therefore cannot drift from the
code, and nobody pastes it by hand.
"""

from sphinx.errors import ExtensionError

#: The line of configuration.md that the tables replace.
MARKER = "% ocppgw: option tables"

#: The page that carries the marker.
PAGE = "configuration"


def with_tables(text: str) -> str:
    """
    *text* (the page's Markdown) with the marker line replaced by the
    generated tables.

    :raises ExtensionError: when the page has no marker line, so that a
        page edited carelessly fails the build instead of losing the
        reference.
    """
    from ocppgw.config import render_markdown

    lines = text.split("\n")
    if MARKER not in lines:
        raise ExtensionError(f"{PAGE}.md has no line {MARKER!r} for the option tables")
    index = lines.index(MARKER)
    return "\n".join(lines[:index] + [render_markdown()] + lines[index + 1 :])


def _source_read(app, docname: str, source: list) -> None:
    if docname == PAGE:
        source[0] = with_tables(source[0])


def setup(app):
    app.connect("source-read", _source_read)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
