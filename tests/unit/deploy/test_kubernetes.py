"""Kubernetes base: every manifest passes kubernetes-validate (strict), the kustomization lists
them all, and the pieces fit together (selectors, ports, probes, scrape job)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from deploy_support import DEPLOY

K8S = DEPLOY / "kubernetes"
CRDS = {"Kustomization", "ServiceMonitor"}  # no schema in kubernetes-validate


def docs() -> dict[tuple[str, str], dict]:
    out = {}
    for path in K8S.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            out[(doc["kind"], doc.get("metadata", {}).get("name", path.name))] = doc
    return out


def test_kubernetes_validate_strict():
    tool = shutil.which("kubernetes-validate") or str(Path(sys.executable).parent / "kubernetes-validate")
    if not Path(tool).exists():
        pytest.skip("kubernetes-validate not installed (pip extra `test`)")
    files = [str(p) for p in sorted(K8S.glob("*.yaml")) if p.name != "kustomization.yaml"]
    result = subprocess.run([tool, "--strict", "--quiet", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    failures = [line for line in result.stdout.splitlines() if "ERROR" in line or "FAIL" in line]
    assert not failures


def test_kustomization_lists_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_pieces_fit_together():
    d = docs()
    ds = d[("DaemonSet", "dwcp-agent")]["spec"]
    pod = ds["template"]["spec"]
    agent = next(c for c in pod["containers"] if c["name"] == "dwcp-agent")
    assert pod["hostNetwork"] is True and pod["nodeSelector"]
    assert ds["selector"]["matchLabels"].items() <= ds["template"]["metadata"]["labels"].items()
    assert agent["readinessProbe"]["httpGet"]["path"] == "/health" == agent["livenessProbe"]["httpGet"]["path"]
    assert agent["resources"]["requests"] and agent["resources"]["limits"]
    assert "IPC_LOCK" in agent["securityContext"]["capabilities"]["add"]
    assert agent["securityContext"]["allowPrivilegeEscalation"] is False
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert ports == {"admin": 8080, "metrics": 9878, "data": 9876, "acp": 9877}
    assert agent["readinessProbe"]["httpGet"]["port"] == "metrics" == agent["livenessProbe"]["httpGet"]["port"]

    service = d[("Service", "dwcp-agent")]["spec"]
    assert service["clusterIP"] == "None"
    assert service["selector"].items() <= ds["template"]["metadata"]["labels"].items()
    assert {p["targetPort"] for p in service["ports"]} <= set(ports) - {"admin"}  # admin is loopback-only

    monitor = d[("ServiceMonitor", "dwcp-agent")]["spec"]
    service_labels = d[("Service", "dwcp-agent")]["metadata"]["labels"]
    assert monitor["selector"]["matchLabels"].items() <= service_labels.items()
    # The job label becomes "dwcp-agent", which DWCPv3AllReplicasDown counts.
    assert service_labels[monitor["jobLabel"]] == "dwcp-agent"
    assert monitor["endpoints"][0]["port"] == "metrics" and monitor["endpoints"][0]["path"] == "/metrics"

    assert pod["serviceAccountName"] == d[("ServiceAccount", "dwcp-agent")]["metadata"]["name"]
    config = d[("ConfigMap", "dwcp-agent-config")]["data"]
    assert agent["envFrom"][0]["configMapRef"]["name"] == "dwcp-agent-config"
    assert {"FEATURE_FLAG_ROLLOUT", "ENABLE_V3", "TRACE_SAMPLING", "config.yaml"} <= set(config)
    agent_config = yaml.safe_load(config["config.yaml"])
    assert agent_config["admin_host"] == "127.0.0.1" and agent_config["metrics_port"] == ports["metrics"]


def test_the_daemonset_mounts_every_image_directory_it_is_configured_to_serve(tmp_path: Path):
    from dwcp_agent.config import load_config

    d = docs()
    pod = d[("DaemonSet", "dwcp-agent")]["spec"]["template"]["spec"]
    agent = next(c for c in pod["containers"] if c["name"] == "dwcp-agent")
    host_volumes = {v["name"] for v in pod["volumes"] if "hostPath" in v}
    mounted = [Path(m["mountPath"]) for m in agent["volumeMounts"] if m["name"] in host_volumes]
    data = d[("ConfigMap", "dwcp-agent-config")]["data"]
    env = {k: v for k, v in data.items() if k != "config.yaml"}
    env["DWCP_STATE_DIR"] = next(e["value"] for e in agent["env"] if e["name"] == "DWCP_STATE_DIR")
    config_file = tmp_path / "config.yaml"
    config_file.write_text(data["config.yaml"])
    config = load_config(config_file, environ=env)  # also proves the ConfigMap is a valid config
    served = [*config.allowed_source_dirs, *config.allowed_dest_dirs]
    assert served
    for directory in served:
        assert any(directory.is_relative_to(m) for m in mounted), f"{directory} is served but not mounted"
