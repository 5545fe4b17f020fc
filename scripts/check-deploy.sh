#!/usr/bin/env bash
# Offline checks of the deployment files (no Docker, no cluster): they parse, they hold what the
# README promises (healthchecks, probes, CronJob policy, hardening, secrets only as files), and
# every SEEDKEEPER_* variable they set is accepted by `seedkeeper config` with their values.
# Exits non-zero on the first failed check group; prints one line per check.
set -euo pipefail
cd "$(dirname "$0")/.."

# Schema validators from PyPI, offline once installed: the compose-spec schema vendored by
# check-jsonschema, and the Kubernetes OpenAPI schemas bundled with kubernetes-validate.
venv=.ci/venv
if ! "$venv/bin/python" -c 'import yaml, check_jsonschema, kubernetes_validate' 2>/dev/null; then
    python3 -m venv "$venv" >/dev/null
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
        'pyyaml==6.0.*' 'check-jsonschema==0.39.*' 'kubernetes-validate==1.37.*'
fi
PY="$venv/bin/python"
[[ -x target/debug/seedkeeper ]] || cargo build --quiet --bin seedkeeper

echo "== schemas"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml
"$venv/bin/kubernetes-validate" --strict --quiet \
    $(ls deploy/kubernetes/*.yaml | grep -v kustomization.yaml)
echo "ok   Kubernetes manifests valid against the 1.37 schemas (strict)"
echo "== contents"

exec "$PY" - <<'PYEOF'
import glob, os, re, subprocess, sys, tempfile
import yaml

failures = 0
def check(ok, what):
    global failures
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures += 1

def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]

# --- YAML parses -------------------------------------------------------------------------------
yamls = ["docker-compose.yml"] + sorted(glob.glob("deploy/kubernetes/*.yaml"))
docs = {}
for p in yamls:
    try:
        docs[p] = load_all(p)
        check(True, f"{p} parses")
    except Exception as e:
        check(False, f"{p} parses: {e}")

BIN = os.path.abspath("target/debug/seedkeeper")
def accepted(env, what):
    """`seedkeeper config` with exactly these variables: unknown keys or bad values exit 78."""
    tmp = tempfile.mkdtemp()
    full = {"PATH": os.environ.get("PATH", "")}
    for k, v in env.items():
        if k.endswith("_FILE"):
            # Point file variables at a dummy secret; the real path exists only in the container.
            path = os.path.join(tmp, k)
            with open(path, "w") as f:
                f.write("postgres://x@127.0.0.1/x" if "DATABASE" in k else "dummy")
            v = path
        full[k] = str(v)
    if not any(k.startswith("SEEDKEEPER_DATABASE__URL") for k in full):
        full["SEEDKEEPER_DATABASE__URL"] = "postgres://x@127.0.0.1/x"
    r = subprocess.run([BIN, "config"], env=full, capture_output=True, text=True, cwd=tmp)
    check(r.returncode == 0, f"{what}: seedkeeper config accepts {sorted(k for k in env)}"
          + ("" if r.returncode == 0 else "\n" + r.stderr))

SECRET_RE = re.compile(r"(PASSWORD|SECRET|DATABASE__URL)$")

# --- docker compose ----------------------------------------------------------------------------
c = docs.get("docker-compose.yml", [{}])[0]
svcs = c.get("services", {})
for name in ["postgres", "keycloak", "seedkeeper"]:
    check(name in svcs, f"compose: service {name}")
    check("healthcheck" in svcs.get(name, {}), f"compose: {name} has a healthcheck")
kc = svcs.get("keycloak", {})
check(str(kc.get("image", "")).startswith("quay.io/keycloak/keycloak:26"), "compose: keycloak image is quay.io/keycloak/keycloak:26.x")
check("--import-realm" in kc.get("command", []) and "start-dev" in kc.get("command", []), "compose: keycloak runs start-dev --import-realm")
check(any(str(v).startswith("./realms:/opt/keycloak/data/import") for v in kc.get("volumes", [])), "compose: ./realms mounted at /opt/keycloak/data/import")
sk = svcs.get("seedkeeper", {})
deps = sk.get("depends_on", {})
for d in ["postgres", "keycloak"]:
    check(isinstance(deps, dict) and deps.get(d, {}).get("condition") == "service_healthy", f"compose: seedkeeper waits for {d} to be healthy")
env = sk.get("environment", {})
check(env.get("SEEDKEEPER_IDENTITY__SOURCE") == "keycloak", "compose: seedkeeper uses the keycloak source")
inline = [k for k in env if SECRET_RE.search(k)]
check(not inline, f"compose: no secret inline in seedkeeper's environment {inline}")
check("seedkeeper" in str(sk.get("healthcheck", {}).get("test")) and "healthcheck" in str(sk.get("healthcheck", {}).get("test")), "compose: seedkeeper healthcheck uses `seedkeeper healthcheck`")
for sname, s in c.get("secrets", {}).items():
    check(os.path.isfile(s.get("file", "")), f"compose: secret {sname} file {s.get('file')} exists")
for svc_name in ["seedkeeper", "seedkeeper-once"]:
    if svc_name in svcs:
        accepted({k: v for k, v in svcs[svc_name]["environment"].items()}, f"compose {svc_name}")

# --- Kubernetes --------------------------------------------------------------------------------
kdir = "deploy/kubernetes"
kust = load_all(f"{kdir}/kustomization.yaml")[0]
for r in kust.get("resources", []):
    check(os.path.isfile(os.path.join(kdir, r)), f"kustomization: resource {r} exists")
by_kind = {}
for p, ds in docs.items():
    if p.startswith(kdir):
        for d in ds:
            by_kind.setdefault(d.get("kind"), []).append((p, d))
cron = by_kind.get("CronJob", [(None, {})])[0][1]
spec = cron.get("spec", {})
check(spec.get("concurrencyPolicy") == "Forbid", "CronJob: concurrencyPolicy Forbid")
check(spec.get("successfulJobsHistoryLimit") == 1, "CronJob: successfulJobsHistoryLimit 1")
check((spec.get("failedJobsHistoryLimit") or 0) >= 1, "CronJob: failed jobs kept")
job = spec.get("jobTemplate", {}).get("spec", {})
check(job.get("backoffLimit") == 0, "CronJob: backoffLimit 0")
pod = job.get("template", {}).get("spec", {})
check(pod.get("restartPolicy") == "Never", "CronJob: restartPolicy Never")
check("--once" in pod.get("containers", [{}])[0].get("args", []), "CronJob: runs --once")

dep = by_kind.get("Deployment", [(None, {})])[0][1]
dpod = dep.get("spec", {}).get("template", {}).get("spec", {})
ctr = dpod.get("containers", [{}])[0]
for probe, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
    check(ctr.get(probe, {}).get("httpGet", {}).get("path") == path, f"Deployment: {probe} on {path}")

cm = by_kind.get("ConfigMap", [(None, {})])[0][1].get("data", {})
for kind, podspec in [("CronJob", pod), ("Deployment", dpod)]:
    psc = podspec.get("securityContext", {})
    check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, f"{kind}: runs as non-root")
    c0 = podspec.get("containers", [{}])[0]
    csc = c0.get("securityContext", {})
    check(csc.get("allowPrivilegeEscalation") is False and csc.get("readOnlyRootFilesystem") is True
          and "ALL" in csc.get("capabilities", {}).get("drop", []), f"{kind}: container locked down")
    envs = {e["name"]: e.get("value", "") for e in c0.get("env", [])}
    check(not [k for k in envs if SECRET_RE.search(k)], f"{kind}: secrets only as files")
    mounts = {m["mountPath"] for m in c0.get("volumeMounts", [])}
    check(all(any(v.startswith(m + "/") for m in mounts) for k, v in envs.items() if k.endswith("_FILE")),
          f"{kind}: every *_FILE path is under a mounted volume")
    accepted({**cm, **envs}, f"{kind} with the ConfigMap")

secret = by_kind.get("Secret", [(None, {})])[0][1]
keys = set(secret.get("stringData", {}).keys())
for kind, podspec in [("CronJob", pod), ("Deployment", dpod)]:
    c0 = podspec.get("containers", [{}])[0]
    files = {os.path.basename(e.get("value", "")) for e in c0.get("env", []) if e["name"].endswith("_FILE")}
    check(files <= keys, f"{kind}: secret files {sorted(files)} are keys of the example Secret")

# --- systemd -----------------------------------------------------------------------------------
unit = open("scripts/seedkeeper.service").read()
for line in ["Type=notify", "DynamicUser=yes", "RestartPreventExitStatus=78", "ProtectSystem=strict",
             "NoNewPrivileges=yes", "LoadCredential=database.url:", "LoadCredential=keycloak.client_secret:"]:
    check(line in unit, f"systemd: {line}")
check(re.search(r"^WatchdogSec=\d+", unit, re.M) is not None, "systemd: WatchdogSec=")
unit_env = dict(re.findall(r"^Environment=(SEEDKEEPER_[A-Z_]+)=(.*)$", unit, re.M))
unit_env.pop("SEEDKEEPER_CONFIG", None)
cfg = re.search(r"^Environment=SEEDKEEPER_CONFIG=(.*)$", unit, re.M)
if cfg:
    # The unit's config file is the example, as the install notes say.
    unit_env["SEEDKEEPER_CONFIG"] = os.path.abspath("config/seedkeeper.example.toml")
unit_env["SEEDKEEPER_KEYCLOAK__BASE_URL"] = "https://kc.example"
unit_env["SEEDKEEPER_KEYCLOAK__CLIENT_SECRET_FILE"] = "x"
accepted(unit_env, "systemd unit with the example config")
if subprocess.run(["sh", "-c", "command -v systemd-analyze"], capture_output=True).returncode == 0:
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "seedkeeper.service")
        with open(p, "w") as f:
            f.write(unit.replace("/usr/local/bin/seedkeeper", os.path.abspath(BIN)))
        r = subprocess.run(["systemd-analyze", "verify", p], capture_output=True, text=True)
        bad = [l for l in (r.stdout + r.stderr).splitlines()
               if re.search(r"Unknown (key|section)|Failed to parse|Invalid", l)]
        check(not bad, "systemd: systemd-analyze verify finds no unknown or invalid setting" + ("\n" + "\n".join(bad) if bad else ""))

# --- Dockerfile --------------------------------------------------------------------------------
df = open("Dockerfile").read()
check(len(re.findall(r"^FROM ", df, re.M)) >= 2, "Dockerfile: multi-stage")
check(re.search(r"^USER (?!root|0\b)\S+", df, re.M) is not None, "Dockerfile: non-root USER")
check(re.search(r"^HEALTHCHECK .*seedkeeper\", \"healthcheck", df, re.M | re.S) is not None, "Dockerfile: HEALTHCHECK via seedkeeper healthcheck")
check("reference-seed.toml" in df and "realms" in df, "Dockerfile: seed and dev realm in the image")
for path in re.findall(r"^COPY (?!--from)(\S+)", df, re.M):
    check(os.path.exists(path), f"Dockerfile: COPY source {path} exists")

print(f"check-deploy: {failures} failure(s)")
sys.exit(1 if failures else 0)
PYEOF
