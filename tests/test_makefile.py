"""
The Makefile's quick start: what `make run`, `make test` and `make docs` install,
read from `make --dry-run` (nothing is installed or run).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

from twisted.trial import unittest

from tests.support import REPO


class MakefileTests(unittest.SynchronousTestCase):
    def setUp(self):
        if shutil.which("make") is None:
            raise unittest.SkipTest("make is not installed")
        # a virtualenv that does not exist, so that every step is listed
        self.venv = os.path.abspath(self.mktemp())

    def commands(self, target: str) -> list[list[str]]:
        """The commands `make TARGET` would run, each split into words."""
        result = subprocess.run(
            ["make", "--dry-run", "--no-print-directory", target, f"VENV={self.venv}"],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=True,
        )
        return [shlex.split(line) for line in result.stdout.splitlines()]

    def pip_installs(self, target: str) -> list[list[str]]:
        """The arguments of every `pip install` that `make TARGET` would run."""
        installs = []
        for words in self.commands(target):
            if words[:1] == [f"{self.venv}/bin/pip"] and words[1:2] == ["install"]:
                installs.append(words[2:])
        return installs

    def test_run_installs_only_the_runtime(self):
        installs = self.pip_installs("run")
        self.assertEqual(len(installs), 1, installs)
        self.assertIn(".", installs[0])
        self.assertFalse([word for word in installs[0] if "[" in word], installs)

    def test_test_adds_the_test_extras(self):
        installs = self.pip_installs("test")
        self.assertIn(".[test]", [word for words in installs for word in words], installs)

    def test_docs_builds_with_warnings_as_errors(self):
        """
        C{make docs} installs the test extras (Sphinx comes with them) and
        runs Sphinx over docs/ with C{-W}, so a warning fails it.
        """
        installs = self.pip_installs("docs")
        self.assertIn(".[test]", [word for words in installs for word in words], installs)
        commands = self.commands("docs")
        builds = [
            words for words in commands
            if words[:3] == [f"{self.venv}/bin/python", "-m", "sphinx"]
        ]
        self.assertEqual(len(builds), 1, commands)
        self.assertIn("-W", builds[0])
        self.assertEqual(builds[0][-2:], ["docs", "docs/_build/html"])
