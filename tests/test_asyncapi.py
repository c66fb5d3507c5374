"""
docs/asyncapi.yaml: valid for the AsyncAPI parser, and true to the names
in ocppgw/topology.py, ocppgw/audit.py and the configuration defaults.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml
from twisted.internet import defer, reactor, threads, utils
from twisted.trial import unittest

from ocppgw import audit, config, topology
from ocppgw.framing import VERSIONS

DOCS = Path(__file__).resolve().parent.parent / "docs"
TOOLS = DOCS / "tools"
NODE = shutil.which("node")
NPM = shutil.which("npm")


def load() -> dict:
    with open(DOCS / "asyncapi.yaml", encoding="utf-8") as f:
        return yaml.safe_load(f)


class TrueToTopologyTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.doc = load()
        self.channels = self.doc["channels"]

    def test_exchanges_are_the_defaults(self):
        defaults = config.defaults()
        for name in ("chargerFrames", "chargerCommands", "presenceConnected", "presenceDisconnected"):
            exchange = self.channels[name]["bindings"]["amqp"]["exchange"]
            self.assertEqual(exchange["name"], defaults.amqp.exchange, name)
            self.assertEqual((exchange["type"], exchange["durable"]), ("topic", True))
        self.assertEqual(
            self.channels["audit"]["bindings"]["amqp"]["exchange"]["name"], defaults.audit.exchange
        )

    def test_routing_keys(self):
        frames = self.channels["chargerFrames"]
        self.assertEqual(
            frames["address"], topology.routing_key("{version}", "{action}", "{kind}")
        )
        self.assertEqual(
            set(frames["parameters"]["version"]["enum"]),
            {version.routing_prefix for version in VERSIONS.values()},
        )
        self.assertEqual(
            set(frames["parameters"]["kind"]["enum"]),
            {topology.KIND_REQUEST, topology.KIND_CONFIRMATION, topology.KIND_ERROR},
        )
        self.assertIn(topology.UNKNOWN_ACTION, frames["parameters"]["action"]["examples"])
        self.assertEqual(
            self.channels["chargerCommands"]["address"], topology.charger_binding_key("{identity}")
        )
        self.assertEqual(self.channels["chargerQueue"]["address"], topology.charger_queue("{identity}"))
        self.assertEqual(self.channels["presenceConnected"]["address"], topology.ROUTING_KEY_CONNECTED)
        self.assertEqual(
            self.channels["presenceDisconnected"]["address"], topology.ROUTING_KEY_DISCONNECTED
        )
        self.assertEqual(self.channels["audit"]["address"], audit.routing_key("{identity}", "{direction}"))
        self.assertEqual(
            set(self.channels["audit"]["parameters"]["direction"]["enum"]),
            {audit.IN, audit.OUT, audit.EVENT},
        )

    def test_headers(self):
        schemas = self.doc["components"]["schemas"]
        # every header topology.py names, so a new one cannot be forgotten
        self.assertEqual(
            set(schemas["chargerHeaders"]["properties"]),
            {value for name, value in vars(topology).items() if name.startswith("HEADER_")},
        )
        self.assertEqual(
            set(schemas["chargerHeaders"]["properties"]["x-ocpp-version"]["enum"]),
            set(VERSIONS),
        )
        self.assertEqual(
            set(schemas["auditHeaders"]["properties"]),
            {
                audit.HEADER_DIRECTION,
                audit.HEADER_TIME,
                topology.HEADER_IDENTITY,
                topology.HEADER_VERSION,
                topology.HEADER_NODE,
            },
        )


def _npm_ci() -> None:
    if not (TOOLS / "node_modules" / "@asyncapi" / "parser").is_dir():
        subprocess.run(
            [NPM, "ci", "--no-audit", "--no-fund"], cwd=TOOLS, check=True,
            capture_output=True, timeout=600,
        )


class ParserTests(unittest.TestCase):
    timeout = 600

    if NODE is None:
        skip = "Node.js is not installed (node not on PATH)"
    elif NPM is None and not (TOOLS / "node_modules").is_dir():
        skip = "npm is not installed and docs/tools/node_modules is missing"

    @defer.inlineCallbacks
    def test_valid_for_the_asyncapi_parser(self):
        yield threads.deferToThread(_npm_ci)
        out, err, status = yield utils.getProcessOutputAndValue(
            NODE, [str(TOOLS / "validate-asyncapi.js")], path=str(TOOLS), reactor=reactor,
        )
        self.assertEqual(status, 0, out + err)
        self.assertIn(b"valid AsyncAPI 3.1.0", out)
        self.assertNotIn(b"error:", out)
