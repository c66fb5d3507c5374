"""
The documentation site under docs/: it builds without a warning, and what
the README sends readers to is in it.

C{make docs} runs the same build. Sphinx and MyST come with the test
extras, so CI always builds the site; without them (a bare runtime
install) the build test skips and says so.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from ocppgw import config

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def sphinx_or_skip() -> None:
    """Skip the calling test when Sphinx or MyST cannot be imported."""
    for module in ("sphinx", "myst_parser"):
        if importlib.util.find_spec(module) is None:
            raise SkipTest(
                f"{module} is not installed; it comes with the test extras "
                "(pip install -e '.[test]')"
            )


def option_table_extension():
    """docs/_ext/optiontable.py, the extension that puts the option tables in."""
    sphinx_or_skip()
    spec = importlib.util.spec_from_file_location(
        "optiontable", DOCS / "_ext" / "optiontable.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Build:
    """One C{sphinx -W} build of docs/ per test run, shared by L{BuildTests}."""

    def __init__(self) -> None:
        self.directory = Path(os.path.abspath("docs-build"))
        result = subprocess.run(
            [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html",
             "-d", str(self.directory / "doctrees"), str(DOCS), str(self.directory / "html")],
            capture_output=True, text=True, timeout=300,
        )
        self.returncode = result.returncode
        self.output = result.stdout + result.stderr
        self.html = self.directory / "html"


_build: list[_Build] = []


class BuildTests(SynchronousTestCase):
    """C{sphinx -W} over docs/, as C{make docs} runs it."""

    def setUp(self) -> None:
        sphinx_or_skip()
        if not _build:
            _build.append(_Build())
        self.build = _build[0]
        self.html = self.build.html

    def page(self, name: str) -> str:
        return (self.html / f"{name}.html").read_text(encoding="utf-8")

    def test_buildsWithoutWarnings(self) -> None:
        self.assertEqual((self.build.returncode, self.build.output), (0, ""))

    def test_everyOptionDocumented(self) -> None:
        """The configuration page has every section and key of the option table."""
        page = self.page("configuration")
        for section in config.SECTIONS:
            self.assertIn(f"[{section.name}]", page)
            for option in section.options:
                self.assertIn(f"<code class=\"docutils literal notranslate\"><span class=\"pre\">{option.key}</span>", page)

    def test_readmeLinksArePages(self) -> None:
        """Every docs/ page the README links to is a page of the site."""
        readme = (ROOT / "README.md").read_text(encoding="utf-8")
        linked = re.findall(r"\]\(docs/([a-z-]+)\.md\)", readme)
        self.assertIn("architecture", linked)
        self.assertIn("configuration", linked)
        for name in linked:
            self.assertTrue((self.html / f"{name}.html").exists(), name)

    def test_asyncapiPublished(self) -> None:
        """The AsyncAPI file is published beside the pages, unchanged."""
        self.assertEqual(
            (self.html / "asyncapi.yaml").read_bytes(),
            (DOCS / "asyncapi.yaml").read_bytes(),
        )


class OptionTableTests(SynchronousTestCase):
    """The configuration reference is generated, never pasted."""

    def test_pageGetsTheGeneratedTables(self) -> None:
        extension = option_table_extension()
        page = (DOCS / "configuration.md").read_text(encoding="utf-8")
        self.assertIn(config.render_markdown().strip(), extension.with_tables(page))

    def test_pageWithoutMarkerFails(self) -> None:
        """A page that lost its marker line fails the build, not the reference."""
        extension = option_table_extension()
        from sphinx.errors import ExtensionError

        self.assertRaises(ExtensionError, extension.with_tables, "# Configuration\n")


class SelfContainedTests(SynchronousTestCase):
    """The repository explains itself: no reference to documents outside it."""

    #: what such references looked like; spelled in pieces so that this
    #: file does not match itself
    OUTSIDE = re.compile("DESIGN" + r" ?§|DESIGN\.md|" + "PITF" + "ALLS")

    def test_noOutsideDocuments(self) -> None:
        listed = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True
        )
        if listed.returncode != 0:
            raise SkipTest("not a git checkout: git ls-files lists the files to read")
        offenders = []
        for name in listed.stdout.splitlines():
            path = ROOT / name
            if not path.is_file() or path.suffix not in {
                ".py", ".md", ".txt", ".cfg", ".toml", ".yaml", ".yml", ".ini", ".js", ".json", "",
            }:
                continue
            text = path.read_text(encoding="utf-8", errors="replace")
            offenders += [
                f"{name}:{number}" for number, line in enumerate(text.splitlines(), 1)
                if self.OUTSIDE.search(line)
            ]
        self.assertEqual(offenders, [])


class ExampleTests(SynchronousTestCase):
    """The worked examples of the docs run as they are written."""

    def test_fakeBridgeExampleRuns(self) -> None:
        text = (DOCS / "testing.md").read_text(encoding="utf-8")
        section = text.split("## Testing without a broker", 1)[1]
        code = section.split("```python\n", 1)[1].split("```", 1)[0]
        directory = Path(os.path.abspath(self.mktemp()))
        directory.mkdir(parents=True)
        (directory / "test_fakebridge_example.py").write_text(code, encoding="utf-8")
        result = subprocess.run(
            [sys.executable, "-m", "twisted.trial", "test_fakebridge_example"],
            cwd=directory, capture_output=True, text=True, timeout=120,
        )
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("PASSED (successes=2)", result.stdout)
