"""The deployment files parse, and every command they run exists in the package."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

import worker.metrics
from ops.cli import build_parser
from ops.stack import STREAM_NODE_MAX_ENTRIES
from producer.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "ops" / "deploy"
YAML_FILES = sorted([*DEPLOY.glob("*.yaml"), *DEPLOY.glob("k8s/*.yaml")])


def load_all(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs), path
    return docs


def commands(doc: dict[str, Any]) -> list[list[str]]:
    """Every command line in a compose file or a Kubernetes manifest."""
    found = []
    for service in (doc.get("services") or {}).values():
        if isinstance(service.get("command"), list):
            found.append([str(x) for x in service["command"]])
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []):
        found.append([str(x) for x in container.get("command", []) + container.get("args", [])])
    return found


def check_actorq(argv: list[str]) -> None:
    assert argv[0] == "actorq", argv
    args = build_parser().parse_args(argv[1:])  # SystemExit on unknown subcommands / options
    assert callable(args.func)


def test_files_exist() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in YAML_FILES}
    assert {
        "compose.yaml",
        "k8s/worker.yaml",
        "k8s/keda.yaml",
        "k8s/flower.yaml",
        "k8s/router.yaml",
    } <= names
    assert (DEPLOY / "Dockerfile").exists() and (DEPLOY / "README.md").exists()


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.name)
def test_every_command_is_a_real_actorq_command(path: Path) -> None:
    for doc in load_all(path):
        for argv in commands(doc):
            if argv[0] == "redis-server":
                continue
            check_actorq(argv)


def test_dockerfile_command_exists() -> None:
    cmd = re.search(r"^CMD (\[.*\])$", (DEPLOY / "Dockerfile").read_text(), re.M)
    assert cmd is not None
    check_actorq(json.loads(cmd.group(1)))


def test_compose_runs_the_whole_stack() -> None:
    (doc,) = load_all(DEPLOY / "compose.yaml")
    services = doc["services"]
    assert {"redis", "worker", "flower", "router"} <= services.keys()
    redis_cmd = services["redis"]["command"]
    assert "noeviction" in redis_cmd and redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    # The stream node size the embedded Redis (and so the benchmark) runs with.
    node = redis_cmd[redis_cmd.index("--stream-node-max-entries") + 1]
    assert node == str(STREAM_NODE_MAX_ENTRIES)
    assert services["worker"]["command"][:2] == ["actorq", "worker"]
    assert "--read-only" in services["flower"]["command"]
    # Flower's unauthenticated /metrics: published on loopback only.
    assert all(str(p).startswith("127.0.0.1:") for p in services["flower"]["ports"])
    assert "FLOWER_BASIC_AUTH" in (DEPLOY / ".env.example").read_text()


def test_worker_shutdown_and_autoscaling() -> None:
    (worker,) = load_all(DEPLOY / "k8s" / "worker.yaml")
    pod = worker["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 600
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["ACTORQ_METRICS_PORT"] == "9808"
    queue = env.get("ACTORQ_QUEUE") or Settings().queue
    scaled = [d for d in load_all(DEPLOY / "k8s" / "keda.yaml") if d["kind"] == "ScaledObject"]
    (obj,) = scaled
    assert obj["spec"]["scaleTargetRef"]["name"] == worker["metadata"]["name"]
    (trigger,) = obj["spec"]["triggers"]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == queue
    # KEDA logs in as the workers' ACL user: without a username it would be "default".
    (auth,) = [
        d for d in load_all(DEPLOY / "k8s" / "keda.yaml") if d["kind"] == "TriggerAuthentication"
    ]
    refs = {r["parameter"]: r for r in auth["spec"]["secretTargetRef"]}
    assert set(refs) == {"username", "password"}
    secrets = {d["metadata"]["name"]: d for d in load_all(DEPLOY / "k8s" / "secret.example.yaml")}
    login = secrets[refs["username"]["name"]]["stringData"]
    user = urlsplit(secrets["actorq"]["stringData"]["REDIS_URL"]).username
    assert login[refs["username"]["key"]] == user and login[refs["password"]["key"]]


def test_flower_manifest_keeps_metrics_internal() -> None:
    docs = {d["kind"]: d for d in load_all(DEPLOY / "k8s" / "flower.yaml")}
    assert docs["Service"]["spec"].get("type", "ClusterIP") == "ClusterIP"
    container = docs["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    assert "--read-only" in container["args"]
    assert "metrics" in json.dumps(docs["Ingress"]["metadata"]["annotations"])


def test_grafana_dashboard_uses_real_metric_names() -> None:
    dash = json.loads((ROOT / "ops" / "grafana-dashboard.json").read_text())
    exported = {
        m.name
        for name in worker.metrics.__all__
        if name.isupper()
        for m in getattr(worker.metrics, name).collect()
    }
    used = {
        re.sub(r"_(bucket|total|count|sum)$", "", n)
        for p in dash["panels"]
        for t in p["targets"]
        for n in re.findall(r"actorq_[a-z_]+", t["expr"])
    }
    assert used and used <= exported, used - exported
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
