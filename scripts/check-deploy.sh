#!/usr/bin/env bash
# Offline checks of the deployment files (no Docker, no cluster, no kubectl): they parse, they
# hold what the README and docs/deploy.md promise (healthchecks, probes, CronJob policy,
# hardening, secrets only as files, wiring between the files), and every SEEDKEEPER_* variable
# they set is a real config key: `seedkeeper config` is run with each file's variables and must
# accept them (it exits 78 on an unknown key or a bad value) and show their values as effective.
#
#   bash scripts/check-deploy.sh      # one line per check ("ok   ..." / "FAIL ..." / "skip ..."),
#                                     # a summary, exit 1 when any check failed
#
# Needs python3 with PyYAML (taken from the system, else installed into .ci/venv from PyPI) and
# the seedkeeper binary (target/debug/seedkeeper, built when missing). The schema validation
# (compose-spec schema of check-jsonschema, Kubernetes schemas of kubernetes-validate) is also
# installed from PyPI into .ci/venv, and promtool (for deploy/kubernetes/alerts.yaml) from
# Debian's prometheus package into .ci/promtool; when that fails the run fails, unless
# SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1 says to skip them (the other checks still run). kubectl (or
# kustomize) and systemd-analyze (Debian's systemd package) are taken from the PATH; without
# them the run fails too, unless SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1.
set -uo pipefail
cd "$(dirname "$0")/.."

venv=.ci/venv
pip_install() { # packages...
    [[ -x "$venv/bin/python" ]] || python3 -m venv "$venv" >/dev/null 2>&1 || return 1
    "$venv/bin/pip" install --quiet --disable-pip-version-check --retries 1 --timeout 15 "$@" \
        >/dev/null 2>&1
}

# Python >= 3.11 (tomllib) with PyYAML: the venv's, else the system's, else install PyYAML into
# the venv.
if "$venv/bin/python" -c 'import yaml, tomllib' 2>/dev/null; then
    PY="$venv/bin/python"
elif python3 -c 'import yaml, tomllib' 2>/dev/null; then
    PY=python3
elif pip_install 'pyyaml==6.0.*' && "$venv/bin/python" -c 'import yaml, tomllib' 2>/dev/null; then
    PY="$venv/bin/python"
else
    echo "FAIL python3 >= 3.11 with PyYAML: not found, and 'pip install pyyaml' into $venv failed"
    exit 1
fi

# Schema validators: optional, from PyPI once, offline afterwards.
schema_tools=()
if ! "$venv/bin/python" -c 'import check_jsonschema, kubernetes_validate' 2>/dev/null; then
    pip_install 'pyyaml==6.0.*' 'check-jsonschema==0.39.*' 'kubernetes-validate==1.37.*' || true
fi
if "$venv/bin/python" -c 'import check_jsonschema, kubernetes_validate' 2>/dev/null; then
    schema_tools=("$venv/bin/check-jsonschema" "$venv/bin/kubernetes-validate")
fi

# promtool (Debian's prometheus package) checks and unit-tests deploy/kubernetes/alerts.yaml:
# from PATH, else taken out of the package with `apt-get download` into .ci/promtool (no root
# needed, no Prometheus server installed or started; `apt-get update` first when root and the
# package lists lack it). When that fails the run fails, unless SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1.
promtool_bin=""
fetch_promtool() {
    local tmp deb
    tmp=$(mktemp -d) || return 1
    if ! (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1); then
        [[ $(id -u) == 0 ]] && apt-get update -qq >/dev/null 2>&1 \
            && (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) || { rm -rf "$tmp"; return 1; }
    fi
    deb=$(ls "$tmp"/prometheus_*.deb 2>/dev/null | head -n1)
    mkdir -p .ci/promtool \
        && dpkg-deb --fsys-tarfile "$deb" | tar -x -C .ci/promtool ./usr/bin/promtool
    local rc=$?
    rm -rf "$tmp"
    return $rc
}
if command -v promtool >/dev/null 2>&1; then
    promtool_bin=$(command -v promtool)
elif [[ -x .ci/promtool/usr/bin/promtool ]]; then
    promtool_bin=.ci/promtool/usr/bin/promtool
elif [[ "${SEEDKEEPER_CHECK_DEPLOY_OFFLINE:-}" != 1 ]] && command -v apt-get >/dev/null 2>&1 \
        && fetch_promtool && .ci/promtool/usr/bin/promtool --version >/dev/null 2>&1; then
    promtool_bin=.ci/promtool/usr/bin/promtool
fi

bin=target/debug/seedkeeper
if [[ ! -x "$bin" ]]; then
    cargo build --quiet --bin seedkeeper || { echo "FAIL cargo build of $bin"; exit 1; }
fi

CHECK_JSONSCHEMA="${schema_tools[0]:-}" KUBERNETES_VALIDATE="${schema_tools[1]:-}" \
PROMTOOL="$promtool_bin" SEEDKEEPER_BIN="$bin" exec "$PY" - <<'PYEOF'
import glob, json, os, re, shutil, subprocess, sys, tempfile, tomllib
from urllib.parse import urlsplit
import yaml

counts = {"ok": 0, "FAIL": 0, "skip": 0}
def check(ok, what, detail=""):
    tag = "ok  " if ok else "FAIL"
    print(f"{tag} {what}")
    if detail and not ok:
        print("\n".join("       " + line for line in detail.strip().splitlines()))
    counts["ok" if ok else "FAIL"] += 1
    return ok
def skip(what):
    print(f"skip {what}")
    counts["skip"] += 1
def section(name):
    print(f"== {name}")

def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]
def read(path):
    with open(path) as f:
        return f.read()

SECRET_KEY = re.compile(r"(PASSWORD|SECRET|DATABASE__URL)$")    # must come as *_FILE instead
URL_WITH_PASSWORD = re.compile(r"://[^/\s@:]+:[^/\s@]+@")
BIN = os.path.abspath(os.environ["SEEDKEEPER_BIN"])
SCRATCH = tempfile.mkdtemp(prefix="check-deploy-")

# --- the binary as the judge of config keys ----------------------------------------------------
def parse_duration(s):
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", str(s).strip())
    return int(m[1]) * {"ms": 1, "s": 1000, "m": 60000, "h": 3600000}[m[2]] if m else None

def same_value(effective, given):
    if isinstance(effective, bool):
        return str(given).lower() == str(effective).lower()
    if isinstance(effective, (int, float)):
        return str(given) == str(effective)
    if isinstance(effective, str):
        d1, d2 = parse_duration(effective), parse_duration(given)
        return effective == str(given) or (d1 is not None and d1 == d2)
    return True   # arrays and tables: accepted is enough

def seedkeeper_config(env, what, files=None, credentials=None):
    """Runs `seedkeeper config` with exactly `env` (plus PATH), from an empty directory so no
    config/seedkeeper.toml is picked up. *_FILE variables get dummy secret files (their real
    paths exist only in the container); `credentials` become a $CREDENTIALS_DIRECTORY.
    Checks exit 0 and that every non-secret variable shows up in the effective config.
    Returns the effective config (dict) or None."""
    run_dir = tempfile.mkdtemp(dir=SCRATCH)
    full = {"PATH": os.environ.get("PATH", "")}
    for k, v in env.items():
        if k.endswith("_FILE"):
            v = os.path.join(run_dir, k)
            with open(v, "w") as f:
                f.write("postgres://x:dummy@127.0.0.1/x\n" if "DATABASE__URL" in k else "dummy\n")
        full[k] = str(v)
    if credentials:
        cdir = os.path.join(run_dir, "credentials")
        os.mkdir(cdir)
        for name in credentials:
            with open(os.path.join(cdir, name), "w") as f:
                f.write("postgres://x:dummy@127.0.0.1/x" if name == "database.url" else "dummy")
        full["CREDENTIALS_DIRECTORY"] = cdir
    has_db = any(k.startswith(("SEEDKEEPER_DATABASE__URL", "SEEDKEEPER_CONFIG")) for k in full) \
        or "database.url" in (credentials or [])
    if not has_db:
        full["SEEDKEEPER_DATABASE__URL"] = "postgres://x@127.0.0.1/x"
    r = subprocess.run([BIN, "config"], env=full, capture_output=True, text=True, cwd=run_dir)
    names = sorted(k for k in env if k.startswith("SEEDKEEPER_"))
    if not check(r.returncode == 0, f"{what}: `seedkeeper config` accepts {len(names)} variables",
                 f"exit {r.returncode}: {r.stderr}"):
        return None
    try:
        eff = tomllib.loads(r.stdout)
    except tomllib.TOMLDecodeError as e:
        check(False, f"{what}: effective config is TOML", str(e))
        return None
    wrong = []
    for k, v in env.items():
        if not k.startswith("SEEDKEEPER_") or k.endswith("_FILE") or k == "SEEDKEEPER_CONFIG":
            continue
        node = eff
        for part in k[len("SEEDKEEPER_"):].lower().split("__"):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None or not same_value(node, v):
            wrong.append(f"{k}={v!r} -> {node!r}")
    check(not wrong, f"{what}: every variable's value is in the effective config", "\n".join(wrong))
    return eff

def secret_leaks(env):
    """Names of variables that carry a secret inline instead of through *_FILE."""
    return sorted(k for k, v in env.items()
                  if SECRET_KEY.search(k) or URL_WITH_PASSWORD.search(str(v)))

# --- YAML parses -------------------------------------------------------------------------------
section("YAML")
yamls = ["docker-compose.yml"] + sorted(glob.glob("deploy/kubernetes/*.yaml"))
docs = {}
for p in yamls:
    try:
        docs[p] = load_all(p)
        check(bool(docs[p]), f"{p} parses")
    except Exception as e:
        check(False, f"{p} parses", str(e))

# --- schemas -----------------------------------------------------------------------------------
section("schemas")
cj, kv = os.environ.get("CHECK_JSONSCHEMA"), os.environ.get("KUBERNETES_VALIDATE")
if cj and kv:
    r = subprocess.run([cj, "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
                       capture_output=True, text=True)
    check(r.returncode == 0, "docker-compose.yml valid against the compose-spec schema", r.stdout + r.stderr)
    # Kinds of custom resources (the PrometheusRule) have no schema there, which
    # kubernetes-validate only warns about: they are checked on their own (section alerts).
    def custom(doc):
        api = str(doc.get("apiVersion", ""))
        group = api.split("/")[0] if "/" in api else ""
        return "." in group and not group.endswith(".k8s.io")
    manifests = sorted(p for p in glob.glob("deploy/kubernetes/*.yaml") if not p.endswith("kustomization.yaml")
                       and not any(custom(d) for d in docs.get(p, [])))
    r = subprocess.run([kv, "--strict", "--quiet", *manifests], capture_output=True, text=True)
    check(r.returncode == 0, f"{len(manifests)} Kubernetes manifests valid against the 1.37 schemas (strict)", r.stdout + r.stderr)
elif os.environ.get("SEEDKEEPER_CHECK_DEPLOY_OFFLINE") == "1":
    skip("schema validation: check-jsonschema / kubernetes-validate not installed (SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1)")
else:
    check(False, "schema validation: check-jsonschema / kubernetes-validate could not be installed from PyPI "
          "(set SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1 to skip them knowingly)")

# --- Dockerfile (first: compose and Kubernetes compare against it) -----------------------------
section("Dockerfile")
df = read("Dockerfile")
dockerignore = [l.strip().rstrip("/") for l in read(".dockerignore").splitlines()
                if l.strip() and not l.startswith("#")]
check(len(re.findall(r"^FROM ", df, re.M)) >= 2, "Dockerfile: multi-stage (2+ FROM)")
user = re.findall(r"^USER\s+(\S+)", df, re.M)
image_uid = user[-1].split(":")[0] if user else None
check(image_uid is not None and image_uid.isdigit() and int(image_uid) != 0,
      f"Dockerfile: runs as a numeric non-root USER ({image_uid})")
check(re.search(r'^HEALTHCHECK\b.*?CMD \["seedkeeper", "healthcheck"', df, re.M | re.S) is not None,
      "Dockerfile: HEALTHCHECK runs `seedkeeper healthcheck`")
hc_help = subprocess.run([BIN, "healthcheck", "--help"], capture_output=True, text=True).stdout
check("default http://<http.listen>/healthz" in " ".join(hc_help.split()),
      "`seedkeeper healthcheck` probes liveness (/healthz) by default, so a PostgreSQL or Keycloak outage never fails a HEALTHCHECK")
check(re.search(r'^ENTRYPOINT \["seedkeeper"\]', df, re.M) is not None, 'Dockerfile: ENTRYPOINT ["seedkeeper"]')
check(re.search(r"^EXPOSE 8787\b", df, re.M) is not None, "Dockerfile: EXPOSE 8787")
check("reference-seed.toml" in df and "realms" in df, "Dockerfile: reference seed and dev realm in the image")
for src in re.findall(r"^COPY (?!--from)(.+?)\s+\S+$", df, re.M):
    for path in src.split():
        top = path.rstrip("/").split("/")[0]
        check(os.path.exists(path) and top not in dockerignore and path.rstrip("/") not in dockerignore,
              f"Dockerfile: COPY source {path} exists and is in the build context")
for p in ["target", ".git", ".pgdata", "bench-results", "deploy/compose/secrets"]:
    check(p in dockerignore, f".dockerignore: {p}/ left out of the build context")
df_env = {}
for block in re.findall(r"^ENV\s+((?:.*\\\n)*.*)$", df, re.M):
    df_env.update(re.findall(r"(SEEDKEEPER_\w+)=(\S+)", block))
check(df_env.get("SEEDKEEPER_HTTP__LISTEN", "").startswith("0.0.0.0:8787"),
      "Dockerfile: ENV SEEDKEEPER_HTTP__LISTEN=0.0.0.0:8787")
check(df_env.get("SEEDKEEPER_ENVIRONMENT") == "production",
      "Dockerfile: ENV SEEDKEEPER_ENVIRONMENT=production (secure default; compose says development itself)")
# What an operator adds to the image's ENV at the least: a Keycloak and its client secret.
seedkeeper_config(dict(df_env, SEEDKEEPER_IDENTITY__SOURCE="keycloak",
                       SEEDKEEPER_KEYCLOAK__BASE_URL="https://keycloak.example.com",
                       SEEDKEEPER_KEYCLOAK__CLIENT_SECRET_FILE="/run/secrets/keycloak_client_secret"),
                  "Dockerfile ENV (+ the keycloak source)")
m = re.search(r"^FROM .* AS planner$(.*?)^FROM ", df, re.M | re.S)
check(m is not None and "cargo metadata" in m.group(1),
      "Dockerfile: the dependency layer's stub targets come from `cargo metadata` (a new bench or test cannot break it)")
check(re.search(r"cargo build --profile dist --locked --bin seedkeeper", df) is not None,
      "Dockerfile: builds with --profile dist (lto, codegen-units 1, strip)")
dist = tomllib.loads(read("Cargo.toml")).get("profile", {}).get("dist", {})
check(dist.get("inherits") == "release" and dist.get("lto") in (True, "fat") and dist.get("codegen-units") == 1
      and dist.get("strip") in (True, "symbols"), "Cargo.toml: [profile.dist] inherits release with lto, codegen-units = 1, strip")
check(all(f'org.opencontainers.image.{k}="${v}"' in df for k, v in [("version", "VERSION"), ("revision", "REVISION")]),
      "Dockerfile: OCI labels version and revision from build args")

# The real build, where a Docker engine answers: scripts/image-build.sh (cached layers make a
# second build take seconds). SEEDKEEPER_CHECK_DEPLOY_DOCKER=1 (CI) makes a missing engine a
# failure instead of a skip.
docker_ok = shutil.which("docker") is not None and subprocess.run(
    ["docker", "info"], capture_output=True).returncode == 0
if docker_ok:
    r = subprocess.run(["bash", "scripts/image-build.sh", "seedkeeper:dev"], capture_output=True, text=True)
    if check(r.returncode == 0, "Dockerfile: `docker build` succeeds (scripts/image-build.sh, tag seedkeeper:dev)",
             "\n".join((r.stdout + r.stderr).splitlines()[-30:])):
        cfg = json.loads(subprocess.run(["docker", "image", "inspect", "seedkeeper:dev"], capture_output=True,
                                        text=True).stdout)[0]["Config"]
        check(cfg.get("User") == f"{image_uid}:{image_uid}", f"image: runs as {cfg.get('User')} (numeric, non-root)")
        check("SEEDKEEPER_ENVIRONMENT=production" in (cfg.get("Env") or []), "image: SEEDKEEPER_ENVIRONMENT=production")
        version = tomllib.loads(read("Cargo.toml"))["package"]["version"]
        labels = cfg.get("Labels") or {}
        check(labels.get("org.opencontainers.image.version") == version
              and re.fullmatch(r"[0-9a-f]{40}", labels.get("org.opencontainers.image.revision", "")) is not None,
              f"image: labels version {labels.get('org.opencontainers.image.version')} (Cargo.toml: {version}) "
              f"and revision {labels.get('org.opencontainers.image.revision')}")
elif os.environ.get("SEEDKEEPER_CHECK_DEPLOY_DOCKER") == "1":
    check(False, "Dockerfile: a Docker engine answers `docker info` to build the image (SEEDKEEPER_CHECK_DEPLOY_DOCKER=1)",
          "run scripts/docker-setup.sh engine")
else:
    skip("Dockerfile: `docker build`: no Docker engine answers `docker info` (scripts/docker-setup.sh starts one)")

# --- docker compose ----------------------------------------------------------------------------
section("docker compose")
c = (docs.get("docker-compose.yml") or [{}])[0]
svcs = c.get("services", {}) or {}
def env_of(svc):
    e = svc.get("environment", {}) or {}
    if isinstance(e, list):
        e = dict(x.split("=", 1) if "=" in x else (x, "") for x in e)
    return {k: "" if v is None else str(v) for k, v in e.items()}
def cmd_of(svc):
    cmd = svc.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(x) for x in cmd]

for name in ["postgres", "keycloak", "seedkeeper"]:
    svc = svcs.get(name)
    check(svc is not None, f"compose: service {name}")
    hc = (svc or {}).get("healthcheck") or {}
    check(bool(hc.get("test")) and not hc.get("disable"), f"compose: {name} has a healthcheck")

pg = svcs.get("postgres", {})
pg_env = env_of(pg)
check("POSTGRES_PASSWORD_FILE" in pg_env and "POSTGRES_PASSWORD" not in pg_env,
      "compose: postgres password from a secret file (POSTGRES_PASSWORD_FILE)")
check("pg_isready" in str(pg.get("healthcheck", {}).get("test")), "compose: postgres healthcheck uses pg_isready")
pg_ports = [str(p) for p in pg.get("ports", []) or []]
check(bool(pg_ports) and all(p.startswith("127.0.0.1:") and p.split(":")[1] != "5432" for p in pg_ports),
      f"compose: postgres published on loopback, off 5432 where `make demo` looks ({pg_ports})")

kc = svcs.get("keycloak", {})
check(re.fullmatch(r"quay\.io/keycloak/keycloak:26\.\d+(\.\d+)?", str(kc.get("image", ""))) is not None,
      f"compose: keycloak image pinned to quay.io/keycloak/keycloak:26.x ({kc.get('image')})")
pinned = re.search(r'KEYCLOAK_VERSION:-([0-9.]+)', open("scripts/keycloak.sh").read())
check(pinned is not None and str(kc.get("image", "")).endswith(":" + pinned.group(1)),
      f"compose: keycloak image is the version the conformance suite tests (scripts/keycloak.sh pins {pinned.group(1) if pinned else '?'})")
check(cmd_of(kc)[:1] == ["start-dev"] and "--import-realm" in cmd_of(kc),
      "compose: keycloak runs start-dev --import-realm")
def mounts(svc):
    out = []
    for v in svc.get("volumes", []) or []:
        if isinstance(v, str):
            parts = v.split(":")
            out.append((parts[0], parts[1] if len(parts) > 1 else ""))
        else:
            out.append((str(v.get("source")), str(v.get("target"))))
    return out
check(any(s.rstrip("/") in ("./realms", "realms") and t.rstrip("/") == "/opt/keycloak/data/import"
          for s, t in mounts(kc)), "compose: ./realms mounted at /opt/keycloak/data/import")
kc_env = env_of(kc)
check(kc_env.get("KC_HEALTH_ENABLED", "").lower() == "true", "compose: keycloak KC_HEALTH_ENABLED=true (its healthcheck needs it)")
check(bool(kc_env.get("KC_BOOTSTRAP_ADMIN_USERNAME")) and bool(kc_env.get("KC_BOOTSTRAP_ADMIN_PASSWORD")),
      "compose: keycloak admin bootstrapped (KC_BOOTSTRAP_ADMIN_*)")
kc_hc = str(kc.get("healthcheck", {}).get("test"))
check("/dev/tcp/" in kc_hc and "/health/ready" in kc_hc and "curl" not in kc_hc,
      "compose: keycloak healthcheck asks /health/ready without curl")

top_secrets = c.get("secrets", {}) or {}
for sname, s in top_secrets.items():
    f = (s or {}).get("file", "")
    check(os.path.isfile(f) and os.path.getsize(f) > 0, f"compose: secret {sname} file {f} exists and is not empty")
def secret_value(name):
    f = (top_secrets.get(name) or {}).get("file")
    try:
        return read(f).rstrip("\n") if f else None
    except OSError:
        return None

realm = {}
try:
    realm = json.loads(read("realms/dev-realm.json"))
except Exception as e:
    check(False, "realms/dev-realm.json parses", str(e))

# Least privilege: the owner migrates, docs/configuration.md's grant block (verbatim) makes the role the
# daemon logs in as, and the daemon only verifies the schema.
readme = read("docs/configuration.md")
m = re.search(r"<!-- grants:verify -->\n```sql\n(.*?)```\n<!-- /grants:verify -->", readme, re.S)
readme_grants = m.group(1) if m else None
grants_sql = read("deploy/compose/grants.sql") if os.path.isfile("deploy/compose/grants.sql") else ""
check(readme_grants is not None and readme_grants in grants_sql,
      "compose: deploy/compose/grants.sql holds docs/configuration.md's grant block verbatim")
role_m = re.search(r"^CREATE ROLE (\w+) ", grants_sql, re.M)
grants_role = role_m.group(1) if role_m else None
db_m = re.search(r"ON DATABASE (\w+) TO", grants_sql)
check(db_m is not None and db_m.group(1) == pg_env.get("POSTGRES_DB"),
      f"compose: the grant block's database is POSTGRES_DB ({pg_env.get('POSTGRES_DB')})")

def depends(svc, on, condition):
    deps = svc.get("depends_on", {})
    return isinstance(deps, dict) and (deps.get(on) or {}).get("condition") == condition

mig = svcs.get("seedkeeper-migrate") or {}
mig_env = env_of(mig)
check(cmd_of(mig) == ["migrate"] and "build" in mig, "compose: seedkeeper-migrate runs `seedkeeper migrate` from this repository's image")
check(depends(mig, "postgres", "service_healthy"), "compose: seedkeeper-migrate depends_on postgres with condition service_healthy")
check(mig_env.get("SEEDKEEPER_SCHEMA__MODE") == "apply", "compose: seedkeeper-migrate has schema.mode apply")
check((mig.get("healthcheck") or {}).get("disable") is True, "compose: seedkeeper-migrate disables the image's daemon healthcheck")
check(not secret_leaks(mig_env), "compose: seedkeeper-migrate has no secret inline in its environment", f"inline: {secret_leaks(mig_env)}")
mig_secrets = [x if isinstance(x, str) else x.get("source") for x in mig.get("secrets", []) or []]
mig_url_file = mig_env.get("SEEDKEEPER_DATABASE__URL_FILE", "")
check(mig_url_file.startswith("/run/secrets/") and mig_url_file.split("/")[-1] in mig_secrets
      and mig_url_file.split("/")[-1] in top_secrets, f"compose: seedkeeper-migrate reads its URL from one of its secrets ({mig_url_file})")
mu = urlsplit(secret_value(mig_url_file.split("/")[-1]) or "")
check(mu.hostname == "postgres" and mu.username == pg_env.get("POSTGRES_USER")
      and mu.password == secret_value("postgres_password") and mu.path.lstrip("/") == pg_env.get("POSTGRES_DB"),
      "compose: seedkeeper-migrate connects as the owner (POSTGRES_USER, its password secret, POSTGRES_DB)")
if mig:
    seedkeeper_config(mig_env, "compose seedkeeper-migrate")

gr = svcs.get("seedkeeper-grants") or {}
gr_env = env_of(gr)
gr_mounts = dict((t, s) for s, t in mounts(gr))
gr_script = read("deploy/compose/grants.sh") if os.path.isfile("deploy/compose/grants.sh") else ""
check(gr.get("image") == pg.get("image"), f"compose: seedkeeper-grants uses the postgres image for psql ({gr.get('image')})")
check(depends(gr, "seedkeeper-migrate", "service_completed_successfully"),
      "compose: seedkeeper-grants runs after seedkeeper-migrate completed successfully (tables exist)")
check(gr_mounts.get("/grants/grants.sql", "").lstrip("./") == "deploy/compose/grants.sql"
      and gr_mounts.get("/grants/grants.sh", "").lstrip("./") == "deploy/compose/grants.sh"
      and "/grants/grants.sh" in [str(x) for x in gr.get("entrypoint", [])],
      "compose: seedkeeper-grants mounts grants.sql and runs grants.sh")
check(gr_env.get("PGHOST") == "postgres" and gr_env.get("PGUSER") == pg_env.get("POSTGRES_USER")
      and gr_env.get("PGDATABASE") == pg_env.get("POSTGRES_DB"),
      "compose: seedkeeper-grants connects as the owner to POSTGRES_DB")
gr_secrets = [x if isinstance(x, str) else x.get("source") for x in gr.get("secrets", []) or []]
needed = set(re.findall(r'\$secrets/(\w+)', gr_script))
check(bool(needed) and needed <= set(gr_secrets) and needed <= set(top_secrets),
      f"compose: seedkeeper-grants has the secrets grants.sh reads ({sorted(needed)})")
check(not secret_leaks(gr_env), "compose: seedkeeper-grants has no secret inline in its environment")
if shutil.which("bash"):
    r = subprocess.run(["bash", "-n", "deploy/compose/grants.sh"], capture_output=True, text=True)
    check(r.returncode == 0, "compose: grants.sh parses (bash -n)", r.stderr)

for name in ["seedkeeper", "seedkeeper-once"]:
    svc = svcs.get(name)
    if svc is None:
        continue
    env = env_of(svc)
    deps = svc.get("depends_on", {})
    for d in ["postgres", "keycloak"]:
        check(isinstance(deps, dict) and (deps.get(d) or {}).get("condition") == "service_healthy",
              f"compose: {name} depends_on {d} with condition service_healthy")
    check(depends(svc, "seedkeeper-grants", "service_completed_successfully"),
          f"compose: {name} depends_on seedkeeper-grants with condition service_completed_successfully")
    check(env.get("SEEDKEEPER_SCHEMA__MODE") == "verify",
          f"compose: {name} has schema.mode verify (the owner migrates)")
    check("build" in svc, f"compose: {name} builds the image from this repository")
    leaks = secret_leaks(env)
    check(not leaks, f"compose: {name} has no secret inline in its environment", f"inline: {leaks}")
    svc_secrets = [s if isinstance(s, str) else s.get("source") for s in svc.get("secrets", []) or []]
    for s in svc_secrets:
        check(s in top_secrets, f"compose: {name} secret {s} is defined")
    for k, v in env.items():
        if k.endswith("_FILE"):
            check(v.startswith("/run/secrets/") and v.split("/")[-1] in svc_secrets,
                  f"compose: {name} {k} points at one of its secrets ({v})")
    if name == "seedkeeper":
        check(env.get("SEEDKEEPER_IDENTITY__SOURCE") == "keycloak", "compose: seedkeeper uses the keycloak source")
        check(env.get("SEEDKEEPER_HTTP__LISTEN", "").startswith("0.0.0.0:8787"),
              "compose: seedkeeper listens on 0.0.0.0:8787")
        check(any("8787" in str(p) for p in svc.get("ports", []) or []), "compose: seedkeeper publishes 8787")
        check(str(svc.get("healthcheck", {}).get("test")).replace("'", '"') ==
              '["CMD", "seedkeeper", "healthcheck"]', "compose: seedkeeper healthcheck is `seedkeeper healthcheck`")
        # The dev values must fit together, or the stack starts and then fails to connect.
        def file_secret_for(var):
            path = env.get(var, "")
            return secret_value(path.split("/")[-1]) if path else None
        db_url = file_secret_for("SEEDKEEPER_DATABASE__URL_FILE") or ""
        u = urlsplit(db_url)
        check(u.hostname == "postgres" and u.username == grants_role
              and u.username != pg_env.get("POSTGRES_USER")
              and u.password == secret_value("seedkeeper_db_password")
              and u.path.lstrip("/") == pg_env.get("POSTGRES_DB"),
              f"compose: seedkeeper's database URL is the least-privilege role {grants_role} of the grant block "
              "(not the owner; host, password secret, db)")
        client = next((cl for cl in realm.get("clients", []) if cl.get("clientId") == env.get("SEEDKEEPER_KEYCLOAK__CLIENT_ID")), {})
        check(env.get("SEEDKEEPER_KEYCLOAK__REALM") == realm.get("realm")
              and client.get("secret") is not None
              and client.get("secret") == file_secret_for("SEEDKEEPER_KEYCLOAK__CLIENT_SECRET_FILE"),
              "compose: realm, client id and client secret match realms/dev-realm.json")
        check(re.fullmatch(r"https?://keycloak:8080/?", env.get("SEEDKEEPER_KEYCLOAK__BASE_URL", "")) is not None,
              "compose: seedkeeper calls Keycloak by its service name")
    seedkeeper_config(env, f"compose {name}")
for name, svc in sorted(svcs.items()):
    if "build" in svc:
        check(env_of(svc).get("SEEDKEEPER_ENVIRONMENT") == "development",
              f"compose: {name} says SEEDKEEPER_ENVIRONMENT=development (the image defaults to production)")
once = svcs.get("seedkeeper-once")
if once is not None:
    check("--once" in cmd_of(once) and "once" in (once.get("profiles") or []),
          "compose: seedkeeper-once runs --once under the `once` profile")

# --- Kubernetes --------------------------------------------------------------------------------
section("Kubernetes")
kdir = "deploy/kubernetes"
kust = (docs.get(f"{kdir}/kustomization.yaml") or [{}])[0]
kust_text = read(f"{kdir}/kustomization.yaml")
listed = kust.get("resources", []) or []
for r in listed:
    check(os.path.isfile(os.path.join(kdir, r)), f"kustomization: resource {r} exists")
for p in sorted(glob.glob(f"{kdir}/*.yaml")):
    base = os.path.basename(p)
    if base != "kustomization.yaml":
        check(base in kust_text, f"kustomization: {base} is listed or named (commented)")
check("secret.example.yaml" not in listed, "kustomization: the placeholder Secret is never applied")

by_kind = {}
for p, ds in docs.items():
    if p.startswith(kdir) and not p.endswith("kustomization.yaml"):
        for d in ds:
            by_kind.setdefault(d.get("kind"), []).append(d)
def one(kind):
    items = by_kind.get(kind, [])
    check(len(items) == 1, f"Kubernetes: exactly one {kind}")
    return items[0] if items else {}

cron, dep, cm_doc, sa, service, mjob = (one(k) for k in
    ["CronJob", "Deployment", "ConfigMap", "ServiceAccount", "Service", "Job"])
secrets_by_name = {(d.get("metadata") or {}).get("name"): d for d in by_kind.get("Secret", [])}
check(set(secrets_by_name) == {"seedkeeper", "seedkeeper-owner"},
      f"Secret examples: seedkeeper (the least-privilege role) and seedkeeper-owner (the migration Job) ({sorted(secrets_by_name)})")
secret = secrets_by_name.get("seedkeeper", {})
spec = cron.get("spec", {})
check(spec.get("concurrencyPolicy") == "Forbid", "CronJob: concurrencyPolicy Forbid")
check(spec.get("successfulJobsHistoryLimit") == 1, "CronJob: successfulJobsHistoryLimit 1")
check((spec.get("failedJobsHistoryLimit") or 0) >= 1, "CronJob: failedJobsHistoryLimit >= 1 (failures kept)")
check(isinstance(spec.get("startingDeadlineSeconds"), int), "CronJob: startingDeadlineSeconds set")
job = spec.get("jobTemplate", {}).get("spec", {})
check(job.get("backoffLimit") == 0, "CronJob: backoffLimit 0")
check(isinstance(job.get("activeDeadlineSeconds"), int), "CronJob: activeDeadlineSeconds set")
check("ttlSecondsAfterFinished" not in job, "CronJob: no TTL deleting finished Jobs (history limits keep the evidence)")
cpod = job.get("template", {}).get("spec", {})
check(cpod.get("restartPolicy") == "Never", "CronJob: restartPolicy Never")
check((cpod.get("containers") or [{}])[0].get("args") == ["--once"], "CronJob: runs --once")

dpod = dep.get("spec", {}).get("template", {}).get("spec", {})
dctr = (dpod.get("containers") or [{}])[0]
dports = {p.get("name"): p.get("containerPort") for p in dctr.get("ports", [])}
check(8787 in dports.values(), "Deployment: container port 8787")
for probe, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
    get = (dctr.get(probe) or {}).get("httpGet", {})
    port = dports.get(get.get("port"), get.get("port"))
    check(get.get("path") == path and port == 8787, f"Deployment: {probe} on {path} port 8787")
check(dep.get("spec", {}).get("replicas", 1) >= 1, "Deployment: replicas >= 1")

pod_labels = dep.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
sel = service.get("spec", {}).get("selector", {})
check(bool(sel) and all(pod_labels.get(k) == v for k, v in sel.items()), "Service: selector matches the Deployment's pods")
check(service.get("spec", {}).get("type", "ClusterIP") == "ClusterIP"
      and any(p.get("port") == 8787 for p in service.get("spec", {}).get("ports", [])), "Service: ClusterIP on port 8787")
check(sa.get("automountServiceAccountToken") is False, "ServiceAccount: automountServiceAccountToken false")
for sname, sdoc in sorted(secrets_by_name.items()):
    check(sdoc.get("metadata", {}).get("namespace") in (None, kust.get("namespace")),
          f"Secret example {sname}: same namespace as the kustomization")

# The migration Job: `seedkeeper migrate` as the owner, as compose's seedkeeper-migrate.
mspec = mjob.get("spec", {})
mpod = mspec.get("template", {}).get("spec", {})
mctr = (mpod.get("containers") or [{}])[0]
menv = {e["name"]: str(e.get("value", "")) for e in mctr.get("env", [])}
check(mctr.get("args") == ["migrate"] and mpod.get("restartPolicy") in ("Never", "OnFailure"),
      "Job: runs `seedkeeper migrate` once (restartPolicy Never or OnFailure)")
check(isinstance(mspec.get("backoffLimit"), int) and isinstance(mspec.get("activeDeadlineSeconds"), int),
      "Job: backoffLimit and activeDeadlineSeconds set")
check(menv.get("SEEDKEEPER_SCHEMA__MODE") == "apply", "Job: schema.mode apply (the owner runs the DDL)")
def secret_of(podspec, ctr, path):
    """The Secret (name, key) a file path of the container comes from, or (None, None)."""
    vols = {v["name"]: v for v in podspec.get("volumes", [])}
    d, f = os.path.split(path)
    for m in ctr.get("volumeMounts", []):
        if m["mountPath"].rstrip("/") == d:
            sec = vols.get(m["name"], {}).get("secret") or {}
            items = {i.get("path"): i.get("key") for i in sec.get("items", []) or []}
            return sec.get("secretName"), items.get(f, f) if items else f
    return None, None
owner_secret, _ = secret_of(mpod, mctr, menv.get("SEEDKEEPER_DATABASE__URL_FILE", ""))
check(owner_secret == "seedkeeper-owner", f"Job: the database URL is the owner's, from the Secret seedkeeper-owner ({owner_secret})")

# Every layout kustomize can make of these files renders: the default (CronJob), daemon mode
# (Deployment and Service instead), daemon mode with the monitoring component. The rendered
# objects are validated like the files above.
kubectl = shutil.which("kubectl") or shutil.which("kustomize")
comp_dir = f"{kdir}/components/monitoring"
comp = {}
try:
    comp = load_all(f"{comp_dir}/kustomization.yaml")[0]
    check(comp.get("kind") == "Component" and "servicemonitor.yaml" in (comp.get("resources") or []),
          "components/monitoring: a kustomize Component with servicemonitor.yaml")
    smon = load_all(f"{comp_dir}/servicemonitor.yaml")[0]
    sel = ((smon.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
    svc_labels = dict(service.get("metadata", {}).get("labels") or {})
    ports = {p.get("name") for p in service.get("spec", {}).get("ports", [])}
    eps = (smon.get("spec") or {}).get("endpoints") or []
    check(smon.get("apiVersion") == "monitoring.coreos.com/v1" and smon.get("kind") == "ServiceMonitor"
          and bool(sel) and all(svc_labels.get(k) == v for k, v in sel.items())
          and bool(eps) and all(e.get("port") in ports and e.get("path", "/metrics") == "/metrics" for e in eps),
          "components/monitoring: the ServiceMonitor selects service.yaml and scrapes /metrics on its named port")
except Exception as e:
    check(False, "components/monitoring parses", str(e))
if kubectl:
    layouts = {
        "default (CronJob)": (None, False, {"ServiceAccount", "ConfigMap", "Job", "CronJob"}),
        "daemon (Deployment + Service)": ("daemon", False, {"ServiceAccount", "ConfigMap", "Job", "Deployment", "Service"}),
        "daemon + components/monitoring": ("daemon", True, {"ServiceAccount", "ConfigMap", "Job", "Deployment", "Service", "ServiceMonitor"}),
    }
    for what, (mode, monitoring, kinds) in layouts.items():
        ldir = tempfile.mkdtemp(dir=SCRATCH)
        shutil.copytree(kdir, ldir, dirs_exist_ok=True)
        k = dict(kust)
        if mode == "daemon":
            k["resources"] = [r for r in listed if r != "cronjob.yaml"] + ["deployment.yaml", "service.yaml"]
        if monitoring:
            k["components"] = ["components/monitoring"]
        with open(os.path.join(ldir, "kustomization.yaml"), "w") as f:
            yaml.safe_dump(k, f, sort_keys=False)
        cmd = [kubectl, "kustomize", ldir] if os.path.basename(kubectl) == "kubectl" else [kubectl, "build", ldir]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if not check(r.returncode == 0, f"kustomize renders the {what} layout", r.stderr):
            continue
        objs = [d for d in yaml.safe_load_all(r.stdout) if d]
        got = {d.get("kind") for d in objs}
        check(got == kinds and all((d.get("metadata") or {}).get("namespace") == kust.get("namespace") for d in objs),
              f"kustomize {what}: {sorted(got)}, all in namespace {kust.get('namespace')}", f"want {sorted(kinds)}")
        if kv:
            rendered = os.path.join(ldir, "rendered.yaml")
            with open(rendered, "w") as f:
                yaml.safe_dump_all([d for d in objs if d.get("kind") != "ServiceMonitor"], f)
            r = subprocess.run([kv, "--strict", "--quiet", rendered], capture_output=True, text=True)
            check(r.returncode == 0, f"kustomize {what}: the rendered objects are valid against the 1.37 schemas (strict)",
                  r.stdout + r.stderr)
elif os.environ.get("SEEDKEEPER_CHECK_DEPLOY_OFFLINE") == "1":
    skip("kustomize layouts: neither kubectl nor kustomize installed (SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1)")
else:
    check(False, "kustomize layouts: kubectl (or kustomize) is installed to render them",
          "install kubectl, or set SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1 to skip knowingly")

cm = {k: str(v) for k, v in (cm_doc.get("data") or {}).items()}
check(not secret_leaks(cm), "ConfigMap: no secrets", f"inline: {secret_leaks(cm)}")
check(cm.get("SEEDKEEPER_SCHEMA__MODE") == "verify",
      "ConfigMap: schema.mode verify (the least-privilege role of docs/configuration.md has no CREATE; the migration Job applies the DDL)")
image_names = {i.get("name") for i in kust.get("images", []) or []}
for kind, podspec in [("CronJob", cpod), ("Deployment", dpod), ("Job", mpod)]:
    psc = podspec.get("securityContext", {}) or {}
    check(psc.get("runAsNonRoot") is True and str(psc.get("runAsUser")) == str(image_uid),
          f"{kind}: runAsNonRoot, runAsUser {psc.get('runAsUser')} = the image's USER")
    check((psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{kind}: seccompProfile RuntimeDefault")
    check(podspec.get("serviceAccountName") == sa.get("metadata", {}).get("name")
          and podspec.get("automountServiceAccountToken") is False, f"{kind}: own ServiceAccount, no token mounted")
    c0 = (podspec.get("containers") or [{}])[0]
    csc = c0.get("securityContext", {}) or {}
    check(csc.get("allowPrivilegeEscalation") is False and csc.get("readOnlyRootFilesystem") is True
          and "ALL" in (csc.get("capabilities") or {}).get("drop", []),
          f"{kind}: no privilege escalation, read-only root, capabilities dropped")
    res = c0.get("resources", {}) or {}
    check(bool((res.get("requests") or {}).get("memory")) and bool((res.get("limits") or {}).get("memory")),
          f"{kind}: memory request and limit")
    image = str(c0.get("image", ""))
    check(image.rsplit(":", 1)[0] in image_names, f"{kind}: image {image} is pinned by kustomization images")
    check(any((e.get("configMapRef") or {}).get("name") == cm_doc.get("metadata", {}).get("name")
              for e in c0.get("envFrom", [])), f"{kind}: environment from the ConfigMap")
    envs = {e["name"]: str(e.get("value", "")) for e in c0.get("env", [])}
    check(not secret_leaks(envs) and not any("valueFrom" in e for e in c0.get("env", [])),
          f"{kind}: secrets only as files (no inline values, no secretKeyRef)")
    for k, v in envs.items():
        if not k.endswith("_FILE"):
            continue
        sname, key = secret_of(podspec, c0, v)
        sdoc = secrets_by_name.get(sname) or {}
        keys = set((sdoc.get("stringData") or {}).keys()) | set((sdoc.get("data") or {}).keys())
        check(sname is not None and key in keys, f"{kind}: {k} is key {key} of the Secret {sname}, mounted")
    if kind != "Job":
        check(envs.get("SEEDKEEPER_SCHEMA__MODE", cm.get("SEEDKEEPER_SCHEMA__MODE")) == "verify"
              and secret_of(podspec, c0, envs.get("SEEDKEEPER_DATABASE__URL_FILE", ""))[0] == "seedkeeper",
              f"{kind}: schema.mode verify, as the least-privilege role (database URL from the Secret seedkeeper)")
    seedkeeper_config({**cm, **envs}, f"{kind} (ConfigMap + env)")
dgrace = dpod.get("terminationGracePeriodSeconds", 30)
grace_ms = parse_duration(cm.get("SEEDKEEPER_SHUTDOWN__GRACE", "30s")) or 30000
check(dgrace * 1000 > grace_ms, f"Deployment: terminationGracePeriodSeconds {dgrace} > shutdown.grace")

# --- alerts ------------------------------------------------------------------------------------
section("alerts")
# deploy/kubernetes/alerts.yaml is a PrometheusRule; promtool reads its spec (rule groups),
# unit-tested with deploy/kubernetes/tests/alerts.test.yaml. Named in the kustomization (above),
# not listed: applying it needs the Prometheus Operator's CRDs.
alerts_path, alerts_tests = f"{kdir}/alerts.yaml", f"{kdir}/tests/alerts.test.yaml"
rule = (docs.get(alerts_path) or [{}])[0]
check(len(docs.get(alerts_path) or []) == 1 and rule.get("apiVersion") == "monitoring.coreos.com/v1"
      and rule.get("kind") == "PrometheusRule" and bool((rule.get("metadata") or {}).get("name"))
      and set(rule) <= {"apiVersion", "kind", "metadata", "spec"} and set(rule.get("spec") or {}) == {"groups"},
      "alerts.yaml: one PrometheusRule (monitoring.coreos.com/v1) with a name and only spec.groups")
check("alerts.yaml" not in listed, "kustomization: alerts.yaml named, not applied by default (needs the Prometheus Operator CRDs)")
rules = [r for g in (rule.get("spec") or {}).get("groups", []) or [] for r in g.get("rules", []) or []]
alert_names = {r.get("alert") for r in rules if r.get("alert")}
exprs = " ".join(str(r.get("expr", "")) for r in rules)
for what, pattern in [("seedkeeper runs failing (daemon)", r"seedkeeper_last_run_ok"),
                      ("no success for N intervals (daemon)", r"seedkeeper_last_success_timestamp_seconds"),
                      ("identity clashes (daemon)", r'seedkeeper_run_errors_total\{kind="identity_clash"\}'),
                      ("CronJob failures (kube-state-metrics)", r"kube_job_status_failed"),
                      ("no CronJob success for N intervals (kube-state-metrics)", r"kube_cronjob_status_last_successful_time")]:
    check(re.search(pattern, exprs) is not None, f"alerts.yaml: an alert on {what}")
for r in rules:
    a = r.get("alert", "?")
    check((r.get("labels") or {}).get("severity") in ("critical", "warning", "info")
          and {"summary", "description"} <= set(r.get("annotations") or {}), f"alerts.yaml: {a} has a severity, a summary and a description")
deploy_md_ids = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
                 for h in re.findall(r"^#{1,6}\s+(.*?)\s*$", read("docs/deploy.md"), re.M)}
for r in rules:
    a = r.get("alert", "?")
    url = str((r.get("annotations") or {}).get("runbook_url", ""))
    path, _, anchor = url.partition("#")
    check(path == "docs/deploy.md" and anchor in deploy_md_ids,
          f"alerts.yaml: {a} has a runbook_url to a section of docs/deploy.md", f"runbook_url: {url!r}")
readme_metrics = read("docs/metrics.md").split("\n## ", 1)[0]
used = sorted(set(re.findall(r"\b(seedkeeper_[a-z_]+)", exprs)))
undocumented = [m for m in used if m not in readme_metrics]
check(bool(used) and not undocumented, f"alerts.yaml: the {len(used)} seedkeeper metrics it uses are in docs/metrics.md",
      f"not there: {undocumented}")
tests_doc = {}
try:
    tests_doc = load_all(alerts_tests)[0]
except Exception as e:
    check(False, f"{alerts_tests} parses", str(e))
fired = {t.get("alertname") for case in tests_doc.get("tests", []) or [] for t in case.get("alert_rule_test", []) or []
         if t.get("exp_alerts")}
quiet = {t.get("alertname") for case in tests_doc.get("tests", []) or [] for t in case.get("alert_rule_test", []) or []
         if not t.get("exp_alerts")}
check(alert_names and alert_names <= fired and alert_names <= quiet,
      f"alerts tests: each of the {len(alert_names)} alerts is tested firing and not firing",
      f"never firing: {sorted(alert_names - fired)}; never quiet: {sorted(alert_names - quiet)}")
promtool = os.environ.get("PROMTOOL")
if promtool:
    promtool = os.path.abspath(promtool)
    adir = os.path.join(SCRATCH, "alerts")
    os.mkdir(adir)
    with open(os.path.join(adir, "alerts.rules.yaml"), "w") as f:
        yaml.safe_dump(rule.get("spec") or {}, f, sort_keys=False)
    shutil.copy(alerts_tests, os.path.join(adir, "alerts.test.yaml"))
    r = subprocess.run([promtool, "check", "rules", "alerts.rules.yaml"], capture_output=True, text=True, cwd=adir)
    check(r.returncode == 0, f"alerts.yaml: `promtool check rules` on its spec ({len(rules)} rules)", r.stdout + r.stderr)
    r = subprocess.run([promtool, "test", "rules", "alerts.test.yaml"], capture_output=True, text=True, cwd=adir)
    check(r.returncode == 0, f"alerts.yaml: `promtool test rules` {alerts_tests} ({len(tests_doc.get('tests', []) or [])} cases)",
          r.stdout + r.stderr)
elif os.environ.get("SEEDKEEPER_CHECK_DEPLOY_OFFLINE") == "1":
    skip("alerts.yaml: promtool not installed (SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1)")
else:
    check(False, "alerts.yaml: promtool is available (from PATH, or `apt-get download prometheus` into .ci/promtool)",
          "install Debian's prometheus package, or set SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1 to skip")

# --- systemd -----------------------------------------------------------------------------------
section("systemd")
unit = read("deploy/systemd/seedkeeper.service")
def unit_values(key):
    return re.findall(rf"^{key}=(.*)$", unit, re.M)
for key, want in [("Type", "notify"), ("NotifyAccess", "main"), ("DynamicUser", "yes"),
                  ("RestartPreventExitStatus", "78"), ("Restart", "on-failure"),
                  ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                  ("PrivateDevices", "yes"), ("NoNewPrivileges", "yes"), ("CapabilityBoundingSet", ""),
                  ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"), ("MemoryDenyWriteExecute", "yes"),
                  ("SystemCallArchitectures", "native"), ("UMask", "0077"),
                  ("ExecStart", "/usr/local/bin/seedkeeper run")]:
    check(want in unit_values(key), f"systemd: {key}={want}")
check(any(re.fullmatch(r"\d+", v) for v in unit_values("WatchdogSec")), "systemd: WatchdogSec set")
# The HTTP connection cap (http.max_connections, 1024 by default) plus the daemon's own
# descriptors must fit under the open-file limit, or a full cap reads as too_many_open_files.
nofile = unit_values("LimitNOFILE")
check(len(nofile) == 1 and nofile[0].isdigit() and int(nofile[0]) >= 1024 + 64,
      f"systemd: LimitNOFILE ({nofile}) above the default http.max_connections (1024) + 64")
check("@system-service" in unit_values("SystemCallFilter"), "systemd: SystemCallFilter=@system-service")
creds = [v.split(":", 1)[0] for v in unit_values("LoadCredential") + unit_values("LoadCredentialEncrypted")]
check({"database.url", "keycloak.client_secret"} <= set(creds), f"systemd: LoadCredential database.url and keycloak.client_secret ({creds})")
known = {"database.url", "database.password", "keycloak.client_secret"}
check(set(creds) <= known, f"systemd: every credential name is a secret key seedkeeper reads", f"unknown: {set(creds) - known}")
unit_env = {}
for v in unit_values("Environment"):
    unit_env.update(re.findall(r'"?(SEEDKEEPER_\w+)=([^"\s]*)"?', v))
check(unit_env.get("SEEDKEEPER_CONFIG") == "/etc/seedkeeper/seedkeeper.toml", "systemd: SEEDKEEPER_CONFIG=/etc/seedkeeper/seedkeeper.toml")
# As installed: the example config as /etc/seedkeeper/seedkeeper.toml, edited for the operator's
# Keycloak (base_url is the one key the example leaves commented out), secrets as credentials.
probe_env = dict(unit_env, SEEDKEEPER_CONFIG=os.path.abspath("config/seedkeeper.example.toml"),
                 SEEDKEEPER_KEYCLOAK__BASE_URL="https://keycloak.example.com")
eff = seedkeeper_config(probe_env, "systemd unit (example config + credentials)", credentials=creds)
def systemd_ms(span):
    """A systemd time span ("45", "45s", "1min 30s") in milliseconds; None if not understood."""
    span = span.strip()
    if span.isdigit():
        return int(span) * 1000
    units = {"ms": 1, "s": 1000, "sec": 1000, "m": 60000, "min": 60000, "h": 3600000}
    parts = re.findall(r"(\d+)\s*([a-z]+)", span)
    if not parts or "".join(n + u for n, u in parts) != span.replace(" ", "") or any(u not in units for _, u in parts):
        return None
    return sum(int(n) * units[u] for n, u in parts)
stop = systemd_ms((unit_values("TimeoutStopSec") or [""])[-1])
grace = parse_duration((eff or {}).get("shutdown", {}).get("grace", "30s"))
check(stop is not None and grace is not None and stop > grace,
      f"systemd: TimeoutStopSec ({stop} ms) above shutdown.grace ({grace} ms)")
# READY=1 follows the first run, which run.timeout bounds: systemd must not give up before it.
start = systemd_ms((unit_values("TimeoutStartSec") or [""])[-1])
run_timeout = parse_duration((eff or {}).get("run", {}).get("timeout", "10m"))
check(start is not None and run_timeout is not None and start > run_timeout,
      f"systemd: TimeoutStartSec ({start} ms) above run.timeout ({run_timeout} ms)")
if shutil.which("systemd-analyze"):
    p = os.path.join(SCRATCH, "seedkeeper.service")
    with open(p, "w") as f:
        f.write(unit.replace("/usr/local/bin/seedkeeper", BIN))   # verify wants ExecStart to exist
    r = subprocess.run(["systemd-analyze", "verify", p], capture_output=True, text=True)
    bad = [l for l in (r.stdout + r.stderr).splitlines()
           if re.search(r"Unknown (key|section|lvalue)|Failed to parse|Invalid|not valid|Missing", l)]
    check(not bad, "systemd: `systemd-analyze verify` finds no unknown or invalid setting", "\n".join(bad))
elif os.environ.get("SEEDKEEPER_CHECK_DEPLOY_OFFLINE") == "1":
    skip("systemd: systemd-analyze not installed (SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1)")
else:
    check(False, "systemd: systemd-analyze is installed to verify the unit",
          "install Debian's systemd package (apt-get install systemd), or set SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1 to skip knowingly")

section("docs")
r = subprocess.run([sys.executable, "scripts/check-links.py"], capture_output=True, text=True)
check(r.returncode == 0, "docs: every relative link and #anchor of README.md and docs/*.md resolves",
      r.stdout + r.stderr)

shutil.rmtree(SCRATCH, ignore_errors=True)
print(f"check-deploy: {counts['ok']} ok, {counts['FAIL']} failed, {counts['skip']} skipped")
sys.exit(1 if counts["FAIL"] else 0)
PYEOF
