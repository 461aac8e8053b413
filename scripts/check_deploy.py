#!/usr/bin/env python3
"""Consistency of the deployment files with the binaries they run (called by validate-deploy.sh).

Checks, and reports every failure (exit 1 if any):
- every cropfleet container in the compose configurations and the Kubernetes manifests runs a
  binary (and subcommand) that exists, and passes only flags and CROPFLEET_* environment
  variables that binary accepts (from its --help), plus the Google emulator / Rust variables;
  ConfigMaps, Secrets and keys it reads exist;
- the worker's port and health paths (from its --help, and asked live) match the compose
  healthcheck, the container ports, the probes, the Service and the metrics annotations; the
  grace periods exceed its shutdown timeout;
- KEDA ScaledObjects / TriggerAuthentications validate against the cloudcoil-models-keda
  pydantic models with no unknown field, point at objects that exist, use the rabbitmq
  QueueLength / gcp-pubsub SubscriptionSize scalers on the queue the workers consume, and have
  a scale-down stabilization window; plain HPAs too;
- the Dockerfile is multi-stage, ships the three binaries, runs as a non-root user and exposes
  the worker's port;
- no password literal in a Deployment, Job (any pod template), ConfigMap or compose service
  (the raw docker-compose.yml, before interpolation): a URI's password and a *PASSWORD* /
  *SECRET* / *TOKEN* variable must be a variable reference (`${VAR}`, `${VAR:-}`) or come from
  a Secret; env files and the in-cluster demo overlay's secretGenerator may hold demo values;
- the TLS files an amqps:// URI names (cacertfile, certfile, keyfile) lie in a read-only
  Secret/ConfigMap/bind mount of every container that gets that URI. Secrets the user creates
  (an overlay's NAME.env.example, ${VAR} placeholders) stand in for the real ones.

Usage: check_deploy.py --bin-dir DIR --dockerfile Dockerfile --compose NAME=config.json ...
                       --k8s NAME=manifests.yaml ... --compose-file docker-compose.yml
                       --user-secret OVERLAY:SECRET=FILE.env.example ...
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

BINARIES = ("cropfleet-worker", "cropfleet-producer", "cropfleet-aggregator")
# Variables the binaries (or the libraries they use) read besides CROPFLEET_<FLAG>.
OTHER_ENV = {
    "PUBSUB_EMULATOR_HOST",
    "STORAGE_EMULATOR_HOST",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "RUST_LOG",
    "RUST_BACKTRACE",
}
HEALTH = "/healthz"
READY = "/readyz"
MIN_STABILIZATION_S = 60

errors: list[str] = []
checked: list[str] = []


def err(where: str, msg: str) -> None:
    errors.append(f"{where}: {msg}")


# ---------------------------------------------------------------- the binaries' interface
class Cli:
    """Flags and environment variables of one binary (and subcommand), from --help."""

    def __init__(self, text: str):
        self.text = text
        self.flags: set[str] = set()
        self.env: set[str] = set()
        self.defaults: dict[str, str] = {}
        self.subcommands: set[str] = set()
        section, last = None, None
        for line in text.splitlines():
            if re.match(r"^\S.*:$", line):
                section, last = line.rstrip(":"), None
                continue
            if section == "Commands":
                m = re.match(r"^\s{2}(\S+)", line)
                if m and m.group(1) != "help":
                    self.subcommands.add(m.group(1))
            m = re.match(r"^\s+(?:-\w, )?--([a-z0-9][a-z0-9-]*)", line)
            if m:
                last = m.group(1)
                self.flags.add(last)
            # The default is on the flag's line (short help) or its description lines (long help).
            d = re.search(r"\[default: ([^\]]+)\]", line)
            if d and last and last not in self.defaults:
                self.defaults[last] = d.group(1)
        self.env = set(re.findall(r"\[env: ([A-Z0-9_]+)=", text))


def load_clis(bin_dir: str) -> dict[tuple[str, str | None], Cli]:
    clis: dict[tuple[str, str | None], Cli] = {}
    for b in BINARIES:
        path = os.path.join(bin_dir, b)
        if not os.access(path, os.X_OK):
            err("binaries", f"{path} missing; build the workspace first")
            continue
        top = Cli(help_text([path, "--help"]))
        clis[(b, None)] = top
        for sub in sorted(top.subcommands):
            clis[(b, sub)] = Cli(help_text([path, sub, "--help"]))
    return clis


def help_text(argv: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CROPFLEET_")}
    env["COLUMNS"] = "400"
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
    if out.returncode != 0:
        err("binaries", f"{' '.join(argv)} failed: {out.stderr.strip()}")
    return out.stdout


def worker_port_and_paths(clis, bin_dir: str) -> tuple[int, int]:
    """The worker's default health port and shutdown timeout, from --help; health paths asked live."""
    w = clis.get(("cropfleet-worker", None))
    if w is None:
        return 9090, 25
    addr = w.defaults.get("http-addr", "")
    port = int(addr.rsplit(":", 1)[1]) if ":" in addr else 0
    if port != 9090:
        err("cropfleet-worker --help", f"default --http-addr is {addr!r}, the deployment files expect port 9090")
    for path in (HEALTH, READY):
        if path not in w.text:
            err("cropfleet-worker --help", f"does not mention {path}")
    shutdown = float(w.defaults.get("shutdown-timeout", "25"))
    probe_worker_live(bin_dir)
    return port or 9090, int(shutdown)


def probe_worker_live(bin_dir: str) -> None:
    """Start a worker on a scratch spool queue and ask its /healthz and /readyz."""
    with tempfile.TemporaryDirectory() as d:
        tasks, results = f"spool:{d}/tasks", f"spool:{d}/results"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CROPFLEET_")}
        subprocess.run([os.path.join(bin_dir, "cropfleet-producer"), "setup", "--queue", tasks, "--results", results],
                       check=False, capture_output=True, env=env, timeout=30)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log = open(os.path.join(d, "worker.log"), "w")
        p = subprocess.Popen([os.path.join(bin_dir, "cropfleet-worker"), "--queue", tasks, "--results", results,
                              "--threads", "1", "--http-addr", f"127.0.0.1:{port}", "--log-format", "text"],
                             stdout=log, stderr=log, env=env)
        try:
            for path in (HEALTH, READY):
                status = None
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    try:
                        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                            status = r.status
                    except urllib.error.HTTPError as e:
                        status = e.code
                    except OSError:
                        status = None
                    if status == 200 or p.poll() is not None:
                        break
                    time.sleep(0.1)
                if status != 200:
                    err("cropfleet-worker (live)", f"GET {path} answered {status}; log: {open(log.name).read()[-500:]}")
            checked.append(f"worker answered 200 on {HEALTH} and {READY} (live, port {port})")
        finally:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
            log.close()


# ---------------------------------------------------------------- invocations
def check_invocation(where: str, argv: list[str], env_names: set[str], clis, image: str = "") -> tuple[str, str | None] | None:
    """Check one container's command line and environment against the binary it runs."""
    if not argv:
        if "cropfleet" in image:
            err(where, "no command: say which cropfleet binary runs")
        return None
    binary = os.path.basename(argv[0])
    if binary not in BINARIES:
        return None
    rest = argv[1:]
    top = clis.get((binary, None))
    if top is None:
        return None
    sub = None
    if rest and not rest[0].startswith("-"):
        if rest[0] not in top.subcommands:
            err(where, f"{binary} has no subcommand {rest[0]!r} (it has {sorted(top.subcommands)})")
            return None
        sub, rest = rest[0], rest[1:]
    elif binary == "cropfleet-aggregator":
        err(where, f"{binary} needs a subcommand ({sorted(top.subcommands)})")
        return None
    cli = clis[(binary, sub)]
    for a in rest:
        if a.startswith("--"):
            flag = a[2:].split("=", 1)[0]
            if flag not in cli.flags:
                err(where, f"{binary}{' ' + sub if sub else ''} does not accept --{flag}")
    for name in sorted(env_names):
        if name.startswith("CROPFLEET_"):
            if name not in cli.env:
                err(where, f"{binary}{' ' + sub if sub else ''} does not read {name}")
        elif name not in OTHER_ENV:
            err(where, f"{name} is passed to {binary}, which does not read it")
    return binary, sub


# ---------------------------------------------------------------- compose
def duration_s(v) -> float:
    if isinstance(v, (int, float)):
        return v / 1e9 if v > 1e6 else float(v)  # compose JSON gives nanoseconds
    total, units = 0.0, {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    for num, unit in re.findall(r"([\d.]+)(ms|us|h|m|s)", str(v)):
        total += float(num) * units[unit]
    return total


def check_compose(name: str, cfg: dict, clis, port: int, shutdown: int) -> None:
    services = cfg.get("services", {})
    where0 = f"compose[{name}]"
    workers = 0
    for svc, s in services.items():
        where = f"{where0} service {svc}"
        for dep, d in (s.get("depends_on") or {}).items():
            cond = d.get("condition")
            if dep in services and cond == "service_healthy" and not services[dep].get("healthcheck"):
                err(where, f"waits for {dep} to be healthy, but {dep} has no healthcheck")
        argv = list(s.get("entrypoint") or []) + list(s.get("command") or [])
        env = set((s.get("environment") or {}).keys())
        ran = check_invocation(where, argv, env, clis, "cropfleet" if "build" in s else str(s.get("image", "")))
        if ran is None:
            continue
        if "build" not in s and not str(s.get("image", "")).startswith("cropfleet"):
            err(where, f"runs {ran[0]} from image {s.get('image')!r}, not the one built from the Dockerfile")
        user = str(s.get("user", ""))
        if user.split(":")[0] in ("0", "root"):
            err(where, "runs a cropfleet binary as root")
        mounts = {
            str(v.get("target")): (bool(v.get("read_only")), None)
            for v in s.get("volumes") or []
            if isinstance(v, dict) and v.get("target")
        }
        check_tls_paths(where, {k: str(v) for k, v in (s.get("environment") or {}).items()}, mounts)
        if ran == ("cropfleet-worker", None):
            workers += 1
            wenv = s.get("environment") or {}
            p = int(str(wenv.get("CROPFLEET_HTTP_ADDR", f"0.0.0.0:{port}")).rsplit(":", 1)[1])
            if p != port:
                err(where, f"CROPFLEET_HTTP_ADDR listens on {p}, the worker's port is {port}")
            expose = {str(e).split("/")[0] for e in s.get("expose") or []}
            if str(port) not in expose:
                err(where, f"does not expose {port}")
            if s.get("container_name") or s.get("ports"):
                err(where, "has a container_name or host ports, so it cannot be scaled")
            test = " ".join(map(str, (s.get("healthcheck") or {}).get("test") or []))
            if not (re.search(rf"[:/]{port}\b", test) and HEALTH in test):
                err(where, f"healthcheck does not ask :{port}{HEALTH}: {test!r}")
            sd = float(wenv.get("CROPFLEET_SHUTDOWN_TIMEOUT", shutdown))
            grace = duration_s(s.get("stop_grace_period", "10s"))
            if grace <= sd:
                err(where, f"stop_grace_period {grace:.0f}s is not above the worker's shutdown timeout {sd:.0f}s")
    if workers != 1:
        err(where0, f"expected exactly one scalable worker service, found {workers}")
    for broker, test_word in (("rabbitmq", "rabbitmq-diagnostics"),):
        if broker in services:
            t = " ".join(map(str, (services[broker].get("healthcheck") or {}).get("test") or []))
            if test_word not in t or "ping" not in t:
                err(f"{where0} service {broker}", f"healthcheck should be `rabbitmq-diagnostics -q ping`, is {t!r}")
    checked.append(f"compose[{name}]: {len(services)} services")


# ---------------------------------------------------------------- credentials
SECRET_NAME = re.compile(r"PASS|SECRET|TOKEN|CREDENTIAL", re.I)
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?msg}; innermost first (no braces inside).
VAR_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^${}]*))?\}")
# Kubernetes' $(NAME) and a bare $NAME.
K8S_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)|\$([A-Za-z_][A-Za-z0-9_]*)")
URI_USERINFO = re.compile(r"\b[a-z][a-z0-9+.-]*://([^/@\s?#]*)@", re.I)
VAR = "\x00"  # what a variable reference becomes: not a literal


def literal_secret(name: str, value: str) -> str | None:
    """Why `value` (of variable or argument `name`) holds a password literal, or None."""
    v = str(value)
    for _ in range(10):  # innermost references first, so nested defaults are seen too
        m = VAR_REF.search(v)
        if not m:
            break
        var, op, default = m.group(1), m.group(2), m.group(3) or ""
        if SECRET_NAME.search(var) and op in (":-", "-") and default:
            return f"${{{var}}} defaults to a literal"
        v = v[: m.start()] + (default if op in (":-", "-") and default else VAR) + v[m.end() :]
    v = K8S_REF.sub(VAR, v)
    for m in URI_USERINFO.finditer(v):
        userinfo = m.group(1)
        if ":" in userinfo:
            pw = userinfo.split(":", 1)[1]
            if pw.strip(VAR):
                return "a URI carries a password"
    if name and SECRET_NAME.search(name) and v.strip(VAR):
        return f"{name} is set to a literal"
    return None


def check_no_literal_secrets(where: str, env, argv) -> None:
    items = env.items() if isinstance(env, dict) else (str(e).partition("=")[::2] for e in env or [])
    for k, v in items:
        if v is not None and (why := literal_secret(k, v)):
            err(where, f"{why} ({k}); read it from a Secret or a variable")
    for a in argv or []:
        if why := literal_secret("", a):
            err(where, f"{why} in its arguments; read it from a Secret or a variable")


def check_compose_file(path: str) -> None:
    raw = yaml.safe_load(open(path))
    n = 0
    for svc, s in (raw.get("services") or {}).items():
        n += 1
        argv = [str(x) for x in (s.get("entrypoint") or []) + (s.get("command") or []) if not isinstance(s.get("command"), str)]
        check_no_literal_secrets(f"{path} service {svc}", s.get("environment") or {}, argv)
    checked.append(f"{path}: no password literal in {n} services")


def tls_files(uri: str) -> list[str]:
    """The files an amqps:// URI names (cacertfile, certfile, keyfile)."""
    if not str(uri).startswith("amqps://"):
        return []
    q = urllib.parse.parse_qs(urllib.parse.urlsplit(str(uri)).query)
    return [urllib.parse.unquote(v[0]) for k, v in q.items() if k in ("cacertfile", "certfile", "keyfile")]


def check_tls_paths(where: str, env: dict, mounts: dict[str, tuple[bool, set[str] | None]]) -> None:
    """Every TLS file of the URIs in `env` lies in a read-only mount: `mounts` maps a mount path
    to (read-only, the file names it holds or None when unknown)."""
    for var, uri in env.items():
        for f in tls_files(uri):
            hit = [(m, ro, names) for m, (ro, names) in mounts.items() if f.startswith(m.rstrip("/") + "/")]
            if not hit:
                err(where, f"{var} names {f}, but nothing is mounted there (mounts: {sorted(mounts) or 'none'})")
                continue
            m, ro, names = max(hit, key=lambda h: len(h[0]))
            rel = f[len(m.rstrip("/")) + 1 :]
            if not ro:
                err(where, f"{var}: {m} (holding {f}) is not mounted read-only")
            if names is not None and rel not in names:
                err(where, f"{var} names {f}, but the volume at {m} holds {sorted(names)}")

# ---------------------------------------------------------------- kubernetes
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "ReplicaSet"}


def pod_spec(doc: dict) -> dict | None:
    k = doc.get("kind")
    if k in POD_KINDS:
        return doc["spec"]["template"]["spec"]
    if k == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    if k == "Pod":
        return doc["spec"]
    return None


def data_keys(doc: dict) -> set[str]:
    return set((doc.get("data") or {}).keys()) | set((doc.get("stringData") or {}).keys())


def secret_value(doc: dict, key: str) -> str | None:
    import base64

    if key in (doc.get("stringData") or {}):
        return doc["stringData"][key]
    if key in (doc.get("data") or {}):
        return base64.b64decode(doc["data"][key]).decode() if doc["kind"] == "Secret" else doc["data"][key]
    return None


def check_k8s(name: str, docs: list[dict], clis, port: int, shutdown: int) -> None:
    where0 = f"k8s[{name}]"
    by_kind: dict[str, dict[str, dict]] = {}
    for d in docs:
        by_kind.setdefault(d.get("kind", "?"), {})[d["metadata"]["name"]] = d
    cms, secrets = by_kind.get("ConfigMap", {}), by_kind.get("Secret", {})
    worker_queue: str | None = None
    worker_deploys = []
    for d in docs:
        spec = pod_spec(d)
        if spec is None:
            continue
        obj = f"{where0} {d['kind']}/{d['metadata']['name']}"
        for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
            where = f"{obj} container {c['name']}"
            env_names: set[str] = set()
            resolved: dict[str, str] = {}
            for e in c.get("env") or []:
                env_names.add(e["name"])
                if "value" in e:
                    resolved[e["name"]] = str(e["value"])
                ref = (e.get("valueFrom") or {})
                for kind, store in (("secretKeyRef", secrets), ("configMapKeyRef", cms)):
                    r = ref.get(kind)
                    if r:
                        o = store.get(r["name"])
                        if o is None:
                            if not r.get("optional"):
                                err(where, f"{e['name']} reads {kind} {r['name']}, which the overlay does not define")
                        elif r["key"] not in data_keys(o):
                            err(where, f"{e['name']} reads key {r['key']!r} of {r['name']}, which has {sorted(data_keys(o))}")
                        else:
                            resolved[e["name"]] = secret_value(o, r["key"]) or ""
            for ef in c.get("envFrom") or []:
                for kind, store in (("configMapRef", cms), ("secretRef", secrets)):
                    r = ef.get(kind)
                    if r:
                        o = store.get(r["name"])
                        if o is None:
                            if not r.get("optional"):
                                err(where, f"envFrom {kind} {r['name']} is not defined")
                            continue
                        for key in data_keys(o):
                            env_names.add(ef.get("prefix", "") + key)
                            resolved[ef.get("prefix", "") + key] = secret_value(o, key) or ""
            argv = list(c.get("command") or []) + list(c.get("args") or [])
            check_no_literal_secrets(where, {e["name"]: e["value"] for e in c.get("env") or [] if "value" in e}, argv)
            ran = check_invocation(where, argv, env_names, clis, str(c.get("image", "")))
            if ran is None:
                continue
            volumes = {v["name"]: v for v in spec.get("volumes") or []}
            mounts: dict[str, tuple[bool, set[str] | None]] = {}
            for vm in c.get("volumeMounts") or []:
                v = volumes.get(vm["name"], {})
                src = v.get("secret") or v.get("configMap")
                names = None
                if src is not None:
                    store = secrets if "secret" in v else cms
                    o = store.get(src.get("secretName") or src.get("name"))
                    if src.get("items"):
                        names = {i["path"] for i in src["items"]}
                    elif o is not None:
                        names = data_keys(o)
                ro = src is not None or bool(vm.get("readOnly"))
                mounts[vm["mountPath"]] = (ro, names)
            check_tls_paths(where, resolved, mounts)
            sc = {**(spec.get("securityContext") or {}), **(c.get("securityContext") or {})}
            if not sc.get("runAsNonRoot") or sc.get("runAsUser", 1) == 0:
                err(where, "cropfleet containers must run as non-root (runAsNonRoot, runAsUser != 0)")
            if not (c.get("resources") or {}).get("requests"):
                err(where, "has no resource requests")
            if ran == ("cropfleet-worker", None):
                worker_deploys.append(d)
                worker_queue = resolved.get("CROPFLEET_QUEUE", worker_queue)
                check_worker_container(where, d, spec, c, resolved, port, shutdown)
    for svc in by_kind.get("Service", {}).values():
        sel = svc["spec"].get("selector") or {}
        for w in worker_deploys:
            labels = w["spec"]["template"]["metadata"].get("labels") or {}
            if sel and all(labels.get(k) == v for k, v in sel.items()):
                c = next(c for c in pod_spec(w)["containers"] if os.path.basename((c.get("command") or [""])[0]) == "cropfleet-worker")
                for p in svc["spec"].get("ports") or []:
                    if container_port(c, p.get("targetPort", p["port"])) != port:
                        err(f"{where0} Service/{svc['metadata']['name']}", f"port {p.get('name')} does not reach the worker's {port}")
    for cm in cms.values():
        check_no_literal_secrets(f"{where0} ConfigMap/{cm['metadata']['name']}", cm.get("data") or {}, [])
    check_autoscaling(where0, by_kind, worker_queue)
    checked.append(f"k8s[{name}]: {len(docs)} objects")


def container_port(c: dict, ref) -> int | None:
    if isinstance(ref, int) or str(ref).isdigit():
        return int(ref)
    for p in c.get("ports") or []:
        if p.get("name") == ref:
            return int(p["containerPort"])
    return None


def check_worker_container(where, d, spec, c, env, port, shutdown) -> None:
    addr = env.get("CROPFLEET_HTTP_ADDR", f"0.0.0.0:{port}")
    listen = int(addr.rsplit(":", 1)[1])
    if listen != port:
        err(where, f"CROPFLEET_HTTP_ADDR listens on {listen}, not the worker's {port}")
    if port not in [int(p["containerPort"]) for p in c.get("ports") or []]:
        err(where, f"declares no containerPort {port}")
    for probe, want in (("livenessProbe", HEALTH), ("readinessProbe", READY), ("startupProbe", None)):
        pr = c.get(probe)
        if pr is None:
            if want:
                err(where, f"has no {probe}")
            continue
        hg = pr.get("httpGet")
        if not hg:
            err(where, f"{probe} is not an httpGet on the worker's health endpoint")
            continue
        if (want and hg.get("path") != want) or (not want and hg.get("path") not in (HEALTH, READY)):
            err(where, f"{probe} asks {hg.get('path')!r}, the worker serves {want or HEALTH + ' and ' + READY}")
        if container_port(c, hg.get("port")) != port:
            err(where, f"{probe} asks port {hg.get('port')!r}, not the worker's {port}")
    ann = d["spec"]["template"]["metadata"].get("annotations") or {}
    if "prometheus.io/port" in ann and int(ann["prometheus.io/port"]) != port:
        err(where, f"prometheus.io/port {ann['prometheus.io/port']} is not the worker's {port}")
    sd = float(env.get("CROPFLEET_SHUTDOWN_TIMEOUT", shutdown))
    pre = 0.0
    cmd = (((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or []
    m = re.search(r"sleep\s+(\d+)", " ".join(cmd))
    if m:
        pre = float(m.group(1))
    grace = spec.get("terminationGracePeriodSeconds", 30)
    if grace <= sd + pre:
        err(where, f"terminationGracePeriodSeconds {grace} is not above the shutdown timeout {sd:.0f}s (+ preStop {pre:.0f}s)")
    res = c.get("resources") or {}
    if not res.get("limits", {}).get("memory"):
        err(where, "has no memory limit")


def strict_model_check(where: str, model_cls, doc: dict) -> None:
    """Validate with the pydantic model and reject fields the model does not know."""
    try:
        obj = model_cls.model_validate(doc)
    except Exception as e:  # pydantic.ValidationError
        err(where, f"invalid: {e}")
        return
    dumped = obj.model_dump(by_alias=True, exclude_unset=True, mode="json")

    def walk(a, b, path):
        if isinstance(a, dict):
            if not isinstance(b, dict):
                return
            for k, v in a.items():
                if k not in b:
                    err(where, f"unknown field {path}{k}")
                else:
                    walk(v, b[k], f"{path}{k}.")
        elif isinstance(a, list) and isinstance(b, list):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}{i}.")

    walk(doc, dumped, "")


def stabilization(behavior: dict | None) -> int | None:
    return ((behavior or {}).get("scaleDown") or {}).get("stabilizationWindowSeconds")


def check_autoscaling(where0: str, by_kind: dict, worker_queue: str | None) -> None:
    from cloudcoil.models.keda.v1alpha1 import ScaledObject, TriggerAuthentication

    deployments = by_kind.get("Deployment", {})
    auths = by_kind.get("TriggerAuthentication", {})
    secrets = by_kind.get("Secret", {})
    targets: dict[str, str] = {}
    for n, ta in auths.items():
        where = f"{where0} TriggerAuthentication/{n}"
        strict_model_check(where, TriggerAuthentication, ta)
        for ref in ta.get("spec", {}).get("secretTargetRef") or []:
            s = secrets.get(ref.get("name"))
            if s is None:
                err(where, f"secretTargetRef names Secret {ref.get('name')!r}, which the overlay does not define")
            elif ref.get("key") not in data_keys(s):
                err(where, f"secretTargetRef key {ref.get('key')!r} is not in Secret {ref.get('name')}")
    for n, so in by_kind.get("ScaledObject", {}).items():
        where = f"{where0} ScaledObject/{n}"
        strict_model_check(where, ScaledObject, so)
        spec = so.get("spec", {})
        target = spec.get("scaleTargetRef", {}).get("name")
        if target not in deployments:
            err(where, f"scaleTargetRef {target!r} is not a Deployment of the overlay")
        targets[target] = where
        win = stabilization(((spec.get("advanced") or {}).get("horizontalPodAutoscalerConfig") or {}).get("behavior"))
        if win is None or win < MIN_STABILIZATION_S:
            err(where, f"needs a scale-down stabilizationWindowSeconds of at least {MIN_STABILIZATION_S}, has {win}")
        for t in spec.get("triggers") or []:
            md = t.get("metadata") or {}
            auth = (t.get("authenticationRef") or {}).get("name")
            if auth and auth not in auths:
                err(where, f"authenticationRef {auth!r} is not a TriggerAuthentication of the overlay")
            try:
                float(md.get("value", "x"))
            except ValueError:
                err(where, f"trigger {t.get('type')} needs a numeric metadata.value, has {md.get('value')!r}")
            if t.get("type") == "rabbitmq":
                if md.get("mode") != "QueueLength":
                    err(where, f"rabbitmq trigger mode is {md.get('mode')!r}, expected QueueLength")
                if worker_queue and worker_queue.startswith("amqp"):
                    q = urllib.parse.parse_qs(urllib.parse.urlsplit(worker_queue).query).get("queue", [None])[0]
                    if md.get("queueName") != q:
                        err(where, f"watches queue {md.get('queueName')!r}, the workers consume {q!r}")
            elif t.get("type") == "gcp-pubsub":
                if md.get("mode") != "SubscriptionSize":
                    err(where, f"gcp-pubsub trigger mode is {md.get('mode')!r}, expected SubscriptionSize")
                if worker_queue and worker_queue.startswith("pubsub://"):
                    project, _, topic = worker_queue[len("pubsub://"):].partition("/")
                    sub = md.get("subscriptionName", "")
                    want = f"{topic}-workers"
                    if sub not in (want, f"projects/{project}/subscriptions/{want}"):
                        err(where, f"watches subscription {sub!r}, the workers pull {want!r} of project {project}")
            else:
                err(where, f"unexpected trigger type {t.get('type')!r}")
    for n, hpa in by_kind.get("HorizontalPodAutoscaler", {}).items():
        where = f"{where0} HorizontalPodAutoscaler/{n}"
        target = hpa["spec"]["scaleTargetRef"]["name"]
        if target not in deployments:
            err(where, f"scaleTargetRef {target!r} is not a Deployment of the overlay")
        if target in targets:
            err(where, f"{target} is also scaled by {targets[target]}: KEDA and a plain HPA would fight")
        win = stabilization(hpa["spec"].get("behavior"))
        if win is None or win < MIN_STABILIZATION_S:
            err(where, f"needs a scale-down stabilizationWindowSeconds of at least {MIN_STABILIZATION_S}, has {win}")


# ---------------------------------------------------------------- Dockerfile
def check_dockerfile(path: str, port: int) -> None:
    text = open(path).read()
    lines = [ln for ln in re.sub(r"\\\n", " ", text).splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    stages, cur = [], None
    for ln in lines:
        word, _, rest = ln.strip().partition(" ")
        word = word.upper()
        if word == "FROM":
            cur = {"from": rest, "lines": []}
            stages.append(cur)
        elif cur is not None:
            cur["lines"].append((word, rest))
    if len(stages) < 2:
        err(path, "is not a multi-stage build")
        return
    final = stages[-1]
    users = [r for w, r in final["lines"] if w == "USER"]
    if not users or users[-1].split(":")[0] in ("0", "root"):
        err(path, "the runtime stage does not switch to a non-root USER")
    runs = " ".join(r for w, r in final["lines"] if w == "RUN")
    for tool in ("cargo", "rustc", "cmake", "nasm", "gcc", "g++", "build-essential"):
        if re.search(rf"(?<![\w-]){re.escape(tool)}(?![\w-])", runs):
            err(path, f"the runtime stage installs or runs {tool}")
    if re.search(r"^rust", final["from"]):
        err(path, "the runtime stage is based on a Rust image")
    for b in BINARIES:
        if b not in text:
            err(path, f"does not ship {b}")
    if not any(w == "COPY" and "--from=" in r for w, r in final["lines"]):
        err(path, "the runtime stage copies nothing from the build stage")
    exposed = " ".join(r for w, r in final["lines"] if w == "EXPOSE")
    if str(port) not in exposed.split():
        err(path, f"does not EXPOSE the worker's port {port}")
    checked.append(f"{path}: {len(stages)} stages, non-root runtime")


def check_dockerfile_layers(path: str) -> None:
    """The dependency layer: every workspace member's manifest is copied, and the stub step
    creates every target file those manifests declare (cargo refuses to read them otherwise)."""
    import shutil
    import tomllib

    text = open(path).read()
    root = os.path.dirname(os.path.abspath(path))
    ws = tomllib.load(open(os.path.join(root, "Cargo.toml"), "rb"))
    members = ws.get("workspace", {}).get("members", [])
    for m in members:
        if not re.search(rf"^COPY {re.escape(m)}/Cargo.toml ", text, re.M):
            err(path, f"the dependency layer does not copy {m}/Cargo.toml")
        if not re.search(rf"^COPY {re.escape(m)}/ ", text, re.M):
            err(path, f"does not copy the sources of workspace member {m}")
    m = re.search(r"^RUN (mkdir -p [^\n]*?(?:\\\n[^\n]*?)*?) \\\n && cargo build", text, re.M)
    if not m:
        err(path, "no stub step (RUN mkdir … && cargo build) found in the dependency layer")
        return
    with tempfile.TemporaryDirectory() as d:
        shutil.copy(os.path.join(root, "Cargo.toml"), d)
        for mem in members:
            os.makedirs(os.path.join(d, mem))
            shutil.copy(os.path.join(root, mem, "Cargo.toml"), os.path.join(d, mem))
        run = subprocess.run(["bash", "-o", "pipefail", "-c", m.group(1)], cwd=d, capture_output=True, text=True)
        if run.returncode != 0:
            err(path, f"the stub step fails: {run.stderr.strip()}")
            return
        for mem in members:
            man = tomllib.load(open(os.path.join(root, mem, "Cargo.toml"), "rb"))
            wanted = [t.get("path") or f"src/bin/{t['name']}.rs" for t in man.get("bin", [])]
            wanted += [t.get("path") or f"benches/{t['name']}.rs" for t in man.get("bench", [])]
            wanted += [t.get("path") or f"tests/{t['name']}.rs" for t in man.get("test", [])]
            wanted += [t.get("path") or f"examples/{t['name']}.rs" for t in man.get("example", [])]
            if "lib" in man or os.path.exists(os.path.join(root, mem, "src/lib.rs")):
                wanted.append((man.get("lib") or {}).get("path") or "src/lib.rs")
            if not man.get("bin") and os.path.exists(os.path.join(root, mem, "src/main.rs")):
                wanted.append("src/main.rs")
            for w in wanted:
                if not os.path.exists(os.path.join(d, mem, w)):
                    err(path, f"the stub step does not create {mem}/{w}, which {mem}/Cargo.toml declares")
    checked.append(f"{path}: dependency layer copies {len(members)} manifests and stubs every declared target")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--dockerfile")
    ap.add_argument("--compose", action="append", default=[], metavar="NAME=FILE.json")
    ap.add_argument("--k8s", action="append", default=[], metavar="NAME=FILE.yaml")
    ap.add_argument("--compose-file", action="append", default=[], help="raw compose files: no password literal")
    ap.add_argument("--user-secret", action="append", default=[], metavar="OVERLAY:SECRET=FILE.env.example")
    a = ap.parse_args()
    user_secrets: dict[str, list[dict]] = {}
    for spec in a.user_secret:
        target, _, path = spec.partition("=")
        overlay, _, secret = target.partition(":")
        data = {}
        for line in open(path):
            line = line.strip()
            if line and not line.startswith("#"):
                k, _, v = line.partition("=")
                data[k] = v
        user_secrets.setdefault(overlay, []).append({"kind": "Secret", "metadata": {"name": secret}, "stringData": data})
    for path in a.compose_file:
        check_compose_file(path)
    clis = load_clis(a.bin_dir)
    port, shutdown = worker_port_and_paths(clis, a.bin_dir) if clis else (9090, 25)
    if a.dockerfile:
        check_dockerfile(a.dockerfile, port)
        check_dockerfile_layers(a.dockerfile)
    for spec in a.compose:
        name, _, path = spec.partition("=")
        check_compose(name, json.load(open(path)), clis, port, shutdown)
    for spec in a.k8s:
        name, _, path = spec.partition("=")
        docs = [d for d in yaml.safe_load_all(open(path)) if d] + user_secrets.get(name, [])
        check_k8s(name, docs, clis, port, shutdown)
    for c in checked:
        print(f"  ok  {c}")
    for e in errors:
        print(f"  FAIL {e}", file=sys.stderr)
    if errors:
        print(f"check_deploy: {len(errors)} problem(s)", file=sys.stderr)
        return 1
    print("check_deploy: every flag, variable, port and health path matches the binaries")
    return 0


if __name__ == "__main__":
    sys.exit(main())
