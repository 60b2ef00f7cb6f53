"""deploy/: every Kubernetes manifest against the Kubernetes OpenAPI schemas, the kustomize
overlays as rendered, the compose file, and what the files say about the code checked
against the code: flags the CLI accepts, ports the probes and Services name, the metric the
autoscaler reads and the worker exports.

Offline and fast: the schemas are the ones kubernetes-validate ships (strict: unknown fields
fail), validated for the oldest Kubernetes the manifests claim and the newest the package
knows. Custom resources (KEDA, the Prometheus Operator) have no schema there; they are
checked by hand below. The overlays are rendered with `kubectl kustomize` (no cluster); only
those tests skip when kubectl is not installed. The base is checked either way, from its
files.
"""

from __future__ import annotations

import functools
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
OVERLAYS = ("cpu", "gpu", "keda")
NAMESPACE = "breakwater"
MIN_K8S = "1.29"  # the oldest release deploy/README.md claims (gRPC probes need 1.27)
K8S_VERSIONS = (MIN_K8S, kubernetes_validate.latest_version())
CRD_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}
HELM_VALUES = {K8S / "monitoring" / "prometheus-adapter-values.yaml"}
EXPORTED_METRIC = "vllm:num_requests_waiting"

Doc = dict[str, Any]


# ---------------------------------------------------------------------------- loading


def load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def kustomization(d: Path) -> Doc:
    return yaml.safe_load((d / "kustomization.yaml").read_text())


def patch_files() -> set[Path]:
    out: set[Path] = set()
    for d in kustomization_dirs():
        for p in kustomization(d).get("patches", []):
            if "path" in p:
                out.add((d / p["path"]).resolve())
    return out


def manifest_files() -> list[Path]:
    """Every YAML file under deploy/k8s that is a whole Kubernetes object (not a
    kustomization, a patch or Helm values)."""
    skip = patch_files() | {p.resolve() for p in HELM_VALUES}
    return sorted(
        p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and p.resolve() not in skip
    )


@functools.cache
def base_docs() -> tuple[Doc, ...]:
    d = K8S / "base"
    return tuple(doc for f in kustomization(d)["resources"] for doc in load_docs(d / f))


@functools.cache
def kubectl() -> str | None:
    return shutil.which("kubectl")


@functools.cache
def rendered(overlay: str) -> tuple[Doc, ...]:
    exe = kubectl()
    if exe is None:
        pytest.skip("kubectl is not installed: the kustomize overlays are not rendered")
    path = K8S / "overlays" / overlay
    proc = subprocess.run([exe, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"kubectl kustomize {path} failed:\n{proc.stderr}"
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def docs_of(name: str) -> tuple[Doc, ...]:
    """The base from its files (no kubectl needed), an overlay as kustomize renders it."""
    return base_docs() if name == "base" else rendered(name)


SETS = ("base", *OVERLAYS)


def find(docs: tuple[Doc, ...], kind: str, name: str | None = None) -> list[Doc]:
    return [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]


def one(docs: tuple[Doc, ...], kind: str, name: str) -> Doc:
    found = find(docs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def containers(workload: Doc) -> list[Doc]:
    return workload["spec"]["template"]["spec"]["containers"]


def workloads(docs: tuple[Doc, ...]) -> list[Doc]:
    return [d for d in docs if d["kind"] in ("Deployment", "StatefulSet")]


def the_container(docs: tuple[Doc, ...], name: str) -> tuple[Doc, Doc]:
    """The Deployment `name` and its one container, which runs `breakwater <name>`."""
    dep = one(docs, "Deployment", name)
    (c,) = containers(dep)
    assert c["args"][0] == name, f"{name}: the container should run `breakwater {name}`"
    return dep, c


# ---------------------------------------------------------------------------- the CLI


@functools.cache
def cli_flags(command: str) -> frozenset[str]:
    """The long options `breakwater <command> --help` lists."""
    proc = subprocess.run(
        [sys.executable, "-m", "breakwater.cli", command, "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    flags = frozenset(re.findall(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)", proc.stdout))
    assert "--help" in flags and len(flags) > 5, proc.stdout
    return flags


def flag_values(args: list[str]) -> dict[str, str]:
    """--flag=value and --flag value pairs (a bare --flag maps to "")."""
    out: dict[str, str] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--"):
            name, eq, value = a.partition("=")
            if not eq and i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            out[name] = value
        i += 1
    return out


def check_cli(args: list[str], where: str) -> dict[str, str]:
    """`args` (`gateway ...` or `worker ...`) use only flags the CLI lists, spelt out in
    full (argparse would take an abbreviation), and parse; returns the flags' values."""
    command, rest = args[0], args[1:]
    assert command in ("gateway", "worker"), f"{where}: unexpected command {command!r}"
    unknown = sorted(
        a.partition("=")[0]
        for a in rest
        if a.startswith("--") and a.partition("=")[0] not in cli_flags(command)
    )
    assert not unknown, f"{where}: `breakwater {command}` has no {unknown}"
    from breakwater.cli import build_parser

    try:
        build_parser().parse_args(args)
    except SystemExit as e:  # argparse printed why on stderr
        pytest.fail(f"{where}: `breakwater {shlex.join(args)}` does not parse ({e})")
    return flag_values(rest)


# ---------------------------------------------------------------------------- the metric


def adapter_rules(kind: str = "custom") -> list[tuple[str, Doc]]:
    """prometheus-adapter's `custom` (or `external`) rules, from the Helm values and the
    ConfigMap (whose keys are `rules` and `externalRules`)."""
    key = "rules" if kind == "custom" else "externalRules"
    out = [
        (str(p.relative_to(ROOT)), rule)
        for p in HELM_VALUES
        for rule in yaml.safe_load(p.read_text())["rules"][kind]
    ]
    for doc in load_docs(K8S / "monitoring" / "adapter-config.yaml"):
        out += [("adapter-config.yaml", r) for r in yaml.safe_load(doc["data"]["config.yaml"])[key]]
    return out


def adapter_name(rule: Doc, series: str) -> str | None:
    """The custom-metrics name prometheus-adapter gives `series` under `rule` (None when
    the rule does not select it): `name.as` expanded with the groups of `name.matches`
    ($1 or ${1}; `matches` defaults to .*); without `as`, $1 if the pattern has one
    group, else $0."""
    if series not in rule["seriesQuery"]:
        return None
    name = rule.get("name", {})
    m = re.search(name.get("matches") or ".*", series)
    if m is None:
        return None
    target = name.get("as") or ("$1" if m.re.groups == 1 else "$0")
    return m.expand(re.sub(r"\$\{?(\d+)\}?", r"\\g<\1>", target))


# ============================================================================ the files


def test_every_manifest_is_validated_somewhere() -> None:
    """No YAML under deploy/k8s escapes the checks: each one is a kustomization, a patch a
    kustomization uses, Helm values, or a whole object validated below."""
    for p in patch_files():
        assert p.is_file(), f"a kustomization names a missing patch {p}"
    for d in kustomization_dirs():
        for r in kustomization(d).get("resources", []):
            assert (d / r).exists(), f"{d}/kustomization.yaml names a missing resource {r}"
    files = manifest_files()
    assert {f.relative_to(K8S).as_posix() for f in files} >= {
        "base/gateway.yaml",
        "base/worker.yaml",
        "base/worker-hpa.yaml",
        "base/redis.yaml",
    }
    for f in files:
        for doc in load_docs(f):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), f"{f}: not an object"


def schema_errors(doc: Doc) -> list[str]:
    """Where `doc` breaks the schemas of the Kubernetes releases we claim (strict)."""
    errors = []
    name = f"{doc['kind']}/{doc['metadata']['name']}"
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"{name} (Kubernetes {version}) at {path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError:
            if (doc["apiVersion"], doc["kind"]) not in CRD_KINDS:
                errors.append(f"{name}: no Kubernetes schema for {doc['apiVersion']}")
    return errors


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.relative_to(K8S).as_posix())
def test_manifest_files_match_the_kubernetes_schemas(path: Path) -> None:
    errors = [e for doc in load_docs(path) for e in schema_errors(doc)]
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rendered_overlays_match_the_kubernetes_schemas(overlay: str) -> None:
    docs = rendered(overlay)
    assert docs, f"overlays/{overlay} renders nothing"
    errors = [e for doc in docs for e in schema_errors(doc)]
    assert not errors, f"overlays/{overlay}:\n" + "\n".join(errors)
    seen: set[tuple[str, str]] = set()
    for doc in docs:
        key = (doc["kind"], doc["metadata"]["name"])
        assert key not in seen, f"overlays/{overlay}: {key} twice"
        seen.add(key)
        if doc["kind"] != "Namespace":  # every object lands in the overlay's namespace
            assert doc["metadata"].get("namespace") == NAMESPACE, f"{overlay}: {key}"


# ============================================================================ structure


def ports_of(c: Doc) -> dict[str | int, int]:
    """A container's ports by name and by number."""
    out: dict[str | int, int] = {}
    for p in c.get("ports", []):
        out[p["containerPort"]] = p["containerPort"]
        if "name" in p:
            out[p["name"]] = p["containerPort"]
    return out


def probes(c: Doc) -> Iterator[tuple[str, str, Doc]]:
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = c.get(kind)
        if probe:
            for handler in ("httpGet", "tcpSocket", "grpc"):
                if handler in probe:
                    yield kind, handler, probe[handler]


@pytest.mark.parametrize("name", SETS)
def test_probes_and_services_name_ports_that_exist(name: str) -> None:
    docs = docs_of(name)
    for w in workloads(docs):
        for c in containers(w):
            ports = ports_of(c)
            for kind, handler, h in probes(c):
                assert h["port"] in ports, (
                    f"{w['metadata']['name']}/{c['name']} {kind}.{handler}: no port {h['port']}"
                )
    for svc in find(docs, "Service"):
        selector = svc["spec"]["selector"]
        pods = [
            w
            for w in workloads(docs)
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert pods, f"Service {svc['metadata']['name']} selects no workload"
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            for w in pods:
                assert any(target in ports_of(c) for c in containers(w)), (
                    f"Service {svc['metadata']['name']}: {w['metadata']['name']} has no "
                    f"container port {target}"
                )
    for pdb in find(docs, "PodDisruptionBudget"):
        sel = pdb["spec"]["selector"]["matchLabels"]
        assert any(
            sel.items() <= w["spec"]["template"]["metadata"]["labels"].items()
            for w in workloads(docs)
        ), f"PodDisruptionBudget {pdb['metadata']['name']} selects no workload"


def env_refs_defined(c: Doc, where: str) -> dict[str, Doc]:
    """$(VAR) in args must name an env var of the container: the kubelet leaves an unknown
    reference as it is, and the process would get the literal text."""
    env = {e["name"]: e for e in c.get("env", [])}
    for a in c.get("args", []):
        for var in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", a):
            assert var in env, f"{where}: {a!r} uses $({var}), which the container does not set"
    return env


def quantity(q: str) -> int:
    """A Kubernetes memory quantity in bytes (the binary suffixes and plain numbers)."""
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", q)
    assert m, f"unexpected quantity {q!r}"
    return int(m.group(1)) << {None: 0, "Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40}[m.group(2)]


def redis_address(docs: tuple[Doc, ...]) -> str:
    svc = one(docs, "Service", "redis")
    return f"{svc['metadata']['name']}:{svc['spec']['ports'][0]['port']}"


def url_address(url: str) -> str:
    m = re.fullmatch(r"redis://([^/:]+):(\d+)(/\d+)?", url)
    assert m, f"unexpected Redis URL {url!r}"
    return f"{m.group(1)}:{m.group(2)}"


@pytest.mark.parametrize("name", SETS)
def test_gateway(name: str) -> None:
    docs = docs_of(name)
    dep, c = the_container(docs, "gateway")
    flags = check_cli(c["args"], f"{name}: gateway")
    ports = ports_of(c)
    assert int(flags["--port"]) == ports["http"]
    assert int(flags["--grpc-port"]) == ports["grpc"]
    assert flags.get("--host") == "0.0.0.0", "the gateway must listen beyond loopback"
    # The default is one process per core of the node, not of the container.
    assert "--processes" in flags
    assert "--worker" not in flags, "workers are discovered in Redis"
    assert url_address(flags["--redis-url"]) == redis_address(docs)
    env_refs_defined(c, f"{name}: gateway")

    spec = dep["spec"]
    assert spec["replicas"] >= 2
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    pod = spec["template"]["spec"]
    assert pod["affinity"]["podAntiAffinity"], "gateways should spread over nodes"
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    # After the preStop sleep, SIGTERM: aiohttp gives in-flight requests up to 60 s.
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + 60
    pdbs = [
        p
        for p in find(docs, "PodDisruptionBudget")
        if p["spec"]["selector"]["matchLabels"].items()
        <= spec["template"]["metadata"]["labels"].items()
    ]
    assert [p["spec"].get("minAvailable") for p in pdbs] == [1]
    svc = one(docs, "Service", "gateway")
    assert {p["targetPort"] for p in svc["spec"]["ports"]} == {"http", "grpc"}


@pytest.mark.parametrize("name", SETS)
def test_worker(name: str) -> None:
    docs = docs_of(name)
    dep, c = the_container(docs, "worker")
    where = f"{name}: worker"
    flags = check_cli(c["args"], where)
    ports = ports_of(c)
    grpc_port, http_port = int(flags["--grpc-port"]), int(flags["--http-port"])
    assert (grpc_port, http_port) == (ports["grpc"], ports["http"])
    assert flags.get("--host") == "0.0.0.0", "the worker must listen beyond loopback"
    assert url_address(flags["--redis-url"]) == redis_address(docs)

    # Gateways dial what the worker advertises: the pod's IP, from the downward API.
    env = env_refs_defined(c, where)
    m = re.fullmatch(r"\$\((\w+)\):(\d+)", flags["--advertise"])
    assert m and int(m.group(2)) == grpc_port, flags["--advertise"]
    assert env[m.group(1)]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"

    # Start-up covers the model's load and warm-up; readiness is gRPC health, which turns
    # NOT_SERVING on drain; liveness is not (it would kill a draining worker).
    startup = c["startupProbe"]
    assert startup["grpc"]["port"] == grpc_port
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert c["readinessProbe"]["grpc"]["port"] == grpc_port
    assert "grpc" not in c["livenessProbe"]
    assert c["livenessProbe"]["httpGet"]["port"] in ("http", http_port)

    pod = dep["spec"]["template"]["spec"]
    drain = float(flags.get("--drain-timeout", 30))
    assert pod["terminationGracePeriodSeconds"] >= drain + 10, "the grace period cuts the drain"
    assert "replicas" not in dep["spec"], "the HPA owns the worker count"

    limits = c["resources"].get("limits", {})
    if name in ("gpu", "keda"):
        assert int(limits["nvidia.com/gpu"]) == 1
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        model = flags["--model"]
        assert any(model.startswith(p + "/") and m.get("readOnly") for p, m in mounts.items()), (
            f"{where}: --model {model} is not on a read-only volume mount"
        )
    else:
        assert "nvidia.com/gpu" not in limits
    if name == "cpu":  # on CPU the engine's memory is the pod's: the plan must fit its limit
        from worker.engine.config import parse_bytes

        assert parse_bytes(flags["--memory-budget"]) < quantity(limits["memory"])

    svc = one(docs, "Service", "worker")
    assert svc["spec"]["clusterIP"] == "None"


def claim_mounts(dep: Doc, c: Doc) -> dict[str, str]:
    """mountPath -> PersistentVolumeClaim name, for the container's read-only claim mounts."""
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in dep["spec"]["template"]["spec"].get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    return {
        m["mountPath"]: claims[m["name"]]
        for m in c.get("volumeMounts", [])
        if m["name"] in claims and m.get("readOnly")
    }


@pytest.mark.parametrize("name", ["gpu", "keda"])
def test_gateways_read_the_workers_tokenizer(name: str) -> None:
    """Exact prefix-aware routing: a gateway loads the tokenizer from the directory workers
    report (their --model), so it must see the same volume at the same path."""
    docs = docs_of(name)
    worker, wc = the_container(docs, "worker")
    gateway, gc = the_container(docs, "gateway")
    model = flag_values(wc["args"][1:])["--model"]
    (path,) = [p for p in claim_mounts(worker, wc) if model.startswith(p + "/")]
    assert claim_mounts(gateway, gc).get(path) == claim_mounts(worker, wc)[path]
    assert one(docs, "PersistentVolumeClaim", claim_mounts(worker, wc)[path])


# ============================================================================ autoscaling


def test_the_worker_exports_the_queue_metric() -> None:
    from worker.metrics import WorkerMetrics

    class Service:
        engine = None
        model_name = "m"
        in_flight = 3
        state = "SERVING"

        def queue_depth(self) -> int:
            return 3

    text = WorkerMetrics(Service()).render().decode()
    assert re.search(rf'^{re.escape(EXPORTED_METRIC)}\{{model_name="m"\}} 3\.0$', text, re.M)


def test_the_adapter_rules_rename_the_metric_for_the_hpa() -> None:
    hpa = one(base_docs(), "HorizontalPodAutoscaler", "worker")
    (metric,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    wanted = metric["pods"]["metric"]["name"]
    assert ":" not in wanted
    rules = adapter_rules()
    assert len(rules) >= 2
    for where, rule in rules:
        assert adapter_name(rule, EXPORTED_METRIC) == wanted, where
        assert rule["resources"]["overrides"]["pod"]["resource"] == "pod", where


def test_the_hpa_also_follows_the_demand_the_gateways_hold_or_shed() -> None:
    """Behind a shedding gateway the workers' queues stay short: the HPA's second metric is
    the gateways' queue plus the demand refused at the door, from the gateway's own metric
    families and the admission outcome it counts when it sheds."""
    hpa = one(base_docs(), "HorizontalPodAutoscaler", "worker")
    (metric,) = [m for m in hpa["spec"]["metrics"] if m["type"] == "External"]
    assert metric["external"]["target"]["type"] == "AverageValue"
    wanted = metric["external"]["metric"]["name"]
    rules = adapter_rules("external")
    assert len(rules) == 2
    source = (ROOT / "gateway" / "metrics.py").read_text()
    for where, rule in rules:
        assert rule["name"]["as"] == wanted, where
        assert rule["resources"]["overrides"]["namespace"]["resource"] == "namespace", where
        query = rule["metricsQuery"]
        assert query.count("<<.LabelMatchers>>") == 5, where
        families = set(re.findall(r"\b(breakwater_[a-z_]+?)(?:_total|_sum|_count)?\{", query))
        assert families == {
            "breakwater_queue_depth",
            "breakwater_admission",
            "breakwater_connections_refused",  # shed at --max-connections, before admission
            "breakwater_request_duration_seconds",
        }, where
        assert all(f'"{f}"' in source for f in families), where
        assert 'outcome="overloaded"' in query, where
    assert '"overloaded"' in (ROOT / "gateway" / "admission" / "admission.py").read_text()


def check_behavior(behavior: Doc, where: str) -> None:
    """Up fast (no stabilization, at least doubling per minute), down slow (5+ minutes of
    stabilization, then at most one pod per minute)."""
    up, down = behavior["scaleUp"], behavior["scaleDown"]
    assert up["stabilizationWindowSeconds"] == 0, where
    assert down["stabilizationWindowSeconds"] >= 300, where

    def per_minute(rules: Doc, kind: str) -> float:
        rates = [
            p["value"] * 60 / p["periodSeconds"] for p in rules["policies"] if p["type"] == kind
        ]
        pick = max if rules.get("selectPolicy", "Max") == "Max" else min
        return pick(rates) if rates else 0.0

    assert per_minute(up, "Percent") >= 100 or per_minute(up, "Pods") >= 2, where
    assert down.get("selectPolicy") == "Min" or len(down["policies"]) == 1, where
    assert all(p["type"] == "Pods" for p in down["policies"]), where
    assert per_minute(down, "Pods") <= 1, where


@pytest.mark.parametrize("name", ["base", "cpu", "gpu"])
def test_hpa_scales_the_worker_on_its_queue(name: str) -> None:
    docs = docs_of(name)
    hpa = one(docs, "HorizontalPodAutoscaler", "worker")
    ref = hpa["spec"]["scaleTargetRef"]
    assert (ref["apiVersion"], ref["kind"]) == ("apps/v1", "Deployment")
    the_container(docs, ref["name"])  # a Deployment running `breakwater worker`
    assert ref["name"] == "worker"
    assert 1 <= hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    check_behavior(hpa["spec"]["behavior"], f"{name}: HPA")


def test_keda_replaces_the_hpa() -> None:
    docs = rendered("keda")
    assert not find(docs, "HorizontalPodAutoscaler"), "KEDA owns the HPA: the base's must go"
    so = one(docs, "ScaledObject", "worker")
    spec = so["spec"]
    assert spec["scaleTargetRef"]["name"] == "worker"
    the_container(docs, spec["scaleTargetRef"]["name"])
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    query = trigger["metadata"]["query"]
    assert EXPORTED_METRIC in query and f'namespace="{NAMESPACE}"' in query
    float(trigger["metadata"]["threshold"])
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    check_behavior(spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"], "keda")


def test_pod_monitor_scrapes_the_metrics_port() -> None:
    (pm,) = load_docs(K8S / "monitoring" / "podmonitor.yaml")
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    selector = pm["spec"]["selector"]["matchLabels"]
    for name in ("gateway", "worker"):
        dep, c = the_container(base_docs(), name)
        assert selector.items() <= dep["spec"]["template"]["metadata"]["labels"].items()
        assert endpoint["port"] in ports_of(c)
        ann = dep["spec"]["template"]["metadata"]["annotations"]
        assert int(ann["prometheus.io/port"]) == ports_of(c)[endpoint["port"]]
        assert ann["prometheus.io/path"] == endpoint["path"] == "/metrics"


# ============================================================================ compose


@functools.cache
def compose() -> Doc:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def compose_healthcheck_url(service: Doc) -> str:
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"
    (url,) = re.findall(r"http://127\.0\.0\.1:\d+/\w+", " ".join(test))
    return url


def test_compose_file() -> None:
    services = compose()["services"]
    assert set(services) == {"redis", "gateway", "worker"}
    for name, s in services.items():
        assert "healthcheck" in s, f"compose: {name} has no healthcheck"
    for name in ("gateway", "worker"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()

    gw = services["gateway"]
    flags = check_cli(gw["command"], "compose: gateway")
    assert flags["--host"] == "0.0.0.0" and "--processes" in flags
    assert url_address(flags["--redis-url"]) == "redis:6379"
    assert compose_healthcheck_url(gw) == f"http://127.0.0.1:{flags['--port']}/readyz"
    assert f"{flags['--port']}:{flags['--port']}" in gw["ports"]

    w = services["worker"]
    # The entrypoint adds --advertise (each replica's own IP) to the command's flags.
    sh, dash_c, script, _name = w["entrypoint"]
    assert (sh, dash_c) == ("sh", "-c")
    script = script.replace("$$", "$")  # compose's escape for a literal $
    assert script.startswith('exec breakwater "$@" ')
    advertise = re.findall(r"--[a-z-]+", script)
    assert advertise == ["--advertise"]
    flags = check_cli(w["command"], "compose: worker")
    check_cli([*w["command"], "--advertise=10.0.0.1:50051"], "compose: worker + entrypoint")
    assert script.endswith(f':{flags["--grpc-port"]}"')
    assert flags["--host"] == "0.0.0.0"
    assert url_address(flags["--redis-url"]) == "redis:6379"
    assert compose_healthcheck_url(w) == f"http://127.0.0.1:{flags['--http-port']}/health"
    assert w["deploy"]["replicas"] >= 2
    grace = re.fullmatch(r"(\d+)s", w["stop_grace_period"])
    assert grace and int(grace.group(1)) >= float(flags["--drain-timeout"]) + 10
    for name in ("gateway", "worker"):
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"


# ============================================================================ images


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles(dockerfile: str) -> None:
    text = (DEPLOY / "docker" / dockerfile).read_text()
    assert re.search(r'^ENTRYPOINT \["breakwater"\]$', text, re.M), "exec-form entry point"
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and not user[-1].startswith(("0", "root")), "the image must not run as root"
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    for name in ("gateway", "worker"):
        _, c = the_container(base_docs(), name)
        assert set(ports_of(c).values()) <= exposed
    # The worker compiles its CPU kernel from C source at run time: the image must have it,
    # from the wheel (package data) or copied in.
    assert (ROOT / "worker" / "engine" / "kernels" / "paged_decode.c").is_file()
    pyproject = (ROOT / "pyproject.toml").read_text()
    # --trace-exporter otlp in the image: its exporter is an extra the image installs
    assert re.search(r"^otlp = \[", pyproject, re.M) and re.search(r"\.\[[a-z,]*otlp", text)
    assert "paged_decode.c" in text or re.search(
        r'"worker\.engine\.kernels" = \[.*"\*\.c"', pyproject
    )


def promql_problem(query: str) -> str | None:
    """What makes `query` fail to parse by its brackets, or None: an unmatched or
    mismatched (, [ or { outside quoted strings. A `)` too many in the demand queries made
    prometheus-adapter's external metric and KEDA's only trigger fail, silently to the
    HPA, which then never scaled on the gateways' demand."""
    pairs, stack, quote = {")": "(", "]": "[", "}": "{"}, [], None
    for i, c in enumerate(query):
        if quote:
            quote = None if c == quote and query[i - 1] != "\\" else quote
        elif c in "\"'`":
            quote = c
        elif c in "([{":
            stack.append((c, i))
        elif c in pairs:
            if not stack or stack[-1][0] != pairs[c]:
                return f"unmatched {c!r} at {i}: ...{query[max(0, i - 40) : i + 1]}"
            stack.pop()
    return f"unclosed {stack[-1][0]!r} at {stack[-1][1]}" if stack else None


def test_every_promql_query_in_the_manifests_is_well_formed() -> None:
    queries = [(w, r["metricsQuery"]) for k in ("custom", "external") for w, r in adapter_rules(k)]
    (trigger,) = one(rendered("keda"), "ScaledObject", "worker")["spec"]["triggers"]
    queries.append(("keda", trigger["metadata"]["query"]))
    assert len(queries) >= 5
    for where, query in queries:
        assert promql_problem(query) is None, (where, promql_problem(query))
    assert promql_problem("sum(a) + ((b) or vector(0)))") is not None  # the bug it catches
