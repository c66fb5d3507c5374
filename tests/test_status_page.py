"""
The admin listener's status page in a real headless Chromium (Debian's
chromium and chromium-driver, driven by Selenium), against a real gateway,
broker and chargers: the page loads behind Basic auth, lists connected
chargers, filters them, and follows a disconnect and a refusal.

Selenium's calls block, so each runs in a thread while the reactor serves
the page; every wait is on the page's content (WebDriverWait), not a timer.
"""

from __future__ import annotations

import shutil
import tempfile

from twisted.internet import defer, reactor, threads
from twisted.trial import unittest

from ocppgw.testing import ChargerClosed, FakeCharger
from tests.support import GatewayTestCase

#: How long the page may take to show a change (it polls every 0.3 s here).
WAIT = 20

#: Chromium's flags for a machine without a display or a network beyond
#: this one: without the background-networking ones it keeps trying to
#: reach Google's services and misbehaves.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,900",
)


def _browser() -> tuple[str, str]:
    """
    The paths of Chromium and its WebDriver, or SkipTest saying what is
    missing.
    """
    try:
        import selenium  # noqa: F401
    except ImportError:
        raise unittest.SkipTest("selenium is not installed (pip install '.[test]')")
    binary = next(
        (path for path in map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))
         if path), None,
    )
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        raise unittest.SkipTest(
            "Chromium and its driver are not installed (Debian: apt-get install chromium "
            "chromium-driver; .ci/run installs them where it can)"
        )
    return binary, driver


def _start_chromium(binary: str, driver: str, profile: str):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(options=options, service=Service(executable_path=driver))


class StatusPageTests(GatewayTestCase):
    settings = {"admin": {"username": "ops", "password": "s3cret"}}
    timeout = 90

    @defer.inlineCallbacks
    def setUp(self):
        binary, driver = _browser()
        yield super().setUp()
        profile = tempfile.mkdtemp(prefix="ocppgw-chromium-")
        self.addCleanup(shutil.rmtree, profile, True)
        self.browser = yield threads.deferToThread(_start_chromium, binary, driver, profile)
        self.addCleanup(threads.deferToThread, self.browser.quit)
        port = self.gateway_service.admin_port.getHost().port
        # the credentials in the URL answer the page's Basic auth; the
        # browser then sends them with the page's own requests
        self.page = f"http://ops:s3cret@127.0.0.1:{port}/?refresh=0.3"

    def in_browser(self, function, *args):
        return threads.deferToThread(function, *args)

    def wait_until(self, condition, what: str):
        """Fires once C{condition(browser)} is true (in a thread)."""
        from selenium.webdriver.support.ui import WebDriverWait

        return self.in_browser(
            lambda: WebDriverWait(self.browser, WAIT, poll_frequency=0.1).until(
                condition, f"the page did not show {what}"
            )
        )

    def rows(self, table: str) -> list[dict]:
        """The visible rows of a table on the page, as {column: text}."""
        return self.browser.execute_script(
            """
            const table = document.getElementById(arguments[0]);
            const names = [...table.tHead.rows[0].cells].map((cell) => cell.textContent);
            return [...table.tBodies[0].rows].map((row) => Object.fromEntries(
                [...row.cells].map((cell, i) => [names[i], cell.textContent])));
            """,
            table,
        )

    def identities(self, browser) -> list[str]:
        return [row["identity"] for row in self.rows("chargers")]

    def text(self, element_id: str) -> str:
        return self.browser.find_element("id", element_id).text

    @defer.inlineCallbacks
    def test_page_follows_the_chargers(self):
        first = self.identity("RDAM 1")
        second = self.identity("CP")
        charger1 = yield self.connect(first)
        charger2 = yield self.connect(second, ("ocpp2.0.1",))
        yield self.in_browser(self.browser.get, self.page)

        yield self.wait_until(
            lambda browser: sorted(self.identities(browser)) == sorted([first, second]),
            "both chargers",
        )
        self.assertEqual(self.text("broker"), self.gateway_service.broker_state())
        self.assertEqual(self.text("broker"), "open")
        self.assertEqual(self.text("ready"), "ready")
        self.assertEqual(self.text("total"), "2")
        self.assertEqual(
            sorted((row["version"], row["chargers"]) for row in self.rows("by-version")),
            [("ocpp1.6", "1"), ("ocpp2.0.1", "1")],
        )
        [row] = [row for row in self.rows("chargers") if row["identity"] == first]
        self.assertEqual((row["version"], row["listener"]), ("ocpp1.6", "ws"))
        self.assertTrue(row["peer"].startswith("tcp4:127.0.0.1:"), row)

        # a command sent and not answered shows as the outstanding call
        yield self.backend.send_to_charger(second, [2, "g1", "GetVariables", {"getVariableData": []}])
        yield charger2.next_call()
        yield self.wait_until(
            lambda browser: any(row["outstanding CSMS call"] == "GetVariables (g1)"
                                for row in self.rows("chargers")),
            "the outstanding call",
        )

        # the search box filters the list
        search = self.browser.find_element("id", "search")
        yield self.in_browser(search.send_keys, second[-6:])
        self.assertEqual(self.identities(self.browser), [second])
        yield self.in_browser(search.clear)
        yield self.in_browser(search.send_keys, " ")  # an input event
        self.assertEqual(len(self.identities(self.browser)), 2)

        # the first charger goes: gone from the list, in the disconnects
        yield charger1.close(1000)
        yield self.wait_until(
            lambda browser: self.identities(browser) == [second], "the disconnect in the list"
        )
        yield self.wait_until(
            lambda browser: any(row["identity"] == first and row["code"] == "1000"
                                for row in self.rows("disconnects")),
            "the disconnect with its code",
        )
        self.assertEqual(self.text("total"), "1")

        # a refused handshake, with its reason
        refused = FakeCharger.connect(reactor, self.url(self.identity()), ["ocpp1.5"])
        yield self.assertFailure(refused, ChargerClosed, Exception)
        yield self.wait_until(
            lambda browser: any(row["status"] == "400"
                                and row["reason"] == "No supported OCPP subprotocol"
                                for row in self.rows("refusals")),
            "the refusal",
        )
