"""
deploy/grafana/ocppgw.json and deploy/prometheus/ocppgw-rules.yml: the
dashboard has the structure Grafana (10 and later) imports, the rules pass
`promtool check rules` and their unit tests (`promtool test rules`), and
every metric and label they use exists on a running gateway's /metrics,
scraped after real chargers and a real back end made traffic of every
kind. promtool comes with Debian's prometheus package; where it cannot be
installed the tests that need it skip and say so.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import yaml
from twisted.internet import defer, reactor
from twisted.trial import unittest

from ocppgw.testing import ChargerClosed, FakeCharger
from tests.support import GatewayTestCase, http, samples

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "ocppgw.json"
RULES = REPO / "deploy" / "prometheus" / "ocppgw-rules.yml"
RULES_TESTS = REPO / "deploy" / "prometheus" / "ocppgw-rules.test.yml"

#: Labels Prometheus adds to every scraped series (the target's).
TARGET_LABELS = {"job", "instance"}
#: Variables Grafana itself provides in queries.
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__range_s"}

#: What Grafana needs to import a dashboard and run its Prometheus
#: queries (the parts of its dashboard model that ocppgw.json uses): a
#: title, a schema version of Grafana 9.4/10 or later, panels on its
#: 24-column grid, and for each data panel its data source and targets,
#: each with a refId and a PromQL expression.
GRAFANA_DASHBOARD = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 37},
        "time": {
            "type": "object", "required": ["from", "to"],
            "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
        },
        "templating": {
            "type": "object", "required": ["list"],
            "properties": {"list": {"type": "array", "items": {
                "type": "object", "required": ["name", "type"],
                "properties": {
                    "name": {"type": "string", "pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                    "type": {"enum": ["datasource", "query", "custom", "constant", "interval"]},
                },
            }}},
        },
        "panels": {"type": "array", "minItems": 1, "items": {"$ref": "#/$defs/panel"}},
    },
    "$defs": {
        "gridPos": {
            "type": "object", "required": ["h", "w", "x", "y"],
            "properties": {
                "h": {"type": "integer", "minimum": 1},
                "w": {"type": "integer", "minimum": 1, "maximum": 24},
                "x": {"type": "integer", "minimum": 0, "maximum": 23},
                "y": {"type": "integer", "minimum": 0},
            },
        },
        "datasource": {
            "type": "object", "required": ["type", "uid"],
            "properties": {"type": {"const": "prometheus"}, "uid": {"const": "${datasource}"}},
        },
        "panel": {
            "type": "object",
            "required": ["id", "type", "title", "gridPos"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "type": {"enum": ["row", "timeseries", "stat", "gauge", "bargauge", "table"]},
                "title": {"type": "string", "minLength": 1},
                "gridPos": {"$ref": "#/$defs/gridPos"},
            },
            "if": {"properties": {"type": {"const": "row"}}},
            "then": {"required": ["panels", "collapsed"]},
            "else": {
                "required": ["datasource", "targets", "fieldConfig", "options"],
                "properties": {
                    "datasource": {"$ref": "#/$defs/datasource"},
                    "targets": {"type": "array", "minItems": 1, "items": {
                        "type": "object", "required": ["refId", "expr", "datasource"],
                        "properties": {
                            "refId": {"type": "string", "pattern": "^[A-Z]$"},
                            "expr": {"type": "string", "minLength": 1},
                            "datasource": {"$ref": "#/$defs/datasource"},
                        },
                    }},
                    "fieldConfig": {"type": "object", "required": ["defaults", "overrides"]},
                },
            },
        },
    },
}


def _promtool() -> str:
    tool = shutil.which("promtool")
    if tool is None:
        raise unittest.SkipTest(
            "promtool is not installed (Debian: apt-get install prometheus; .ci/run installs "
            "it where it can)"
        )
    return tool


# -- PromQL: the metric names and label names an expression selects -------------

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*')
  | (?P<matchers>\{(?:"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|[^}"'])*\})
  | (?P<range>\[[^\]]*\])
  | (?P<number>[+-]?(?:\d+(?:\.\d*)?(?:e[+-]?\d+)?[smhdwy]*|\.\d+))
  | (?P<name>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<other>\S)
    """,
    re.X,
)
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_MATCHER = re.compile(r"""([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*("(?:\\.|[^"\\])*")""")


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """
    The series selectors in a PromQL expression: (metric name, names of
    the labels matched), function, aggregation and keyword names left out.
    """
    tokens = [
        (match.lastgroup, match.group())
        for match in _TOKEN.finditer(expr)
    ]
    found = []
    index = 0
    while index < len(tokens):
        kind, text = tokens[index]
        following = tokens[index + 1] if index + 1 < len(tokens) else (None, "")
        if kind == "name" and text in _LABEL_LISTS:
            # by (a, b): label names, not metrics
            if following[1] == "(":
                while index < len(tokens) and tokens[index][1] != ")":
                    index += 1
        elif kind == "name" and following[1] in ("(", "by", "without"):
            pass  # a function or an aggregation (sum by (...) (...))
        elif kind == "name" and text.lower() not in _KEYWORDS:
            labels = set()
            if following[0] == "matchers":
                labels = {name for name, _ in _MATCHER.findall(following[1])}
            found.append((text, labels))
        index += 1
    return found


def _substitute_variables(expr: str) -> str:
    """A dashboard query as Prometheus would get it from Grafana."""
    expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
    return re.sub(r"\$\{?(\w+)\}?", ".*", expr)


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def dashboard_queries() -> list[str]:
    """Every PromQL query of the dashboard: panel targets and variables."""
    board = dashboard()
    queries = [
        target["expr"] for panel in board["panels"] for target in panel.get("targets", ())
    ]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            definition = variable["definition"]
            match = re.fullmatch(r"label_values\((.*), *\w+\)", definition)
            queries.append(match.group(1) if match else definition)
    return queries


def rule_expressions() -> list[str]:
    groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def rule_test_series() -> list[str]:
    tests = yaml.safe_load(RULES_TESTS.read_text(encoding="utf-8"))["tests"]
    return [series["series"] for test in tests for series in test["input_series"]]


class SelectorTests(unittest.SynchronousTestCase):
    """The PromQL reading the other tests rely on."""

    def test_selectors(self):
        self.assertEqual(
            selectors(
                'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{status=~"5..", '
                'x="}"}[5m]))) / on (job) b offset 5m > 0.5 and c < +Inf'
            ),
            [("a_bucket", {"status", "x"}), ("b", set()), ("c", set())],
        )
        self.assertEqual(selectors("topk(10, sum without (a) (m))"), [("m", set())])


class DashboardTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.board = dashboard()
        self.panels = self.board["panels"]

    def test_grafana_structure(self):
        import jsonschema

        jsonschema.validate(self.board, GRAFANA_DASHBOARD)

    def test_datasource_variable(self):
        """
        Every query goes to the data source picked in the variable
        ${datasource} (Grafana asks for it on import), none to a uid of
        someone else's Grafana.
        """
        variables = {variable["name"]: variable for variable in self.board["templating"]["list"]}
        self.assertEqual(
            (variables["datasource"]["type"], variables["datasource"]["query"]),
            ("datasource", "prometheus"),
        )
        uids = re.findall(r'"uid": "([^"]*)"', DASHBOARD.read_text(encoding="utf-8"))
        self.assertEqual(set(uids) - {"${datasource}", "-- Grafana --", "ocppgw"}, set())

    def test_variables_defined(self):
        defined = {variable["name"] for variable in self.board["templating"]["list"]}
        for query in dashboard_queries():
            for name in re.findall(r"\$\{?(\w+)", query):
                self.assertIn(name, defined | GRAFANA_BUILTINS, query)

    def test_layout(self):
        """Unique panel ids and refIds; panels side by side, never on top of each other."""
        ids = [panel["id"] for panel in self.panels]
        self.assertEqual(len(ids), len(set(ids)))
        taken = {}
        for panel in self.panels:
            refs = [target["refId"] for target in panel.get("targets", ())]
            self.assertEqual(len(refs), len(set(refs)), panel["title"])
            grid = panel["gridPos"]
            self.assertLessEqual(grid["x"] + grid["w"], 24, panel["title"])
            for x in range(grid["x"], grid["x"] + grid["w"]):
                for y in range(grid["y"], grid["y"] + grid["h"]):
                    self.assertNotIn((x, y), taken, f"{panel['title']} overlaps {taken.get((x, y))}")
                    taken[(x, y)] = panel["title"]

    def test_what_operators_look_for(self):
        """The panels the dashboard promises, by the metrics they show."""
        used = {name for query in dashboard_queries() for name, _ in selectors(query)}
        for name in (
            "ocppgw_chargers_connected", "ocppgw_handshakes_total", "ocppgw_frames_total",
            "ocppgw_bad_frames_total", "ocppgw_disconnects_total",
            "ocppgw_publish_confirm_seconds_bucket", "ocppgw_csms_call_seconds_bucket",
            "ocppgw_csms_call_timeouts_total", "ocppgw_csms_calls_outstanding",
            "ocppgw_csms_calls_held", "ocppgw_amqp_connected", "ocppgw_amqp_blocked",
            "ocppgw_ready", "process_resident_memory_bytes", "process_open_fds",
        ):
            self.assertIn(name, used)

    def test_queries_parse(self):
        """Prometheus's own parser reads every query (as recording rules)."""
        tool = _promtool()
        path = Path(os.path.abspath(self.mktemp()))
        rules = [
            {"record": f"ocppgw:dashboard_query_{n}", "expr": _substitute_variables(query)}
            for n, query in enumerate(dashboard_queries())
        ]
        path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
        result = subprocess.run([tool, "check", "rules", str(path)],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)


class RulesTests(unittest.SynchronousTestCase):
    def run_promtool(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([_promtool(), *args], cwd=RULES.parent,
                              capture_output=True, text=True, timeout=60)

    def test_check_rules(self):
        result = self.run_promtool("check", "rules", RULES.name)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)
        self.assertIn("SUCCESS: 10 rules found", result.stdout)

    def test_unit_tests(self):
        """
        Each alert fires when it should and stays quiet otherwise
        (ocppgw-rules.test.yml: series over time and the alerts expected).
        """
        result = self.run_promtool("test", "rules", RULES_TESTS.name)
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_every_alert_is_tested(self):
        groups = yaml.safe_load(RULES.read_text(encoding="utf-8"))["groups"]
        alerts = {rule["alert"] for group in groups for rule in group["rules"]}
        tests = yaml.safe_load(RULES_TESTS.read_text(encoding="utf-8"))["tests"]
        fired = {
            case["alertname"] for test in tests for case in test["alert_rule_test"]
            if case["exp_alerts"]
        }
        self.assertEqual(alerts, fired)


class MetricsExistTests(GatewayTestCase):
    """
    Every metric and label the dashboard, the rules and the rules' unit
    tests use is on a running gateway's /metrics, after traffic of every
    kind: accepted and refused handshakes, frames both ways, a bad frame,
    an invalid payload, a CSMS call answered and one timed out, a
    disconnect.
    """

    settings = {"ocpp": {"call_timeout": "0.5"}}
    timeout = 40

    @defer.inlineCallbacks
    def make_traffic(self):
        refused = FakeCharger.connect(reactor, self.url(self.identity()), ["ocpp1.5"])
        yield self.assertFailure(refused, ChargerClosed, Exception)
        self.backend.handle(
            "Heartbeat", lambda message, payload: {"currentTime": "2026-01-01T00:00:00Z"}
        )
        identity = self.identity()
        charger = yield self.connect(identity)
        answer = yield charger.call("Heartbeat", {"unexpected": 1})  # invalid: counted
        self.assertEqual(answer[0], 3)
        charger.send(b"not json")
        error = yield charger.other.get()
        self.assertEqual(error[0], 4)
        # a CSMS call answered ...
        reply = self.backend.call(identity, [2, "c1", "Reset", {"type": "Soft"}])
        command = yield charger.next_call()
        charger.answer(command, {"status": "Accepted"})
        yield reply
        # ... and one left unanswered: the gateway's timeout error comes back
        timed_out = self.backend.next_message("ocpp16.Reset.error")
        yield self.backend.send_to_charger(identity, [2, "c2", "Reset", {"type": "Hard"}])
        yield charger.next_call()
        message = yield timed_out
        self.assertTrue(message.headers.get("x-ocppgw-timeout"))
        # one charger stays connected, one has gone
        gone = yield self.connect(self.identity(), ("ocpp2.0.1",))
        disconnected = self.backend.next_message("ocppgw.disconnected")
        yield gone.close()
        yield disconnected  # the gateway has counted it

    @defer.inlineCallbacks
    def test_every_metric_used_exists(self):
        yield self.make_traffic()
        port = self.gateway_service.admin_port.getHost().port
        status, _, body = yield http(port, "/metrics")
        self.assertEqual(status, 200)
        labels: dict[str, set] = {}
        for (name, pairs), _value in samples(body).items():
            labels.setdefault(name, set()).update(label for label, _ in pairs)

        used = [("dashboard", query) for query in dashboard_queries()]
        used += [("rules", expr) for expr in rule_expressions()]
        used += [("rule tests", series) for series in rule_test_series()]
        checked = set()
        for source, expr in used:
            for name, matched in selectors(expr):
                self.assertIn(name, labels, f"{source}: {name} is not on /metrics ({expr})")
                missing = matched - labels[name] - TARGET_LABELS
                self.assertFalse(missing, f"{source}: {name} has no label {missing} ({expr})")
                checked.add(name)
        # the check covered what it should: names with and without labels
        self.assertIn("ocppgw_csms_call_timeouts_total", checked)
        self.assertIn("ocppgw_memory_limit_bytes", checked)
        self.assertGreaterEqual(len(checked), 20)
