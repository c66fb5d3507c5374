"""
Sphinx configuration of ocppgw's documentation: ``make docs`` builds it
into docs/_build/html with warnings as errors, and tests/test_docs.py does
the same so that CI catches a broken page.

The pages are Markdown (MyST). The configuration reference is not written
by hand: ``_ext/optiontable.py`` puts the tables generated from the option
table of ``ocppgw/config.py`` into ``configuration.md`` at build time.
"""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "_ext"))
# a checkout that is not installed still documents itself
sys.path.insert(1, str(HERE.parent))

import ocppgw  # noqa: E402

project = "ocppgw"
author = "the ocppgw authors"
copyright = "ocppgw authors"
release = version = ocppgw.__version__

extensions = ["myst_parser", "optiontable"]
source_suffix = {".md": "markdown"}
root_doc = "index"
# tools/ holds the AsyncAPI validator's npm modules, not documentation
exclude_patterns = ["_build", "tools", "_ext", "README.md"]

# "[text](page.md#a-heading)" links, checked like every other reference
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# Blocks without a language are diagrams, logs and program output: shown
# as they are, not guessed at by a lexer.
highlight_language = "none"

html_theme = "alabaster"
html_title = f"ocppgw {release}"
# the configuration and contract tables need the room
html_theme_options = {"page_width": "1240px", "sidebar_width": "250px"}
html_static_path = ["_static"]
html_css_files = ["ocppgw.css"]
# The AsyncAPI description is published beside the pages, as it is.
html_extra_path = ["asyncapi.yaml"]
