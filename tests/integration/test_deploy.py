"""The deployment files under deploy/: Dockerfiles, the Bento definition, the kustomize base and
overlays, and the Grafana dashboard.

The overlays are rendered here in Python (resources, namespace, labels, components and JSON 6902
add/replace patches: the only kustomize features deploy/k8s uses), then every built-in object is
checked against the Kubernetes 1.32 OpenAPI schemas shipped inside `kubernetes-validate`
(offline, strict). Where `kubectl` is installed its own `kubectl kustomize` output must match.
The Bento is built for real and offline, as deploy/bentofile.yaml documents it (`pip wheel`, then
`bentoml build`), in a copy of the working tree with a temporary BENTOML_HOME and every package
index blocked; the bentofile does not lock its (already exact) pins, so no index is needed.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pathspec
import pytest
import yaml

from flywheel_server.config import ServerConfig, add_arguments

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu-demo", "gpu")
K8S_VERSION = "1.32.0"
# Kinds from CRDs: kubernetes-validate has schemas only for built-in kinds, so these are checked
# by hand (see test_servicemonitor_component) and skipped in schema validation.
CRD_KINDS = {"ServiceMonitor"}


# --- a minimal kustomize: just what deploy/k8s uses ------------------------------------------


def _pointer(path: str) -> list[str]:
    assert path.startswith("/"), path
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _apply_op(doc: Any, op: dict[str, Any]) -> None:
    assert op["op"] in ("add", "replace"), f"unsupported JSON 6902 op {op['op']!r}"
    *parents, last = _pointer(op["path"])
    node = doc
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    value = copy.deepcopy(op["value"])
    if isinstance(node, list):
        if op["op"] == "add":
            node.insert(len(node) if last == "-" else int(last), value)
        else:
            assert int(last) < len(node), op["path"]
            node[int(last)] = value
    else:
        if op["op"] == "replace":
            assert last in node, f"replace of missing {op['path']}"
        node[last] = value


def _load_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def render(directory: Path) -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    known = {"apiVersion", "kind", "namespace", "labels", "resources", "components", "patches"}
    assert set(kustomization) <= known, f"renderer does not know {set(kustomization) - known}"
    docs: list[dict[str, Any]] = []
    for entry in [*kustomization.get("resources", []), *kustomization.get("components", [])]:
        path = directory / entry
        docs += render(path) if path.is_dir() else _load_docs(path)
    for doc in docs:
        meta = doc.setdefault("metadata", {})
        if (ns := kustomization.get("namespace")) and doc["kind"] != "Namespace":
            meta["namespace"] = ns
        for label in kustomization.get("labels", []):
            assert set(label) == {"pairs"}, "only plain label pairs are supported"
            meta.setdefault("labels", {}).update(label["pairs"])
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        matches = [
            d
            for d in docs
            if d["kind"] == target["kind"] and d["metadata"]["name"] == target["name"]
        ]
        assert len(matches) == 1, f"patch target {target} matches {len(matches)} objects"
        for op in yaml.safe_load(patch["patch"]):
            _apply_op(matches[0], op)
    return docs


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def _key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, render(K8S / "overlays" / request.param)


# --- Kubernetes ---------------------------------------------------------------------------------


def test_schemas_ship_offline() -> None:
    from kubernetes_validate import utils

    assert K8S_VERSION in utils.all_versions()


def test_overlays_validate_strictly(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    kinds = {d["kind"] for d in docs}
    assert kinds >= {
        "Namespace",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "PersistentVolumeClaim",
        "StatefulSet",
    }
    assert len({_key(d) for d in docs}) == len(docs), "duplicate objects"
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            continue  # not a built-in kind: no schema to validate against (see CRD_KINDS)
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "flywheel"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_renderer_matches_kubectl_kustomize(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    out = subprocess.run(
        ["kubectl", "kustomize", str(K8S / "overlays" / name)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    theirs = {_key(d): d for d in yaml.safe_load_all(out) if d}
    assert theirs == {_key(d): d for d in docs}


def test_server_deployment(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    pod = _find(docs, "Deployment", "flywheel-server")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    server = pod["containers"][0]
    assert server["args"][0] == "serve"
    assert {p["containerPort"] for p in server["ports"]} == {3000, 50051}
    assert server["readinessProbe"]["grpc"]["port"] == 50051
    assert server["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert server["startupProbe"]["httpGet"]["path"] == "/readyz"
    env = {e["name"]: e for e in server["env"]}
    assert env["FLYWHEEL_HOST"]["value"] == "0.0.0.0"
    assert env["FLYWHEEL_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "flywheel-api-keys"
    assert env["FLYWHEEL_DB"]["valueFrom"]["secretKeyRef"]["name"] == "flywheel-db"
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]}
    assert claims == {"flywheel-adapters"}

    service = _find(docs, "Service", "flywheel-server")
    assert {(p["name"], p["port"]) for p in service["spec"]["ports"]} == {
        ("http", 3000),
        ("grpc", 50051),
    }
    hpa = _find(docs, "HorizontalPodAutoscaler", "flywheel-server")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"]["name"] == "flywheel-server"
    assert _find(docs, "PodDisruptionBudget", "flywheel-server")["apiVersion"] == "policy/v1"


def test_learner_and_storage(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    pod = _find(docs, "Deployment", "flywheel-learner")["spec"]["template"]["spec"]
    learner = pod["containers"][0]
    args = learner["args"]
    assert args[0] == "learn"
    assert args[args.index("--server") + 1] == "flywheel-server:50051"
    assert "--model" in args and "--work-dir" in args
    assert learner["env"][0]["valueFrom"]["secretKeyRef"]["name"] == "flywheel-api-keys"
    postgres = _find(docs, "StatefulSet", "flywheel-postgres")
    assert postgres["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "pgdata"
    assert _find(docs, "Service", "flywheel-postgres")["spec"]["ports"][0]["port"] == 5432
    _find(docs, "PersistentVolumeClaim", "flywheel-learner-data")


def test_base_adapters_volume_is_shared() -> None:
    base = render(K8S / "base")
    pvc = _find(base, "PersistentVolumeClaim", "flywheel-adapters")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "ServiceMonitor" not in {d["kind"] for d in base}


def _gpus(container: dict[str, Any]) -> Any:
    return container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")


def test_cpu_demo_overlay() -> None:
    docs = render(K8S / "overlays" / "cpu-demo")
    server = _find(docs, "Deployment", "flywheel-server")
    assert server["spec"]["replicas"] == 1
    assert _find(docs, "HorizontalPodAutoscaler", "flywheel-server")["spec"]["maxReplicas"] == 1
    container = server["spec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e.get("value") for e in container["env"]}["FLYWHEEL_DEVICE"] == "cpu"
    for doc in docs:
        if doc["kind"] in ("Deployment", "StatefulSet"):
            for c in doc["spec"]["template"]["spec"]["containers"]:
                assert _gpus(c) is None, doc["metadata"]["name"]
                assert c["image"].endswith(":dev") or c["image"].startswith("postgres:")


def test_gpu_overlay() -> None:
    docs = render(K8S / "overlays" / "gpu")
    learner = _find(docs, "Deployment", "flywheel-learner")["spec"]["template"]["spec"]
    assert learner["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert learner["containers"][0]["image"] == "flywheel-learner:cuda"
    server = _find(docs, "Deployment", "flywheel-server")["spec"]["template"]["spec"]
    names = [c["name"] for c in server["containers"]]
    assert names == ["server", "vllm"]
    flywheel, vllm = server["containers"]
    # The GPU belongs to vLLM; flywheel reaches it on loopback with `--backend vllm`.
    assert _gpus(vllm) == 1 and _gpus(flywheel) is None
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env = {e["name"]: e["value"] for e in flywheel["env"] if "value" in e}
    flags = vars(parser.parse_args(flywheel["args"][1:]))  # after the `serve` subcommand
    config = ServerConfig.from_env(env, **{k: v for k, v in flags.items() if v is not None})
    assert (config.backend, config.device) == ("vllm", "cpu")
    assert config.vllm_url == f"http://127.0.0.1:{_flag(vllm['args'], '--port')}"
    # vLLM serves the base flywheel loads, under the base version's id, with runtime LoRA on.
    assert vllm["args"][0] == str(config.model)
    assert _flag(vllm["args"], "--served-model-name") == "policy-v0"
    assert "--enable-lora" in vllm["args"]
    assert int(_flag(vllm["args"], "--max-loras")) >= config.keep_versions + 2
    assert {e["name"]: e["value"] for e in vllm["env"]}[
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
    ] == "True"
    # Adapter paths flywheel sends must resolve in vLLM: the same volume at the same path.
    mounts = {
        c["name"]: {(m["name"], m["mountPath"]) for m in c["volumeMounts"]}
        for c in (flywheel, vllm)
    }
    assert ("data", str(config.data_dir)) in mounts["server"] & mounts["vllm"]


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_servicemonitor_component() -> None:
    (monitor,) = _load_docs(K8S / "components" / "servicemonitor" / "servicemonitor.yaml")
    kustomization = yaml.safe_load(
        (K8S / "components" / "servicemonitor" / "kustomization.yaml").read_text()
    )
    assert kustomization["kind"] == "Component"
    # A CRD kind: checked by hand here, not with kubernetes-validate (no schema for it).
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    service = _find(render(K8S / "base"), "Service", "flywheel-server")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}


# --- Dockerfiles --------------------------------------------------------------------------------

INSTRUCTIONS = {
    "FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT",
    "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL",
}  # fmt: skip
DOCKERFILES = {
    "server.Dockerfile": ("serve", "python:3.11-slim"),
    "server-cuda.Dockerfile": ("serve", "nvidia/cuda:"),
    "learner.Dockerfile": ("learn", "python:3.11-slim"),
    "learner-cuda.Dockerfile": ("learn", "nvidia/cuda:"),
}


def parse_dockerfile(path: Path) -> list[tuple[str, str]]:
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        assert word.upper() in INSTRUCTIONS, f"{path.name}: unknown instruction {word!r}"
        instructions.append((word.upper(), rest.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return instructions


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile(name: str) -> None:
    command, base = DOCKERFILES[name]
    instructions = parse_dockerfile(DEPLOY / "docker" / name)
    by = {}
    for word, rest in instructions:
        by.setdefault(word, []).append(rest)

    args = {}
    for arg in by.get("ARG", []):
        key, _, default = arg.partition("=")
        args[key] = default
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], by["FROM"][0])
    assert image.startswith(base), image

    (entrypoint,) = by["ENTRYPOINT"]
    assert json.loads(entrypoint) == ["flywheel"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "flywheel" in scripts
    (cmd,) = by["CMD"]
    assert json.loads(cmd)[0] == command

    assert set(" ".join(by["EXPOSE"]).split()) == {"3000", "50051"}
    (healthcheck,) = by["HEALTHCHECK"]
    assert "/livez" in healthcheck
    (user,) = by["USER"]
    assert user.split(":")[0] not in ("root", "0")
    assert [w for w, _ in instructions].index("USER") < [w for w, _ in instructions].index(
        "ENTRYPOINT"
    )
    assert any("pip install -c constraints.txt" in r for r in by["RUN"])
    if "cuda" in name:
        assert any("TORCH_INDEX_URL" in r and "torch" in r for r in by["RUN"])
    for source in by["COPY"]:
        for part in source.split()[:-1]:
            assert (ROOT / part).exists(), f"{name}: COPY source {part} is missing"


# --- Bento --------------------------------------------------------------------------------------


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower()] = version
    return pins


def test_bentofile() -> None:
    from bentoml._internal.bento.build_config import BentoBuildConfig

    with (DEPLOY / "bentofile.yaml").open() as stream:
        config = BentoBuildConfig.from_yaml(stream)
    module_name, _, attr = config.service.partition(":")
    service = getattr(importlib.import_module(module_name), attr)
    assert service.name == "flywheel"

    pins = _constraints()
    assert config.python.packages
    for requirement in config.python.packages:
        name, _, version = requirement.partition("==")
        assert pins.get(name.lower()) == version, f"{requirement} disagrees with constraints.txt"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (wheel,) = config.python.wheels
    assert Path(wheel).name == f"{project['name']}-{project['version']}-py3-none-any.whl"
    assert "flywheel serve" in (DEPLOY / "README.md").read_text()


def _copy_working_tree(dest: Path) -> None:
    """Copy the working tree to `dest` as git sees it: .git and everything .gitignore names
    (.venv, dist/, build/, *.egg-info, runtime data) stay behind."""
    ignored = pathspec.GitIgnoreSpec.from_lines(
        [".git/", *(ROOT / ".gitignore").read_text().splitlines()]
    )

    def ignore(directory: str, names: list[str]) -> set[str]:
        here = Path(directory)
        rel = here.relative_to(ROOT)
        return {
            name
            for name in names
            if ignored.match_file((rel / name).as_posix() + ("/" if (here / name).is_dir() else ""))
        }

    shutil.copytree(ROOT, dest, ignore=ignore)


@pytest.mark.slow
def test_bento_builds_offline(tmp_path: Path) -> None:
    # The bentofile's own two steps, run in a copy so that nothing (dist/, build/, egg-info, the
    # Bento) is written into the repository or the user's Bento store.
    checkout = tmp_path / "checkout"
    _copy_working_tree(checkout)
    # Stand-ins for what a real checkout holds beside the sources (the copy left them out).
    for stray in (".venv/pyvenv.cfg", "data/flywheel.db"):
        (checkout / stray).parent.mkdir(parents=True)
        (checkout / stray).write_text("")
    home = tmp_path / "bentoml-home"
    closed = "http://127.0.0.1:9"  # nothing listens there: any HTTP(S) request fails at once
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "true",
        # Offline for real, even on a machine that has a network: no index for pip or uv, and a
        # dead proxy for anything else that would fetch over HTTP(S).
        "PIP_NO_INDEX": "1",
        "UV_OFFLINE": "1",
        **{var: closed for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
        **{var.lower(): closed for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")},
        "NO_PROXY": "",
        "no_proxy": "",
    }

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            args, cwd=checkout, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"{args} failed:\n{done.stdout}\n{done.stderr}"
        return done

    # Step 1: the project wheel, with the setuptools already installed here (no isolated build
    # environment to download).
    pip = (sys.executable, "-m", "pip")
    run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", "dist", ".")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wheel = f"{project['name']}-{project['version']}-py3-none-any.whl"
    assert (checkout / "dist" / wheel).is_file()

    # Step 2: the Bento, with this environment's own `bentoml` script.
    bentoml_cli = Path(sys.executable).with_name("bentoml")
    out = run(str(bentoml_cli), "build", "-f", "deploy/bentofile.yaml", "-o", "tag", ".").stdout
    (tag,) = re.findall(r"^__tag__:(\S+)$", out, re.MULTILINE)
    name, _, version = tag.partition(":")
    assert name == "flywheel"
    bento = home / "bentos" / name / version

    info = yaml.safe_load((bento / "bento.yaml").read_text())
    assert info["service"] == "flywheel_server.bento_service:Flywheel"
    assert info["python"]["lock_packages"] is False

    # The build context is the whole checkout; only the include list lands in src/ (no .venv,
    # data/ or sources), beside the bentofile BentoML writes there itself.
    src = {
        p.relative_to(bento / "src").as_posix() for p in (bento / "src").rglob("*") if p.is_file()
    }
    assert src == {"bentofile.yaml", "constraints.txt", "deploy/README.md"}
    assert (bento / "src" / "constraints.txt").read_text() == (ROOT / "constraints.txt").read_text()

    python_env = bento / "env" / "python"
    requirements = set((python_env / "requirements.txt").read_text().split())
    assert f"torch=={_constraints()['torch']}" in requirements
    assert set(info["python"]["packages"]) <= requirements
    assert not (python_env / "requirements.lock.txt").exists()
    assert [p.name for p in (python_env / "wheels").iterdir()] == [wheel]
    with zipfile.ZipFile(python_env / "wheels" / wheel) as archive:
        assert "flywheel_server/bento_service.py" in archive.namelist()
    # The image still installs torch's CPU build from PyTorch's index.
    install = (python_env / "install.sh").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in install
    assert (bento / "env" / "docker" / "Dockerfile").is_file()


# --- Grafana ------------------------------------------------------------------------------------


def _defined_series() -> set[str]:
    from prometheus_client.metrics import MetricWrapperBase

    from flywheel_server import metrics

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    series = set()
    for obj in vars(metrics).values():
        if isinstance(obj, MetricWrapperBase):
            series |= {obj._name + s for s in suffixes[obj._type]}  # type: ignore[attr-defined]
    return series


def test_grafana_dashboard() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "flywheel.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert exprs
    used = {m for e in exprs for m in re.findall(r"\bflywheel_[a-z_]+", e)}
    defined = _defined_series()
    assert used <= defined, f"not defined in metrics.py: {used - defined}"
    charted = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert charted >= {
        "flywheel_requests_total",
        "flywheel_time_to_first_token_seconds",
        "flywheel_generated_tokens_total",
        "flywheel_queue_depth",
        "flywheel_running_rows",
        "flywheel_live_policy_version",
        "flywheel_hot_swaps_total",
        "flywheel_rankings_total",
    }
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
