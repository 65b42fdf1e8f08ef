#!/usr/bin/env python3
"""Renders the ferry Helm chart and checks the manifests it produces.

Run by scripts/test (helm comes from `go install helm.sh/helm/v3/cmd/helm`,
see scripts/setup). Renders with the default values and with a
Secret-held configuration, secrets by reference and the ServiceMonitor on,
and checks probes, environment, replicas, volumes and the toggle; then that
contradictory values fail with a message naming them.
"""

import os
import shutil
import subprocess
import sys
import unittest

import yaml

HERE = os.path.dirname(os.path.abspath(__file__))
CHART = os.path.join(HERE, "ferry")


def helm_binary():
    explicit = os.environ.get("HELM")
    if explicit:
        return explicit
    found = shutil.which("helm")
    if found:
        return found
    gopath = subprocess.run(
        ["go", "env", "GOPATH"], capture_output=True, text=True, check=False
    ).stdout.strip()
    candidate = os.path.join(gopath or os.path.expanduser("~/go"), "bin", "helm")
    if os.path.exists(candidate):
        return candidate
    sys.exit(
        "test_chart: no helm binary: run scripts/setup --tests (it runs "
        "`go install helm.sh/helm/v3/cmd/helm@v3.19.0`) or set HELM"
    )


HELM = helm_binary()


def render(*args):
    out = subprocess.run(
        [HELM, "template", "t", CHART, *args], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise AssertionError(f"helm template {args} failed:\n{out.stderr}")
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def render_error(*args):
    out = subprocess.run(
        [HELM, "template", "t", CHART, *args], capture_output=True, text=True
    )
    assert out.returncode != 0, f"helm template {args} rendered:\n{out.stdout}"
    return out.stderr


def container(manifests):
    dep = manifests[("Deployment", "t-ferry")]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    return dep, c


def env_of(c):
    return {e["name"]: e for e in c["env"]}


class DefaultValues(unittest.TestCase):
    def setUp(self):
        self.m = render()

    def test_renders_a_configmap_a_deployment_and_a_service_but_no_servicemonitor(self):
        kinds = sorted(k for k, _ in self.m)
        self.assertEqual(kinds, ["ConfigMap", "Deployment", "Service"])

    def test_two_replicas_recreated_not_rolled(self):
        dep, _ = container(self.m)
        self.assertEqual(dep["spec"]["replicas"], 2)
        self.assertEqual(dep["spec"]["strategy"]["type"], "Recreate")

    def test_probes_hit_healthz_and_readyz_on_the_admin_port(self):
        _, c = container(self.m)
        self.assertEqual(c["livenessProbe"]["httpGet"], {"path": "/healthz", "port": "admin"})
        self.assertEqual(c["readinessProbe"]["httpGet"], {"path": "/readyz", "port": "admin"})
        (port,) = c["ports"]
        self.assertEqual((port["name"], port["containerPort"]), ("admin", 9187))

    def test_admin_listens_on_all_interfaces_and_the_config_is_mounted(self):
        dep, c = container(self.m)
        env = env_of(c)
        self.assertEqual(env["FERRY_ADMIN__LISTEN"]["value"], "0.0.0.0:9187")
        self.assertEqual(env["FERRY_CONFIG"]["value"], "/etc/ferry/ferry.toml")
        self.assertEqual(c["args"], ["run", "--config", "/etc/ferry/ferry.toml"])
        (mount,) = [v for v in c["volumeMounts"] if v["name"] == "config"]
        self.assertEqual(mount["mountPath"], "/etc/ferry/ferry.toml")
        (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
        self.assertEqual(vol["configMap"]["name"], "t-ferry")
        toml = self.m[("ConfigMap", "t-ferry")]["data"]["ferry.toml"]
        self.assertIn("[source]", toml)
        self.assertIn("[[index]]", toml)

    def test_pod_runs_as_the_image_user_with_a_read_only_root(self):
        dep, c = container(self.m)
        pod = dep["spec"]["template"]["spec"]
        self.assertEqual(pod["securityContext"]["runAsUser"], 10001)
        self.assertTrue(pod["securityContext"]["runAsNonRoot"])
        self.assertTrue(c["securityContext"]["readOnlyRootFilesystem"])
        self.assertGreaterEqual(pod["terminationGracePeriodSeconds"], 35)

    def test_service_selects_the_pods_and_publishes_the_standby(self):
        dep, _ = container(self.m)
        svc = self.m[("Service", "t-ferry")]
        self.assertTrue(svc["spec"]["publishNotReadyAddresses"])
        labels = dep["spec"]["template"]["metadata"]["labels"]
        for k, v in svc["spec"]["selector"].items():
            self.assertEqual(labels[k], v)


class SecretConfigAndServiceMonitor(unittest.TestCase):
    def setUp(self):
        self.m = render(
            "--set", "config.toml=",
            "--set", "config.existingSecret=ferry-config",
            "--set", "secretEnv.PGPASSWORD.secret=ferry-postgres",
            "--set", "secretEnv.PGPASSWORD.key=password",
            "--set", "secretEnv.FERRY_SINK__URL.secret=ferry-opensearch",
            "--set", "secretEnv.FERRY_SINK__URL.key=url",
            "--set", "replicaCount=1",
            "--set", "serviceMonitor.enabled=true",
            "--set", "serviceMonitor.labels.release=prometheus",
        )

    def test_the_configuration_comes_from_the_secret_and_no_configmap_is_made(self):
        dep, _ = container(self.m)
        self.assertNotIn("ConfigMap", [k for k, _ in self.m])
        (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"] if v["name"] == "config"]
        self.assertEqual(vol, {"name": "config", "secret": {"secretName": "ferry-config"}})
        self.assertNotIn("checksum/config", dep["spec"]["template"]["metadata"]["annotations"] or {})

    def test_secrets_are_referenced_never_inlined(self):
        _, c = container(self.m)
        env = env_of(c)
        self.assertEqual(
            env["PGPASSWORD"]["valueFrom"]["secretKeyRef"],
            {"name": "ferry-postgres", "key": "password"},
        )
        self.assertEqual(
            env["FERRY_SINK__URL"]["valueFrom"]["secretKeyRef"],
            {"name": "ferry-opensearch", "key": "url"},
        )
        self.assertNotIn("value", env["PGPASSWORD"])

    def test_replicas_follow_the_value(self):
        dep, _ = container(self.m)
        self.assertEqual(dep["spec"]["replicas"], 1)

    def test_servicemonitor_scrapes_metrics_on_the_admin_port(self):
        sm = self.m[("ServiceMonitor", "t-ferry")]
        self.assertEqual(sm["apiVersion"], "monitoring.coreos.com/v1")
        self.assertEqual(sm["metadata"]["labels"]["release"], "prometheus")
        (ep,) = sm["spec"]["endpoints"]
        self.assertEqual((ep["port"], ep["path"]), ("admin", "/metrics"))
        svc = self.m[("Service", "t-ferry")]
        for k, v in sm["spec"]["selector"]["matchLabels"].items():
            self.assertEqual(svc["metadata"]["labels"][k], v)


class BadValues(unittest.TestCase):
    def test_two_configuration_sources_are_refused_naming_both(self):
        err = render_error(
            "--set", "config.existingSecret=a", "--set", "config.existingConfigMap=b"
        )
        self.assertIn("config.existingConfigMap and config.existingSecret", err)

    def test_no_configuration_is_refused(self):
        err = render_error("--set", "config.toml=")
        self.assertIn("no configuration", err)

    def test_a_secret_reference_without_its_key_is_refused(self):
        err = render_error("--set", "secretEnv.PGPASSWORD.secret=pg")
        self.assertIn("secretEnv.PGPASSWORD.key is required", err)

    def test_lint_is_clean(self):
        out = subprocess.run([HELM, "lint", "--strict", CHART], capture_output=True, text=True)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)


if __name__ == "__main__":
    unittest.main(verbosity=2)
