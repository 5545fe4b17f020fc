"""The deployment files hold what the README and docs/deploy.md promise: one test per rule.

Offline checks (no cluster, no kubectl apply) of docker-compose.yml, deploy/kubernetes/, the
systemd unit, the Dockerfile and the alert rules: they parse, they are valid against their
schemas, they hold the promised settings (healthchecks, probes, CronJob policy, hardening,
secrets only as files, wiring between the files), and every SEEDKEEPER_* variable they set is a
real config key: `seedkeeper config` runs with each file's variables and must accept them (it
exits 78 on an unknown key or a bad value) and show their values as effective.

    bash scripts/check-deploy.sh                  # installs what is missing, then runs this
    python3 scripts/deploy_checks/test_deploy.py  # one line per check, a summary, exit 1 on a failure
    python3 -m unittest scripts/deploy_checks/test_deploy.py -k systemd

Environment (scripts/check-deploy.sh sets the first four):
  SEEDKEEPER_BIN                    the binary that judges config keys (target/debug/seedkeeper)
  CHECK_JSONSCHEMA, KUBERNETES_VALIDATE
                                    the schema validators (PyPI, in .ci/venv)
  PROMTOOL                          promtool, for the alert rules
  SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1 a missing tool skips its checks instead of failing them
  SEEDKEEPER_CHECK_DEPLOY_DOCKER=1  a missing Docker engine fails the image build instead of skipping it
"""
import functools
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
import unittest
from urllib.parse import urlsplit

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.chdir(ROOT)

BIN = os.path.abspath(os.environ.get("SEEDKEEPER_BIN") or "target/debug/seedkeeper")
OFFLINE = os.environ.get("SEEDKEEPER_CHECK_DEPLOY_OFFLINE") == "1"
SECRET_KEY = re.compile(r"(PASSWORD|SECRET|DATABASE__URL)$")  # must come as *_FILE instead
URL_WITH_PASSWORD = re.compile(r"://[^/\s@:]+:[^/\s@]+@")
KDIR = "deploy/kubernetes"
SCRATCH = tempfile.mkdtemp(prefix="check-deploy-")


def tearDownModule():
    shutil.rmtree(SCRATCH, ignore_errors=True)


def missing_tool(test, what, fix):
    """A tool a check needs is not installed: a skip when SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1 says
    so, else a failure naming the fix (CI must not pass by skipping)."""
    if OFFLINE:
        test.skipTest(f"{what} (SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1)")
    test.fail(f"{what}: {fix}, or set SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1 to skip knowingly")


# --- the files, read once ----------------------------------------------------------------------
def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def load_all(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


YAMLS = ["docker-compose.yml"] + sorted(glob.glob(f"{KDIR}/*.yaml"))


@functools.cache
def docs():
    """Every YAML file's documents; a file that does not parse has none (its own test says why)."""
    out = {}
    for p in YAMLS:
        try:
            out[p] = load_all(p)
        except Exception:  # noqa: BLE001 - reported by test_yaml_files_parse
            out[p] = []
    return out


def compose():
    return (docs().get("docker-compose.yml") or [{}])[0]


def svcs():
    return compose().get("services", {}) or {}


def svc(name):
    return svcs().get(name) or {}


def env_of(service):
    e = service.get("environment", {}) or {}
    if isinstance(e, list):
        e = dict(x.split("=", 1) if "=" in x else (x, "") for x in e)
    return {k: "" if v is None else str(v) for k, v in e.items()}


def cmd_of(service):
    cmd = service.get("command", [])
    return cmd.split() if isinstance(cmd, str) else [str(x) for x in cmd]


def mounts(service):
    out = []
    for v in service.get("volumes", []) or []:
        if isinstance(v, str):
            parts = v.split(":")
            out.append((parts[0], parts[1] if len(parts) > 1 else ""))
        else:
            out.append((str(v.get("source")), str(v.get("target"))))
    return out


def depends(service, on, condition):
    deps = service.get("depends_on", {})
    return isinstance(deps, dict) and (deps.get(on) or {}).get("condition") == condition


def secrets_of(service):
    return [x if isinstance(x, str) else x.get("source") for x in service.get("secrets", []) or []]


def top_secrets():
    return compose().get("secrets", {}) or {}


def secret_value(name):
    f = (top_secrets().get(name) or {}).get("file")
    try:
        return read(f).rstrip("\n") if f else None
    except OSError:
        return None


def secret_leaks(env):
    """Names of variables that carry a secret inline instead of through *_FILE."""
    return sorted(k for k, v in env.items() if SECRET_KEY.search(k) or URL_WITH_PASSWORD.search(str(v)))


@functools.cache
def dockerfile():
    return read("Dockerfile")


@functools.cache
def dockerignore():
    return [l.strip().rstrip("/") for l in read(".dockerignore").splitlines() if l.strip() and not l.startswith("#")]


def image_uid():
    user = re.findall(r"^USER\s+(\S+)", dockerfile(), re.M)
    return user[-1].split(":")[0] if user else None


@functools.cache
def dockerfile_env():
    env = {}
    for block in re.findall(r"^ENV\s+((?:.*\\\n)*.*)$", dockerfile(), re.M):
        env.update(re.findall(r"(SEEDKEEPER_\w+)=(\S+)", block))
    return env


@functools.cache
def realm():
    return json.loads(read("realms/dev-realm.json"))


@functools.cache
def grants_sql():
    return read("deploy/compose/grants.sql") if os.path.isfile("deploy/compose/grants.sql") else ""


def grants_role():
    m = re.search(r"^CREATE ROLE (\w+) ", grants_sql(), re.M)
    return m.group(1) if m else None


def kust():
    return (docs().get(f"{KDIR}/kustomization.yaml") or [{}])[0]


def listed():
    return kust().get("resources", []) or []


@functools.cache
def by_kind():
    out = {}
    for p, ds in docs().items():
        if p.startswith(KDIR) and not p.endswith("kustomization.yaml"):
            for d in ds:
                out.setdefault(d.get("kind"), []).append(d)
    return out


def one(kind):
    items = by_kind().get(kind, [])
    return items[0] if len(items) == 1 else {}


def secrets_by_name():
    return {(d.get("metadata") or {}).get("name"): d for d in by_kind().get("Secret", [])}


def cronjob_pod():
    return one("CronJob").get("spec", {}).get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec", {})


def deployment_pod():
    return one("Deployment").get("spec", {}).get("template", {}).get("spec", {})


def job_pod():
    return one("Job").get("spec", {}).get("template", {}).get("spec", {})


def pods():
    return [("CronJob", cronjob_pod()), ("Deployment", deployment_pod()), ("Job", job_pod())]


def configmap():
    return {k: str(v) for k, v in (one("ConfigMap").get("data") or {}).items()}


def container_env(ctr):
    return {e["name"]: str(e.get("value", "")) for e in ctr.get("env", [])}


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


def alerts_rule():
    return (docs().get(f"{KDIR}/alerts.yaml") or [{}])[0]


def alert_rules():
    return [r for g in (alerts_rule().get("spec") or {}).get("groups", []) or [] for r in g.get("rules", []) or []]


def alert_exprs():
    return " ".join(str(r.get("expr", "")) for r in alert_rules())


@functools.cache
def unit():
    return read("deploy/systemd/seedkeeper.service")


def unit_values(key):
    return re.findall(rf"^{key}=(.*)$", unit(), re.M)


def unit_credentials():
    return [v.split(":", 1)[0] for v in unit_values("LoadCredential") + unit_values("LoadCredentialEncrypted")]


def unit_env():
    env = {}
    for v in unit_values("Environment"):
        env.update(re.findall(r'"?(SEEDKEEPER_\w+)=([^"\s]*)"?', v))
    return env


# --- durations ---------------------------------------------------------------------------------
def parse_duration(s):
    """A seedkeeper duration ("30s", "10m") in milliseconds; None if not understood."""
    m = re.fullmatch(r"(\d+)(ms|s|m|h)", str(s).strip())
    return int(m[1]) * {"ms": 1, "s": 1000, "m": 60000, "h": 3600000}[m[2]] if m else None


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


# --- the binary as the judge of config keys ----------------------------------------------------
def same_value(effective, given):
    if isinstance(effective, bool):
        return str(given).lower() == str(effective).lower()
    if isinstance(effective, (int, float)):
        return str(given) == str(effective)
    if isinstance(effective, str):
        d1, d2 = parse_duration(effective), parse_duration(given)
        return effective == str(given) or (d1 is not None and d1 == d2)
    return True  # arrays and tables: accepted is enough


def seedkeeper_config(test, env, credentials=None):
    """Runs `seedkeeper config` with exactly `env` (plus PATH), from an empty directory so no
    config/seedkeeper.toml is picked up. *_FILE variables get dummy secret files (their real
    paths exist only in the container); `credentials` become a $CREDENTIALS_DIRECTORY.
    Asserts exit 0 and that every non-secret variable shows up in the effective config, as two
    subtests. Returns the effective config (dict), or None when it was refused."""
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
    has_db = any(k.startswith(("SEEDKEEPER_DATABASE__URL", "SEEDKEEPER_CONFIG")) for k in full) or "database.url" in (
        credentials or []
    )
    if not has_db:
        full["SEEDKEEPER_DATABASE__URL"] = "postgres://x@127.0.0.1/x"
    r = subprocess.run([BIN, "config"], env=full, capture_output=True, text=True, cwd=run_dir)
    names = sorted(k for k in env if k.startswith("SEEDKEEPER_"))
    with test.subTest(f"`seedkeeper config` accepts {len(names)} variables"):
        test.assertEqual(r.returncode, 0, f"exit {r.returncode}: {r.stderr}")
    if r.returncode != 0:
        return None
    eff = tomllib.loads(r.stdout)
    wrong = []
    for k, v in env.items():
        if not k.startswith("SEEDKEEPER_") or k.endswith("_FILE") or k == "SEEDKEEPER_CONFIG":
            continue
        node = eff
        for part in k[len("SEEDKEEPER_"):].lower().split("__"):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None or not same_value(node, v):
            wrong.append(f"{k}={v!r} -> {node!r}")
    with test.subTest("every variable's value is in the effective config"):
        test.assertEqual(wrong, [])
    return eff


# === YAML and schemas ==========================================================================
class Yaml(unittest.TestCase):
    def test_yaml_files_parse(self):
        """YAML: docker-compose.yml and every deploy/kubernetes/*.yaml parse"""
        for p in YAMLS:
            with self.subTest(p):
                self.assertTrue(load_all(p), f"{p} holds no document")


class Schemas(unittest.TestCase):
    def tools(self):
        cj, kv = os.environ.get("CHECK_JSONSCHEMA"), os.environ.get("KUBERNETES_VALIDATE")
        if not (cj and kv):
            missing_tool(self, "schema validation: check-jsonschema / kubernetes-validate not installed",
                         "scripts/check-deploy.sh installs them from PyPI into .ci/venv")
        return cj, kv

    def test_compose_file_is_valid_against_the_compose_spec(self):
        """schemas: docker-compose.yml valid against the compose-spec schema"""
        cj, _ = self.tools()
        r = subprocess.run([cj, "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
                           capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_kubernetes_manifests_are_valid_against_the_1_37_schemas(self):
        """schemas: the Kubernetes manifests valid against the 1.37 schemas (strict)"""
        _, kv = self.tools()

        # Kinds of custom resources (the PrometheusRule) have no schema there, which
        # kubernetes-validate only warns about: they are checked on their own (Alerts).
        def custom(doc):
            api = str(doc.get("apiVersion", ""))
            group = api.split("/")[0] if "/" in api else ""
            return "." in group and not group.endswith(".k8s.io")

        manifests = sorted(p for p in glob.glob(f"{KDIR}/*.yaml") if not p.endswith("kustomization.yaml")
                           and not any(custom(d) for d in docs().get(p, [])))
        self.assertTrue(manifests)
        r = subprocess.run([kv, "--strict", "--quiet", *manifests], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


# === Dockerfile (compose and Kubernetes compare against it) ====================================
class Dockerfile(unittest.TestCase):
    def test_multi_stage(self):
        """Dockerfile: multi-stage (2+ FROM)"""
        self.assertGreaterEqual(len(re.findall(r"^FROM ", dockerfile(), re.M)), 2)

    def test_runs_as_a_numeric_non_root_user(self):
        """Dockerfile: runs as a numeric non-root USER"""
        uid = image_uid()
        self.assertTrue(uid is not None and uid.isdigit() and int(uid) != 0, f"USER {uid}")

    def test_healthcheck_runs_seedkeeper_healthcheck(self):
        """Dockerfile: HEALTHCHECK runs `seedkeeper healthcheck`"""
        self.assertRegex(dockerfile(), re.compile(r'^HEALTHCHECK\b.*?CMD \["seedkeeper", "healthcheck"', re.M | re.S))

    def test_healthcheck_probes_liveness_by_default(self):
        """`seedkeeper healthcheck` probes liveness (/healthz) by default, so a PostgreSQL or Keycloak outage never fails a HEALTHCHECK"""
        out = subprocess.run([BIN, "healthcheck", "--help"], capture_output=True, text=True).stdout
        self.assertIn("default http://<http.listen>/healthz", " ".join(out.split()))

    def test_entrypoint_is_seedkeeper(self):
        """Dockerfile: ENTRYPOINT ["seedkeeper"]"""
        self.assertRegex(dockerfile(), re.compile(r'^ENTRYPOINT \["seedkeeper"\]', re.M))

    def test_exposes_8787(self):
        """Dockerfile: EXPOSE 8787"""
        self.assertRegex(dockerfile(), re.compile(r"^EXPOSE 8787\b", re.M))

    def test_reference_seed_and_dev_realm_are_in_the_image(self):
        """Dockerfile: reference seed and dev realm in the image"""
        self.assertIn("reference-seed.toml", dockerfile())
        self.assertIn("realms", dockerfile())

    def test_copy_sources_exist_in_the_build_context(self):
        """Dockerfile: every COPY source exists and is in the build context"""
        sources = [p for src in re.findall(r"^COPY (?!--from)(.+?)\s+\S+$", dockerfile(), re.M) for p in src.split()]
        self.assertTrue(sources)
        for path in sources:
            with self.subTest(path):
                top = path.rstrip("/").split("/")[0]
                self.assertTrue(os.path.exists(path), "missing")
                self.assertNotIn(top, dockerignore())
                self.assertNotIn(path.rstrip("/"), dockerignore())

    def test_dockerignore_leaves_out_local_state(self):
        """.dockerignore: target/, .git/, .pgdata/, bench-results/, deploy/compose/secrets/ left out of the build context"""
        for p in ["target", ".git", ".pgdata", "bench-results", "deploy/compose/secrets"]:
            with self.subTest(p):
                self.assertIn(p, dockerignore())

    def test_env_listens_on_all_interfaces_port_8787(self):
        """Dockerfile: ENV SEEDKEEPER_HTTP__LISTEN=0.0.0.0:8787"""
        self.assertTrue(dockerfile_env().get("SEEDKEEPER_HTTP__LISTEN", "").startswith("0.0.0.0:8787"), dockerfile_env())

    def test_env_is_production_by_default(self):
        """Dockerfile: ENV SEEDKEEPER_ENVIRONMENT=production (secure default; compose says development itself)"""
        self.assertEqual(dockerfile_env().get("SEEDKEEPER_ENVIRONMENT"), "production")

    def test_env_plus_the_keycloak_source_is_a_valid_config(self):
        """Dockerfile ENV (+ the keycloak source): `seedkeeper config` accepts it and shows every value"""
        # What an operator adds to the image's ENV at the least: a Keycloak and its client secret.
        seedkeeper_config(self, dict(dockerfile_env(), SEEDKEEPER_IDENTITY__SOURCE="keycloak",
                                     SEEDKEEPER_KEYCLOAK__BASE_URL="https://keycloak.example.com",
                                     SEEDKEEPER_KEYCLOAK__CLIENT_SECRET_FILE="/run/secrets/keycloak_client_secret"))

    def test_dependency_layer_stubs_come_from_cargo_metadata(self):
        """Dockerfile: the dependency layer's stub targets come from `cargo metadata` (a new bench or test cannot break it)"""
        m = re.search(r"^FROM .* AS planner$(.*?)^FROM ", dockerfile(), re.M | re.S)
        self.assertIsNotNone(m, "no planner stage")
        self.assertIn("cargo metadata", m.group(1))

    def test_builds_with_the_dist_profile(self):
        """Dockerfile: builds with --profile dist (lto, codegen-units 1, strip)"""
        self.assertRegex(dockerfile(), r"cargo build --profile dist --locked --bin seedkeeper")

    def test_cargo_dist_profile(self):
        """Cargo.toml: [profile.dist] inherits release with lto, codegen-units = 1, strip"""
        dist = tomllib.loads(read("Cargo.toml")).get("profile", {}).get("dist", {})
        self.assertEqual(dist.get("inherits"), "release")
        self.assertIn(dist.get("lto"), (True, "fat"))
        self.assertEqual(dist.get("codegen-units"), 1)
        self.assertIn(dist.get("strip"), (True, "symbols"))

    def test_oci_labels_come_from_build_args(self):
        """Dockerfile: OCI labels version and revision from build args"""
        for k, v in [("version", "VERSION"), ("revision", "REVISION")]:
            with self.subTest(k):
                self.assertIn(f'org.opencontainers.image.{k}="${v}"', dockerfile())


@functools.cache
def docker_build():
    """The real build, where a Docker engine answers: scripts/image-build.sh (cached layers make a
    second build take seconds). (engine answers, exit code, last lines of output)."""
    ok = shutil.which("docker") is not None and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
    if not ok:
        return False, None, ""
    r = subprocess.run(["bash", "scripts/image-build.sh", "seedkeeper:dev"], capture_output=True, text=True)
    return True, r.returncode, "\n".join((r.stdout + r.stderr).splitlines()[-30:])


class Image(unittest.TestCase):
    """The image as built. SEEDKEEPER_CHECK_DEPLOY_DOCKER=1 (CI) makes a missing engine a failure
    instead of a skip."""

    def built(self):
        engine, rc, out = docker_build()
        if not engine:
            if os.environ.get("SEEDKEEPER_CHECK_DEPLOY_DOCKER") == "1":
                self.fail("no Docker engine answers `docker info` (SEEDKEEPER_CHECK_DEPLOY_DOCKER=1): "
                          "run scripts/docker-setup.sh engine")
            self.skipTest("no Docker engine answers `docker info` (scripts/docker-setup.sh starts one)")
        return rc, out

    def config(self):
        rc, _ = self.built()
        if rc != 0:
            self.fail("the image did not build (test_docker_build_succeeds says why)")
        r = subprocess.run(["docker", "image", "inspect", "seedkeeper:dev"], capture_output=True, text=True)
        return json.loads(r.stdout)[0]["Config"]

    def test_docker_build_succeeds(self):
        """Dockerfile: `docker build` succeeds (scripts/image-build.sh, tag seedkeeper:dev)"""
        rc, out = self.built()
        self.assertEqual(rc, 0, out)

    def test_runs_as_the_numeric_non_root_user(self):
        """image: runs as the Dockerfile's numeric non-root USER"""
        self.assertEqual(self.config().get("User"), f"{image_uid()}:{image_uid()}")

    def test_is_production_by_default(self):
        """image: SEEDKEEPER_ENVIRONMENT=production"""
        self.assertIn("SEEDKEEPER_ENVIRONMENT=production", self.config().get("Env") or [])

    def test_labels_version_and_revision(self):
        """image: labels version (Cargo.toml's) and revision (a commit)"""
        labels = self.config().get("Labels") or {}
        version = tomllib.loads(read("Cargo.toml"))["package"]["version"]
        self.assertEqual(labels.get("org.opencontainers.image.version"), version)
        self.assertRegex(labels.get("org.opencontainers.image.revision", ""), r"^[0-9a-f]{40}$")


# === docker compose ============================================================================
class Compose(unittest.TestCase):
    def test_services_exist_with_healthchecks(self):
        """compose: services postgres, keycloak and seedkeeper, each with a healthcheck"""
        for name in ["postgres", "keycloak", "seedkeeper"]:
            with self.subTest(name):
                self.assertIn(name, svcs())
                hc = svc(name).get("healthcheck") or {}
                self.assertTrue(hc.get("test") and not hc.get("disable"), f"{name} has no healthcheck")

    def test_postgres_password_from_a_secret_file(self):
        """compose: postgres password from a secret file (POSTGRES_PASSWORD_FILE)"""
        env = env_of(svc("postgres"))
        self.assertIn("POSTGRES_PASSWORD_FILE", env)
        self.assertNotIn("POSTGRES_PASSWORD", env)

    def test_postgres_healthcheck_uses_pg_isready(self):
        """compose: postgres healthcheck uses pg_isready"""
        self.assertIn("pg_isready", str(svc("postgres").get("healthcheck", {}).get("test")))

    def test_postgres_published_on_loopback_off_5432(self):
        """compose: postgres published on loopback, off 5432 where `make demo` looks"""
        ports = [str(p) for p in svc("postgres").get("ports", []) or []]
        self.assertTrue(ports)
        for p in ports:
            with self.subTest(p):
                self.assertTrue(p.startswith("127.0.0.1:"))
                self.assertNotEqual(p.split(":")[1], "5432")

    def test_keycloak_image_pinned_to_26(self):
        """compose: keycloak image pinned to quay.io/keycloak/keycloak:26.x"""
        self.assertRegex(str(svc("keycloak").get("image", "")), r"^quay\.io/keycloak/keycloak:26\.\d+(\.\d+)?$")

    def test_keycloak_image_is_the_tested_version(self):
        """compose: keycloak image is the version the conformance suite tests (scripts/keycloak.sh's pin)"""
        pinned = re.search(r"KEYCLOAK_VERSION:-([0-9.]+)", read("scripts/keycloak.sh"))
        self.assertIsNotNone(pinned, "no KEYCLOAK_VERSION default in scripts/keycloak.sh")
        self.assertTrue(str(svc("keycloak").get("image", "")).endswith(":" + pinned.group(1)),
                        f"{svc('keycloak').get('image')} vs the pin {pinned.group(1)}")

    def test_keycloak_runs_start_dev_import_realm(self):
        """compose: keycloak runs start-dev --import-realm"""
        cmd = cmd_of(svc("keycloak"))
        self.assertEqual(cmd[:1], ["start-dev"])
        self.assertIn("--import-realm", cmd)

    def test_keycloak_mounts_the_realms(self):
        """compose: ./realms mounted at /opt/keycloak/data/import"""
        self.assertTrue(any(s.rstrip("/") in ("./realms", "realms") and t.rstrip("/") == "/opt/keycloak/data/import"
                            for s, t in mounts(svc("keycloak"))), mounts(svc("keycloak")))

    def test_keycloak_health_enabled(self):
        """compose: keycloak KC_HEALTH_ENABLED=true (its healthcheck needs it)"""
        self.assertEqual(env_of(svc("keycloak")).get("KC_HEALTH_ENABLED", "").lower(), "true")

    def test_keycloak_admin_bootstrapped(self):
        """compose: keycloak admin bootstrapped (KC_BOOTSTRAP_ADMIN_*)"""
        env = env_of(svc("keycloak"))
        self.assertTrue(env.get("KC_BOOTSTRAP_ADMIN_USERNAME"))
        self.assertTrue(env.get("KC_BOOTSTRAP_ADMIN_PASSWORD"))

    def test_keycloak_healthcheck_without_curl(self):
        """compose: keycloak healthcheck asks /health/ready without curl"""
        hc = str(svc("keycloak").get("healthcheck", {}).get("test"))
        self.assertIn("/dev/tcp/", hc)
        self.assertIn("/health/ready", hc)
        self.assertNotIn("curl", hc)

    def test_secret_files_exist(self):
        """compose: every secret's file exists and is not empty"""
        self.assertTrue(top_secrets())
        for sname, s in top_secrets().items():
            with self.subTest(sname):
                f = (s or {}).get("file", "")
                self.assertTrue(os.path.isfile(f) and os.path.getsize(f) > 0, f"{f}: missing or empty")

    def test_dev_realm_parses(self):
        """realms/dev-realm.json parses"""
        self.assertEqual(realm().get("realm"), "dev")

    # Least privilege: the owner migrates, docs/configuration.md's grant block (verbatim) makes
    # the role the daemon logs in as, and the daemon only verifies the schema.
    def test_grants_sql_is_the_documented_grant_block(self):
        """compose: deploy/compose/grants.sql holds docs/configuration.md's grant block verbatim"""
        m = re.search(r"<!-- grants:verify -->\n```sql\n(.*?)```\n<!-- /grants:verify -->",
                      read("docs/configuration.md"), re.S)
        self.assertIsNotNone(m, "no <!-- grants:verify --> block in docs/configuration.md")
        self.assertIn(m.group(1), grants_sql())

    def test_grant_block_database_is_postgres_db(self):
        """compose: the grant block's database is POSTGRES_DB"""
        m = re.search(r"ON DATABASE (\w+) TO", grants_sql())
        self.assertIsNotNone(m)
        self.assertEqual(m.group(1), env_of(svc("postgres")).get("POSTGRES_DB"))

    def test_migrate_runs_migrate_from_this_image(self):
        """compose: seedkeeper-migrate runs `seedkeeper migrate` from this repository's image"""
        mig = svc("seedkeeper-migrate")
        self.assertEqual(cmd_of(mig), ["migrate"])
        self.assertIn("build", mig)

    def test_migrate_waits_for_healthy_postgres(self):
        """compose: seedkeeper-migrate depends_on postgres with condition service_healthy"""
        self.assertTrue(depends(svc("seedkeeper-migrate"), "postgres", "service_healthy"))

    def test_migrate_applies_the_schema(self):
        """compose: seedkeeper-migrate has schema.mode apply"""
        self.assertEqual(env_of(svc("seedkeeper-migrate")).get("SEEDKEEPER_SCHEMA__MODE"), "apply")

    def test_migrate_disables_the_daemon_healthcheck(self):
        """compose: seedkeeper-migrate disables the image's daemon healthcheck"""
        self.assertIs((svc("seedkeeper-migrate").get("healthcheck") or {}).get("disable"), True)

    def test_migrate_has_no_inline_secret(self):
        """compose: seedkeeper-migrate has no secret inline in its environment"""
        self.assertEqual(secret_leaks(env_of(svc("seedkeeper-migrate"))), [])

    def test_migrate_reads_its_url_from_a_secret(self):
        """compose: seedkeeper-migrate reads its URL from one of its secrets"""
        mig = svc("seedkeeper-migrate")
        url_file = env_of(mig).get("SEEDKEEPER_DATABASE__URL_FILE", "")
        self.assertTrue(url_file.startswith("/run/secrets/"), url_file)
        self.assertIn(url_file.split("/")[-1], secrets_of(mig))
        self.assertIn(url_file.split("/")[-1], top_secrets())

    def test_migrate_connects_as_the_owner(self):
        """compose: seedkeeper-migrate connects as the owner (POSTGRES_USER, its password secret, POSTGRES_DB)"""
        pg_env = env_of(svc("postgres"))
        url_file = env_of(svc("seedkeeper-migrate")).get("SEEDKEEPER_DATABASE__URL_FILE", "")
        u = urlsplit(secret_value(url_file.split("/")[-1]) or "")
        self.assertEqual(u.hostname, "postgres")
        self.assertEqual(u.username, pg_env.get("POSTGRES_USER"))
        self.assertEqual(u.password, secret_value("postgres_password"))
        self.assertEqual(u.path.lstrip("/"), pg_env.get("POSTGRES_DB"))

    def test_migrate_config_is_valid(self):
        """compose seedkeeper-migrate: `seedkeeper config` accepts its variables and shows every value"""
        self.assertTrue(svc("seedkeeper-migrate"))
        seedkeeper_config(self, env_of(svc("seedkeeper-migrate")))

    def test_grants_uses_the_postgres_image(self):
        """compose: seedkeeper-grants uses the postgres image for psql"""
        self.assertEqual(svc("seedkeeper-grants").get("image"), svc("postgres").get("image"))

    def test_grants_runs_after_migrate(self):
        """compose: seedkeeper-grants runs after seedkeeper-migrate completed successfully (tables exist)"""
        self.assertTrue(depends(svc("seedkeeper-grants"), "seedkeeper-migrate", "service_completed_successfully"))

    def test_grants_mounts_and_runs_its_script(self):
        """compose: seedkeeper-grants mounts grants.sql and runs grants.sh"""
        gr = svc("seedkeeper-grants")
        m = {t: s for s, t in mounts(gr)}
        self.assertEqual(m.get("/grants/grants.sql", "").lstrip("./"), "deploy/compose/grants.sql")
        self.assertEqual(m.get("/grants/grants.sh", "").lstrip("./"), "deploy/compose/grants.sh")
        self.assertIn("/grants/grants.sh", [str(x) for x in gr.get("entrypoint", [])])

    def test_grants_connects_as_the_owner(self):
        """compose: seedkeeper-grants connects as the owner to POSTGRES_DB"""
        env, pg_env = env_of(svc("seedkeeper-grants")), env_of(svc("postgres"))
        self.assertEqual(env.get("PGHOST"), "postgres")
        self.assertEqual(env.get("PGUSER"), pg_env.get("POSTGRES_USER"))
        self.assertEqual(env.get("PGDATABASE"), pg_env.get("POSTGRES_DB"))

    def test_grants_has_the_secrets_its_script_reads(self):
        """compose: seedkeeper-grants has the secrets grants.sh reads"""
        script = read("deploy/compose/grants.sh")
        needed = set(re.findall(r"\$secrets/(\w+)", script))
        self.assertTrue(needed)
        self.assertLessEqual(needed, set(secrets_of(svc("seedkeeper-grants"))))
        self.assertLessEqual(needed, set(top_secrets()))

    def test_grants_has_no_inline_secret(self):
        """compose: seedkeeper-grants has no secret inline in its environment"""
        self.assertEqual(secret_leaks(env_of(svc("seedkeeper-grants"))), [])

    def test_grants_script_parses(self):
        """compose: grants.sh parses (bash -n)"""
        r = subprocess.run(["bash", "-n", "deploy/compose/grants.sh"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)

    # The daemon and its --once twin.
    def daemons(self):
        names = [n for n in ["seedkeeper", "seedkeeper-once"] if n in svcs()]
        self.assertIn("seedkeeper", names)
        return names

    def test_daemons_wait_for_healthy_postgres_and_keycloak(self):
        """compose: seedkeeper and seedkeeper-once depends_on postgres and keycloak with condition service_healthy"""
        for name in self.daemons():
            for d in ["postgres", "keycloak"]:
                with self.subTest(f"{name} on {d}"):
                    self.assertTrue(depends(svc(name), d, "service_healthy"))

    def test_daemons_wait_for_the_grants(self):
        """compose: seedkeeper and seedkeeper-once depends_on seedkeeper-grants with condition service_completed_successfully"""
        for name in self.daemons():
            with self.subTest(name):
                self.assertTrue(depends(svc(name), "seedkeeper-grants", "service_completed_successfully"))

    def test_daemons_only_verify_the_schema(self):
        """compose: seedkeeper and seedkeeper-once have schema.mode verify (the owner migrates)"""
        for name in self.daemons():
            with self.subTest(name):
                self.assertEqual(env_of(svc(name)).get("SEEDKEEPER_SCHEMA__MODE"), "verify")

    def test_daemons_build_this_repository(self):
        """compose: seedkeeper and seedkeeper-once build the image from this repository"""
        for name in self.daemons():
            with self.subTest(name):
                self.assertIn("build", svc(name))

    def test_daemons_have_no_inline_secret(self):
        """compose: seedkeeper and seedkeeper-once have no secret inline in their environment"""
        for name in self.daemons():
            with self.subTest(name):
                self.assertEqual(secret_leaks(env_of(svc(name))), [])

    def test_daemons_secrets_are_defined(self):
        """compose: every secret of seedkeeper and seedkeeper-once is defined"""
        for name in self.daemons():
            for s in secrets_of(svc(name)):
                with self.subTest(f"{name} {s}"):
                    self.assertIn(s, top_secrets())

    def test_daemons_file_variables_point_at_their_secrets(self):
        """compose: every *_FILE variable of seedkeeper and seedkeeper-once points at one of its secrets"""
        for name in self.daemons():
            for k, v in env_of(svc(name)).items():
                if k.endswith("_FILE"):
                    with self.subTest(f"{name} {k}"):
                        self.assertTrue(v.startswith("/run/secrets/"), v)
                        self.assertIn(v.split("/")[-1], secrets_of(svc(name)))

    def test_daemon_uses_the_keycloak_source(self):
        """compose: seedkeeper uses the keycloak source"""
        self.assertEqual(env_of(svc("seedkeeper")).get("SEEDKEEPER_IDENTITY__SOURCE"), "keycloak")

    def test_daemon_listens_on_all_interfaces(self):
        """compose: seedkeeper listens on 0.0.0.0:8787"""
        self.assertTrue(env_of(svc("seedkeeper")).get("SEEDKEEPER_HTTP__LISTEN", "").startswith("0.0.0.0:8787"))

    def test_daemon_publishes_8787(self):
        """compose: seedkeeper publishes 8787"""
        self.assertTrue(any("8787" in str(p) for p in svc("seedkeeper").get("ports", []) or []))

    def test_daemon_healthcheck_is_seedkeeper_healthcheck(self):
        """compose: seedkeeper healthcheck is `seedkeeper healthcheck`"""
        self.assertEqual(str(svc("seedkeeper").get("healthcheck", {}).get("test")).replace("'", '"'),
                         '["CMD", "seedkeeper", "healthcheck"]')

    # The dev values must fit together, or the stack starts and then fails to connect.
    def file_secret_for(self, var):
        path = env_of(svc("seedkeeper")).get(var, "")
        return secret_value(path.split("/")[-1]) if path else None

    def test_daemon_connects_as_the_least_privilege_role(self):
        """compose: seedkeeper's database URL is the least-privilege role of the grant block (not the owner; host, password secret, db)"""
        pg_env = env_of(svc("postgres"))
        u = urlsplit(self.file_secret_for("SEEDKEEPER_DATABASE__URL_FILE") or "")
        self.assertEqual(u.hostname, "postgres")
        self.assertIsNotNone(grants_role())
        self.assertEqual(u.username, grants_role())
        self.assertNotEqual(u.username, pg_env.get("POSTGRES_USER"))
        self.assertEqual(u.password, secret_value("seedkeeper_db_password"))
        self.assertEqual(u.path.lstrip("/"), pg_env.get("POSTGRES_DB"))

    def test_daemon_realm_client_and_secret_match_the_dev_realm(self):
        """compose: realm, client id and client secret match realms/dev-realm.json"""
        env = env_of(svc("seedkeeper"))
        client = next((c for c in realm().get("clients", [])
                       if c.get("clientId") == env.get("SEEDKEEPER_KEYCLOAK__CLIENT_ID")), {})
        self.assertEqual(env.get("SEEDKEEPER_KEYCLOAK__REALM"), realm().get("realm"))
        self.assertIsNotNone(client.get("secret"), "no such client, or no secret")
        self.assertEqual(client.get("secret"), self.file_secret_for("SEEDKEEPER_KEYCLOAK__CLIENT_SECRET_FILE"))

    def test_daemon_calls_keycloak_by_service_name(self):
        """compose: seedkeeper calls Keycloak by its service name"""
        self.assertRegex(env_of(svc("seedkeeper")).get("SEEDKEEPER_KEYCLOAK__BASE_URL", ""), r"^https?://keycloak:8080/?$")

    def test_daemons_config_is_valid(self):
        """compose seedkeeper and seedkeeper-once: `seedkeeper config` accepts their variables and shows every value"""
        for name in self.daemons():
            with self.subTest(name):
                seedkeeper_config(self, env_of(svc(name)))

    def test_built_services_say_development(self):
        """compose: every service built from this repository says SEEDKEEPER_ENVIRONMENT=development (the image defaults to production)"""
        built = sorted(n for n, s in svcs().items() if "build" in s)
        self.assertTrue(built)
        for name in built:
            with self.subTest(name):
                self.assertEqual(env_of(svc(name)).get("SEEDKEEPER_ENVIRONMENT"), "development")

    def test_once_runs_under_its_profile(self):
        """compose: seedkeeper-once runs --once under the `once` profile"""
        once = svcs().get("seedkeeper-once")
        if once is None:
            self.skipTest("no seedkeeper-once service")
        self.assertIn("--once", cmd_of(once))
        self.assertIn("once", once.get("profiles") or [])


# === Kubernetes ================================================================================
class Kubernetes(unittest.TestCase):
    def test_kustomization_resources_exist(self):
        """kustomization: every resource exists"""
        self.assertTrue(listed())
        for r in listed():
            with self.subTest(r):
                self.assertTrue(os.path.isfile(os.path.join(KDIR, r)))

    def test_every_manifest_is_listed_or_named(self):
        """kustomization: every manifest is listed or named (commented)"""
        text = read(f"{KDIR}/kustomization.yaml")
        for p in sorted(glob.glob(f"{KDIR}/*.yaml")):
            base = os.path.basename(p)
            if base != "kustomization.yaml":
                with self.subTest(base):
                    self.assertIn(base, text)

    def test_placeholder_secret_is_never_applied(self):
        """kustomization: the placeholder Secret is never applied"""
        self.assertNotIn("secret.example.yaml", listed())

    def test_exactly_one_of_each_kind(self):
        """Kubernetes: exactly one CronJob, Deployment, ConfigMap, ServiceAccount, Service and Job"""
        for kind in ["CronJob", "Deployment", "ConfigMap", "ServiceAccount", "Service", "Job"]:
            with self.subTest(kind):
                self.assertEqual(len(by_kind().get(kind, [])), 1)

    def test_secret_examples(self):
        """Secret examples: seedkeeper (the least-privilege role) and seedkeeper-owner (the migration Job)"""
        self.assertEqual(set(secrets_by_name()), {"seedkeeper", "seedkeeper-owner"})

    def test_secret_examples_share_the_namespace(self):
        """Secret examples: same namespace as the kustomization"""
        for sname, sdoc in sorted(secrets_by_name().items()):
            with self.subTest(sname):
                self.assertIn(sdoc.get("metadata", {}).get("namespace"), (None, kust().get("namespace")))

    # The CronJob: one run at a time, its failures kept as evidence.
    def cron(self):
        return one("CronJob").get("spec", {})

    def test_cronjob_forbids_concurrency(self):
        """CronJob: concurrencyPolicy Forbid"""
        self.assertEqual(self.cron().get("concurrencyPolicy"), "Forbid")

    def test_cronjob_keeps_one_success(self):
        """CronJob: successfulJobsHistoryLimit 1"""
        self.assertEqual(self.cron().get("successfulJobsHistoryLimit"), 1)

    def test_cronjob_keeps_failures(self):
        """CronJob: failedJobsHistoryLimit >= 1 (failures kept)"""
        self.assertGreaterEqual(self.cron().get("failedJobsHistoryLimit") or 0, 1)

    def test_cronjob_starting_deadline(self):
        """CronJob: startingDeadlineSeconds set"""
        self.assertIsInstance(self.cron().get("startingDeadlineSeconds"), int)

    def test_cronjob_backoff_limit_0(self):
        """CronJob: backoffLimit 0"""
        self.assertEqual(self.cron().get("jobTemplate", {}).get("spec", {}).get("backoffLimit"), 0)

    def test_cronjob_active_deadline(self):
        """CronJob: activeDeadlineSeconds set"""
        self.assertIsInstance(self.cron().get("jobTemplate", {}).get("spec", {}).get("activeDeadlineSeconds"), int)

    def test_cronjob_keeps_finished_jobs(self):
        """CronJob: no TTL deleting finished Jobs (history limits keep the evidence)"""
        self.assertNotIn("ttlSecondsAfterFinished", self.cron().get("jobTemplate", {}).get("spec", {}))

    def test_cronjob_restart_policy_never(self):
        """CronJob: restartPolicy Never"""
        self.assertEqual(cronjob_pod().get("restartPolicy"), "Never")

    def test_cronjob_runs_once(self):
        """CronJob: runs --once"""
        self.assertEqual((cronjob_pod().get("containers") or [{}])[0].get("args"), ["--once"])

    # The Deployment (daemon mode) and its Service.
    def dctr(self):
        return (deployment_pod().get("containers") or [{}])[0]

    def test_deployment_container_port(self):
        """Deployment: container port 8787"""
        self.assertIn(8787, [p.get("containerPort") for p in self.dctr().get("ports", [])])

    def test_deployment_probes(self):
        """Deployment: startupProbe and livenessProbe on /healthz, readinessProbe on /readyz, port 8787"""
        ports = {p.get("name"): p.get("containerPort") for p in self.dctr().get("ports", [])}
        for probe, path in [("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")]:
            with self.subTest(probe):
                get = (self.dctr().get(probe) or {}).get("httpGet", {})
                self.assertEqual(get.get("path"), path)
                self.assertEqual(ports.get(get.get("port"), get.get("port")), 8787)

    def test_deployment_replicas(self):
        """Deployment: replicas >= 1"""
        self.assertGreaterEqual(one("Deployment").get("spec", {}).get("replicas", 1), 1)

    def test_service_selects_the_deployments_pods(self):
        """Service: selector matches the Deployment's pods"""
        labels = one("Deployment").get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {})
        sel = one("Service").get("spec", {}).get("selector", {})
        self.assertTrue(sel)
        self.assertTrue(all(labels.get(k) == v for k, v in sel.items()), f"{sel} vs {labels}")

    def test_service_is_cluster_ip_on_8787(self):
        """Service: ClusterIP on port 8787"""
        spec = one("Service").get("spec", {})
        self.assertEqual(spec.get("type", "ClusterIP"), "ClusterIP")
        self.assertTrue(any(p.get("port") == 8787 for p in spec.get("ports", [])))

    def test_service_account_mounts_no_token(self):
        """ServiceAccount: automountServiceAccountToken false"""
        self.assertIs(one("ServiceAccount").get("automountServiceAccountToken"), False)

    # The migration Job: `seedkeeper migrate` as the owner, as compose's seedkeeper-migrate.
    def mctr(self):
        return (job_pod().get("containers") or [{}])[0]

    def test_job_runs_migrate_once(self):
        """Job: runs `seedkeeper migrate` once (restartPolicy Never or OnFailure)"""
        self.assertEqual(self.mctr().get("args"), ["migrate"])
        self.assertIn(job_pod().get("restartPolicy"), ("Never", "OnFailure"))

    def test_job_is_bounded(self):
        """Job: backoffLimit and activeDeadlineSeconds set"""
        spec = one("Job").get("spec", {})
        self.assertIsInstance(spec.get("backoffLimit"), int)
        self.assertIsInstance(spec.get("activeDeadlineSeconds"), int)

    def test_job_applies_the_schema(self):
        """Job: schema.mode apply (the owner runs the DDL)"""
        self.assertEqual(container_env(self.mctr()).get("SEEDKEEPER_SCHEMA__MODE"), "apply")

    def test_job_connects_as_the_owner(self):
        """Job: the database URL is the owner's, from the Secret seedkeeper-owner"""
        path = container_env(self.mctr()).get("SEEDKEEPER_DATABASE__URL_FILE", "")
        self.assertEqual(secret_of(job_pod(), self.mctr(), path)[0], "seedkeeper-owner")

    def test_monitoring_component(self):
        """components/monitoring: a kustomize Component with servicemonitor.yaml"""
        comp = load_all(f"{KDIR}/components/monitoring/kustomization.yaml")[0]
        self.assertEqual(comp.get("kind"), "Component")
        self.assertIn("servicemonitor.yaml", comp.get("resources") or [])

    def test_service_monitor_scrapes_the_service(self):
        """components/monitoring: the ServiceMonitor selects service.yaml and scrapes /metrics on its named port"""
        smon = load_all(f"{KDIR}/components/monitoring/servicemonitor.yaml")[0]
        service = one("Service")
        sel = ((smon.get("spec") or {}).get("selector") or {}).get("matchLabels") or {}
        labels = dict(service.get("metadata", {}).get("labels") or {})
        ports = {p.get("name") for p in service.get("spec", {}).get("ports", [])}
        eps = (smon.get("spec") or {}).get("endpoints") or []
        self.assertEqual(smon.get("apiVersion"), "monitoring.coreos.com/v1")
        self.assertEqual(smon.get("kind"), "ServiceMonitor")
        self.assertTrue(sel and all(labels.get(k) == v for k, v in sel.items()), f"{sel} vs {labels}")
        self.assertTrue(eps)
        for e in eps:
            self.assertIn(e.get("port"), ports)
            self.assertEqual(e.get("path", "/metrics"), "/metrics")

    # Every layout kustomize can make of these files renders: the default (CronJob), daemon mode
    # (Deployment and Service instead), daemon mode with the monitoring component. The rendered
    # objects are validated like the files above.
    LAYOUTS = {
        "default (CronJob)": (None, False, {"ServiceAccount", "ConfigMap", "Job", "CronJob"}),
        "daemon (Deployment + Service)": ("daemon", False, {"ServiceAccount", "ConfigMap", "Job", "Deployment", "Service"}),
        "daemon + components/monitoring": ("daemon", True, {"ServiceAccount", "ConfigMap", "Job", "Deployment",
                                                             "Service", "ServiceMonitor"}),
    }

    def render(self, what):
        kubectl = shutil.which("kubectl") or shutil.which("kustomize")
        if not kubectl:
            missing_tool(self, "kustomize layouts: neither kubectl nor kustomize installed", "install kubectl")
        mode, monitoring, _ = self.LAYOUTS[what]
        ldir = tempfile.mkdtemp(dir=SCRATCH)
        shutil.copytree(KDIR, ldir, dirs_exist_ok=True)
        k = dict(kust())
        if mode == "daemon":
            k["resources"] = [r for r in listed() if r != "cronjob.yaml"] + ["deployment.yaml", "service.yaml"]
        if monitoring:
            k["components"] = ["components/monitoring"]
        with open(os.path.join(ldir, "kustomization.yaml"), "w") as f:
            yaml.safe_dump(k, f, sort_keys=False)
        cmd = [kubectl, "kustomize", ldir] if os.path.basename(kubectl) == "kubectl" else [kubectl, "build", ldir]
        r = subprocess.run(cmd, capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stderr)
        return ldir, [d for d in yaml.safe_load_all(r.stdout) if d]

    def test_kustomize_renders_every_layout(self):
        """kustomize: each layout renders its kinds, all in the kustomization's namespace"""
        for what, (_, _, kinds) in self.LAYOUTS.items():
            with self.subTest(what):
                _, objs = self.render(what)
                self.assertEqual({d.get("kind") for d in objs}, kinds)
                for d in objs:
                    self.assertEqual((d.get("metadata") or {}).get("namespace"), kust().get("namespace"))

    def test_kustomize_layouts_are_valid_against_the_1_37_schemas(self):
        """kustomize: each layout's rendered objects are valid against the 1.37 schemas (strict)"""
        kv = os.environ.get("KUBERNETES_VALIDATE")
        if not kv:
            missing_tool(self, "kubernetes-validate not installed", "scripts/check-deploy.sh installs it into .ci/venv")
        for what in self.LAYOUTS:
            with self.subTest(what):
                ldir, objs = self.render(what)
                rendered = os.path.join(ldir, "rendered.yaml")
                with open(rendered, "w") as f:
                    yaml.safe_dump_all([d for d in objs if d.get("kind") != "ServiceMonitor"], f)
                r = subprocess.run([kv, "--strict", "--quiet", rendered], capture_output=True, text=True)
                self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_configmap_holds_no_secret(self):
        """ConfigMap: no secrets"""
        self.assertTrue(configmap())
        self.assertEqual(secret_leaks(configmap()), [])

    def test_configmap_only_verifies_the_schema(self):
        """ConfigMap: schema.mode verify (the least-privilege role of docs/configuration.md has no CREATE; the migration Job applies the DDL)"""
        self.assertEqual(configmap().get("SEEDKEEPER_SCHEMA__MODE"), "verify")

    # Each pod (CronJob, Deployment, Job): the same hardening and wiring.
    def each_pod(self):
        for kind, pod in pods():
            with self.subTest(kind):
                yield kind, pod, (pod.get("containers") or [{}])[0]

    def test_pods_run_as_the_images_user(self):
        """CronJob, Deployment, Job: runAsNonRoot, runAsUser = the image's USER"""
        for _, pod, _ in self.each_pod():
            psc = pod.get("securityContext", {}) or {}
            self.assertIs(psc.get("runAsNonRoot"), True)
            self.assertEqual(str(psc.get("runAsUser")), str(image_uid()))

    def test_pods_use_the_runtime_default_seccomp_profile(self):
        """CronJob, Deployment, Job: seccompProfile RuntimeDefault"""
        for _, pod, _ in self.each_pod():
            self.assertEqual(((pod.get("securityContext") or {}).get("seccompProfile") or {}).get("type"), "RuntimeDefault")

    def test_pods_have_their_own_service_account_without_token(self):
        """CronJob, Deployment, Job: own ServiceAccount, no token mounted"""
        for _, pod, _ in self.each_pod():
            self.assertEqual(pod.get("serviceAccountName"), one("ServiceAccount").get("metadata", {}).get("name"))
            self.assertIs(pod.get("automountServiceAccountToken"), False)

    def test_containers_are_locked_down(self):
        """CronJob, Deployment, Job: no privilege escalation, read-only root, capabilities dropped"""
        for _, _, c in self.each_pod():
            csc = c.get("securityContext", {}) or {}
            self.assertIs(csc.get("allowPrivilegeEscalation"), False)
            self.assertIs(csc.get("readOnlyRootFilesystem"), True)
            self.assertIn("ALL", (csc.get("capabilities") or {}).get("drop", []))

    def test_containers_have_memory_request_and_limit(self):
        """CronJob, Deployment, Job: memory request and limit"""
        for _, _, c in self.each_pod():
            res = c.get("resources", {}) or {}
            self.assertTrue((res.get("requests") or {}).get("memory"))
            self.assertTrue((res.get("limits") or {}).get("memory"))

    def test_container_images_are_pinned_by_the_kustomization(self):
        """CronJob, Deployment, Job: the image is pinned by kustomization images"""
        names = {i.get("name") for i in kust().get("images", []) or []}
        for _, _, c in self.each_pod():
            self.assertIn(str(c.get("image", "")).rsplit(":", 1)[0], names)

    def test_containers_take_the_configmap(self):
        """CronJob, Deployment, Job: environment from the ConfigMap"""
        name = one("ConfigMap").get("metadata", {}).get("name")
        for _, _, c in self.each_pod():
            self.assertTrue(any((e.get("configMapRef") or {}).get("name") == name for e in c.get("envFrom", [])))

    def test_container_secrets_only_as_files(self):
        """CronJob, Deployment, Job: secrets only as files (no inline values, no secretKeyRef)"""
        for _, _, c in self.each_pod():
            self.assertEqual(secret_leaks(container_env(c)), [])
            self.assertFalse(any("valueFrom" in e for e in c.get("env", [])))

    def test_file_variables_are_keys_of_mounted_secrets(self):
        """CronJob, Deployment, Job: each *_FILE variable is a key of a Secret, mounted"""
        for _, pod, c in self.each_pod():
            for k, v in container_env(c).items():
                if k.endswith("_FILE"):
                    sname, key = secret_of(pod, c, v)
                    sdoc = secrets_by_name().get(sname) or {}
                    keys = set((sdoc.get("stringData") or {}).keys()) | set((sdoc.get("data") or {}).keys())
                    self.assertIsNotNone(sname, f"{k}: {v} is no mounted Secret")
                    self.assertIn(key, keys, f"{k}: key {key} of the Secret {sname}")

    def test_daemon_pods_verify_as_the_least_privilege_role(self):
        """CronJob, Deployment: schema.mode verify, as the least-privilege role (database URL from the Secret seedkeeper)"""
        for kind, pod, c in self.each_pod():
            if kind == "Job":
                continue
            env = container_env(c)
            self.assertEqual(env.get("SEEDKEEPER_SCHEMA__MODE", configmap().get("SEEDKEEPER_SCHEMA__MODE")), "verify")
            self.assertEqual(secret_of(pod, c, env.get("SEEDKEEPER_DATABASE__URL_FILE", ""))[0], "seedkeeper")

    def test_pod_configs_are_valid(self):
        """CronJob, Deployment, Job (ConfigMap + env): `seedkeeper config` accepts the variables and shows every value"""
        for _, _, c in self.each_pod():
            seedkeeper_config(self, {**configmap(), **container_env(c)})

    def test_deployment_grace_outlasts_shutdown_grace(self):
        """Deployment: terminationGracePeriodSeconds > shutdown.grace"""
        grace_ms = parse_duration(configmap().get("SEEDKEEPER_SHUTDOWN__GRACE", "30s")) or 30000
        self.assertGreater(deployment_pod().get("terminationGracePeriodSeconds", 30) * 1000, grace_ms)


# === alerts ====================================================================================
# deploy/kubernetes/alerts.yaml is a PrometheusRule; promtool reads its spec (rule groups),
# unit-tested with deploy/kubernetes/tests/alerts.test.yaml. Named in the kustomization, not
# listed: applying it needs the Prometheus Operator's CRDs.
ALERTS_TESTS = f"{KDIR}/tests/alerts.test.yaml"


@functools.cache
def alerts_tests():
    return load_all(ALERTS_TESTS)[0]


def alert_cases(firing):
    return {t.get("alertname") for case in alerts_tests().get("tests", []) or []
            for t in case.get("alert_rule_test", []) or [] if bool(t.get("exp_alerts")) == firing}


class Alerts(unittest.TestCase):
    def test_one_prometheus_rule_with_only_groups(self):
        """alerts.yaml: one PrometheusRule (monitoring.coreos.com/v1) with a name and only spec.groups"""
        rule = alerts_rule()
        self.assertEqual(len(docs().get(f"{KDIR}/alerts.yaml") or []), 1)
        self.assertEqual(rule.get("apiVersion"), "monitoring.coreos.com/v1")
        self.assertEqual(rule.get("kind"), "PrometheusRule")
        self.assertTrue((rule.get("metadata") or {}).get("name"))
        self.assertLessEqual(set(rule), {"apiVersion", "kind", "metadata", "spec"})
        self.assertEqual(set(rule.get("spec") or {}), {"groups"})

    def test_named_not_applied(self):
        """kustomization: alerts.yaml named, not applied by default (needs the Prometheus Operator CRDs)"""
        self.assertNotIn("alerts.yaml", listed())
        self.assertIn("alerts.yaml", read(f"{KDIR}/kustomization.yaml"))

    def test_the_promised_alerts_exist(self):
        """alerts.yaml: alerts on failing runs, no success for N intervals, identity clashes, CronJob failures and no CronJob success"""
        for what, pattern in [("seedkeeper runs failing (daemon)", r"seedkeeper_last_run_ok"),
                              ("no success for N intervals (daemon)", r"seedkeeper_last_success_timestamp_seconds"),
                              ("identity clashes (daemon)", r'seedkeeper_run_errors_total\{kind="identity_clash"\}'),
                              ("CronJob failures (kube-state-metrics)", r"kube_job_status_failed"),
                              ("no CronJob success for N intervals (kube-state-metrics)",
                               r"kube_cronjob_status_last_successful_time")]:
            with self.subTest(what):
                self.assertRegex(alert_exprs(), pattern)

    def test_each_alert_has_severity_summary_description(self):
        """alerts.yaml: each alert has a severity, a summary and a description"""
        self.assertTrue(alert_rules())
        for r in alert_rules():
            with self.subTest(r.get("alert", "?")):
                self.assertIn((r.get("labels") or {}).get("severity"), ("critical", "warning", "info"))
                self.assertLessEqual({"summary", "description"}, set(r.get("annotations") or {}))

    def test_each_alert_has_a_runbook_in_deploy_md(self):
        """alerts.yaml: each alert has a runbook_url to a section of docs/deploy.md"""
        ids = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
               for h in re.findall(r"^#{1,6}\s+(.*?)\s*$", read("docs/deploy.md"), re.M)}
        for r in alert_rules():
            with self.subTest(r.get("alert", "?")):
                path, _, anchor = str((r.get("annotations") or {}).get("runbook_url", "")).partition("#")
                self.assertEqual(path, "docs/deploy.md")
                self.assertIn(anchor, ids)

    def test_metrics_used_are_documented(self):
        """alerts.yaml: the seedkeeper metrics it uses are in docs/metrics.md"""
        documented = read("docs/metrics.md").split("\n## ", 1)[0]
        used = sorted(set(re.findall(r"\b(seedkeeper_[a-z_]+)", alert_exprs())))
        self.assertTrue(used)
        self.assertEqual([m for m in used if m not in documented], [])

    def test_each_alert_is_tested_firing_and_quiet(self):
        """alerts tests: deploy/kubernetes/tests/alerts.test.yaml parses and tests each alert firing and not firing"""
        names = {r.get("alert") for r in alert_rules() if r.get("alert")}
        self.assertTrue(names)
        self.assertEqual(sorted(names - alert_cases(True)), [], "never firing")
        self.assertEqual(sorted(names - alert_cases(False)), [], "never quiet")

    def promtool(self, *args):
        promtool = os.environ.get("PROMTOOL") or shutil.which("promtool")
        if not promtool:
            missing_tool(self, "alerts.yaml: promtool not installed",
                         "install Debian's prometheus package (scripts/check-deploy.sh takes promtool out of it)")
        adir = tempfile.mkdtemp(dir=SCRATCH)
        with open(os.path.join(adir, "alerts.rules.yaml"), "w") as f:
            yaml.safe_dump(alerts_rule().get("spec") or {}, f, sort_keys=False)
        shutil.copy(ALERTS_TESTS, os.path.join(adir, "alerts.test.yaml"))
        return subprocess.run([os.path.abspath(promtool), *args], capture_output=True, text=True, cwd=adir)

    def test_promtool_check_rules(self):
        """alerts.yaml: `promtool check rules` on its spec"""
        r = self.promtool("check", "rules", "alerts.rules.yaml")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)

    def test_promtool_test_rules(self):
        """alerts.yaml: `promtool test rules` deploy/kubernetes/tests/alerts.test.yaml"""
        r = self.promtool("test", "rules", "alerts.test.yaml")
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


# === systemd ===================================================================================
class Systemd(unittest.TestCase):
    SETTINGS = [("Type", "notify"), ("NotifyAccess", "main"), ("DynamicUser", "yes"),
                ("RestartPreventExitStatus", "78"), ("Restart", "on-failure"),
                ("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                ("PrivateDevices", "yes"), ("NoNewPrivileges", "yes"), ("CapabilityBoundingSet", ""),
                ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"), ("MemoryDenyWriteExecute", "yes"),
                ("SystemCallArchitectures", "native"), ("UMask", "0077"),
                ("ExecStart", "/usr/local/bin/seedkeeper run")]

    def test_settings(self):
        """systemd: Type=notify, DynamicUser, RestartPreventExitStatus=78, the sandboxing settings, ExecStart"""
        for key, want in self.SETTINGS:
            with self.subTest(f"{key}={want}"):
                self.assertIn(want, unit_values(key))

    def test_watchdog_set(self):
        """systemd: WatchdogSec set"""
        self.assertTrue(any(re.fullmatch(r"\d+", v) for v in unit_values("WatchdogSec")), unit_values("WatchdogSec"))

    def test_open_file_limit_fits_the_connection_cap(self):
        """systemd: LimitNOFILE above the default http.max_connections (1024) + 64"""
        # The HTTP connection cap plus the daemon's own descriptors must fit under the open-file
        # limit, or a full cap reads as too_many_open_files.
        nofile = unit_values("LimitNOFILE")
        self.assertEqual(len(nofile), 1, nofile)
        self.assertTrue(nofile[0].isdigit(), nofile)
        self.assertGreaterEqual(int(nofile[0]), 1024 + 64)

    def test_system_call_filter(self):
        """systemd: SystemCallFilter=@system-service"""
        self.assertIn("@system-service", unit_values("SystemCallFilter"))

    def test_credentials_for_the_secrets(self):
        """systemd: LoadCredential database.url and keycloak.client_secret"""
        self.assertLessEqual({"database.url", "keycloak.client_secret"}, set(unit_credentials()))

    def test_credential_names_are_secret_keys(self):
        """systemd: every credential name is a secret key seedkeeper reads"""
        known = {"database.url", "database.password", "keycloak.client_secret"}
        self.assertEqual(set(unit_credentials()) - known, set())

    def test_config_path(self):
        """systemd: SEEDKEEPER_CONFIG=/etc/seedkeeper/seedkeeper.toml"""
        self.assertEqual(unit_env().get("SEEDKEEPER_CONFIG"), "/etc/seedkeeper/seedkeeper.toml")

    def effective(self):
        """As installed: the example config as /etc/seedkeeper/seedkeeper.toml, edited for the
        operator's Keycloak (base_url is the one key the example leaves commented out), secrets
        as credentials."""
        env = dict(unit_env(), SEEDKEEPER_CONFIG=os.path.abspath("config/seedkeeper.example.toml"),
                   SEEDKEEPER_KEYCLOAK__BASE_URL="https://keycloak.example.com")
        eff = seedkeeper_config(self, env, credentials=unit_credentials())
        self.assertIsNotNone(eff, "`seedkeeper config` refused the unit's configuration")
        return eff

    def test_unit_config_is_valid(self):
        """systemd unit (example config + credentials): `seedkeeper config` accepts it and shows every value"""
        self.effective()

    def test_stop_timeout_outlasts_shutdown_grace(self):
        """systemd: TimeoutStopSec above shutdown.grace"""
        stop = systemd_ms((unit_values("TimeoutStopSec") or [""])[-1])
        grace = parse_duration(self.effective().get("shutdown", {}).get("grace", "30s"))
        self.assertIsNotNone(stop)
        self.assertIsNotNone(grace)
        self.assertGreater(stop, grace)

    def test_start_timeout_outlasts_run_timeout(self):
        """systemd: TimeoutStartSec above run.timeout"""
        # READY=1 follows the first run, which run.timeout bounds: systemd must not give up first.
        start = systemd_ms((unit_values("TimeoutStartSec") or [""])[-1])
        run_timeout = parse_duration(self.effective().get("run", {}).get("timeout", "10m"))
        self.assertIsNotNone(start)
        self.assertIsNotNone(run_timeout)
        self.assertGreater(start, run_timeout)

    def test_systemd_analyze_verify(self):
        """systemd: `systemd-analyze verify` finds no unknown or invalid setting"""
        if not shutil.which("systemd-analyze"):
            missing_tool(self, "systemd: systemd-analyze not installed", "install Debian's systemd package")
        p = os.path.join(tempfile.mkdtemp(dir=SCRATCH), "seedkeeper.service")
        with open(p, "w") as f:
            f.write(unit().replace("/usr/local/bin/seedkeeper", BIN))  # verify wants ExecStart to exist
        r = subprocess.run(["systemd-analyze", "verify", p], capture_output=True, text=True)
        bad = [l for l in (r.stdout + r.stderr).splitlines()
               if re.search(r"Unknown (key|section|lvalue)|Failed to parse|Invalid|not valid|Missing", l)]
        self.assertEqual(bad, [])


# === docs ======================================================================================
class Docs(unittest.TestCase):
    def test_links_resolve(self):
        """docs: every relative link and #anchor of README.md and docs/*.md resolves"""
        r = subprocess.run([sys.executable, "scripts/check-docs.py", "links"], capture_output=True, text=True)
        self.assertEqual(r.returncode, 0, r.stdout + r.stderr)


# === the runner: one line per check, as the shell script printed them ===========================
class Lines(unittest.TextTestResult):
    """`ok   <rule>` / `FAIL <rule>` / `skip <rule>`, one line per test and per subtest, the
    failure's detail indented under it, and the counts at the end."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.counts = {"ok": 0, "FAIL": 0, "skip": 0}

    def line(self, tag, test, detail=""):
        self.counts[tag] += 1
        self.stream.write(f"{tag:<4} {self.what(test)}\n")
        if detail:
            self.stream.write("\n".join("       " + l for l in detail.strip().splitlines()[-25:]) + "\n")
        self.stream.flush()

    @staticmethod
    def what(test):
        if isinstance(test, unittest.case._SubTest):
            return f"{Lines.what(test.test_case)}: {test._message}"
        return (test.shortDescription() or test.id()).strip()

    def startTest(self, test):
        unittest.TestResult.startTest(self, test)
        self.subtests = 0
        self.failed = False

    def addSubTest(self, test, subtest, err):
        unittest.TestResult.addSubTest(self, test, subtest, err)
        self.subtests += 1
        if err is None:
            self.line("ok", subtest)
        elif issubclass(err[0], unittest.SkipTest):
            self.line("skip", subtest, str(err[1]))
        else:
            self.failed = True
            self.line("FAIL", subtest, self._exc_info_to_string(err, test))

    def addSuccess(self, test):
        unittest.TestResult.addSuccess(self, test)
        if not self.subtests:
            self.line("ok", test)

    def addFailure(self, test, err):
        unittest.TestResult.addFailure(self, test, err)
        self.line("FAIL", test, self._exc_info_to_string(err, test))

    addError = addFailure

    def printErrors(self):
        """Nothing: each failure was printed under its line already."""

    def addSkip(self, test, reason):
        unittest.TestResult.addSkip(self, test, reason)
        self.line("skip", test, reason)


def main():
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    runner = unittest.TextTestRunner(stream=sys.stdout, resultclass=Lines, verbosity=0)
    result = runner.run(suite)
    c = result.counts
    print(f"check-deploy: {c['ok']} ok, {c['FAIL']} failed, {c['skip']} skipped "
          f"({result.testsRun} rules, {c['ok'] + c['FAIL'] + c['skip']} checks)")
    return 1 if c["FAIL"] or result.failures or result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
