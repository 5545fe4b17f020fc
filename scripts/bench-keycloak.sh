#!/usr/bin/env bash
# The benchmark against a real Keycloak 26 (scripts/keycloak.sh): for each size of
# SEEDKEEPER_BENCH_KC_SIZES (default 10000,50000) a realm of its own is filled through the admin
# API, then seedkeeper's keycloak source is timed on a fresh database (cold) and again on the same
# database (no-op), next to `kc.sh export` of the same realm (Keycloak's own way to read every user
# out). Prints a table; JSON in bench-results/bench-keycloak.json.
#
# The realm is realms/dev-realm.json made importable beside `dev` (new name, no realm/client/
# role/group ids, fresh user ids), created with POST /admin/realms, then grown with
# POST /admin/realms/{realm}/partialImport in chunks of SEEDKEEPER_BENCH_KC_CHUNK users (default
# 1000): 1 in 100 users holds `admin` directly, 1 in 100 is in /operators, 1 in 100 in
# /operators/oncall, 1 in 100 in /platform-admins, 1 in 100 holds `ops`, 1 in 50 is disabled.
# Sizes run in increasing order on one realm that grows, so 50,000 costs 40,000 more imports.
# A size whose import exceeds SEEDKEEPER_BENCH_KC_IMPORT_BUDGET seconds (default 600) is
# reported as not reached and the larger sizes are skipped.
#
# Per size, seedkeeper --once (its defaults, or any SEEDKEEPER_<SECTION>__* setting given here)
# three times: cold (a fresh database, and the first read of these users since their import, so
# Keycloak's caches are cold too), no-op (the same database right after), and cold on a warm
# Keycloak (a second fresh database right after that). A failed run is recorded, not fatal. Then
# `kc.sh export --dir D --users different_files` (each file of 50 users in a transaction of its
# own: the export that works at these sizes, and the reference of the ratios) and, up to
# SEEDKEEPER_BENCH_KC_FILE_EXPORT_MAX users (default 10000), `kc.sh export --file F` (one
# transaction, which Keycloak's default 300 s transaction timeout aborts on this machine at
# 10,000 users; its failure is recorded). Reported: wall seconds, ratio to the --dir export's wall
# time (which includes a JVM start; the export of an empty realm is measured once as a baseline
# and the ratio to the time above it is given too), the HTTP requests seedkeeper made (its debug
# line "user listing complete"), the CPU seconds the Keycloak server's java process spent
# meanwhile (utime+stime from /proc; anything else using that Keycloak at the same time is
# counted too), seedkeeper's WARN lines, peak RSS (/usr/bin/time -v) and the tuples the no-op
# wrote outside seed_runs (pg_stat_user_tables). A second table holds the ratios to a plain fetch of
# every page of the listing (briefRepresentation, pages of 500, 4 in flight, measured right after
# seedkeeper's runs): cold on a warm Keycloak (target 1.3x) and no-op (target 1.1x), the no-op
# both right after the first cold run and again on the warm cold run's database. One run of each
# says little on 2 cores (the same no-op or fetch varies by 20 % from one run to the next), and
# Keycloak keeps getting faster for a dozen listings after an import (3.6 s, then 0.8 s for the
# same fetch of 10,000 users; on 2026-12-07 three fetches of a new realm took 6.6 s each, within
# 5 % of each other, and the sixth 1.35 s; on 2026-12-07 again, two in a row agreed at 3.9 and
# 3.7 s, and the rounds after them took 3.4, 1.5, then 0.8 s). So the fetch is first repeated,
# 6 times at least, until the last three are within 5 % of each other (at most 20 times), then
# SEEDKEEPER_BENCH_KC_ROUNDS (default 5) rounds follow,
# each a plain fetch, a warm no-op and a warm cold run (a new database) one after the other: the
# ratios are those of the medians over the rounds, shown with each measure's range. Each round
# also reads the whole machine's busy CPU (/proc/stat: every core, less idle and iowait) around
# each measure: its median over the cores, against the fetch's median time, is the ratio a run
# that kept every core busy from start to end would reach on this machine ("CPU-bound x"), and
# what is left above it is time spent with a core idle, waiting on one step at a time.
#
# An instance already running (scripts/keycloak.sh url) is used and left running; otherwise one is
# started and stopped at the end. The realms (bench-kc-*) and databases (bench_kc_*) it creates
# are deleted at the end. SEEDKEEPER_BENCH_KC_SKIP_BUILD=1 skips `cargo build --release`;
# SEEDKEEPER_BENCH_KC_JSON names another JSON file.
set -euo pipefail
cd "$(dirname "$0")/.."

started=""
if ! base="$(bash scripts/keycloak.sh url 2>/dev/null)"; then
    base="$(bash scripts/keycloak.sh start)"
    started=1
fi
stop_ours() { if [[ -n "$started" ]]; then bash scripts/keycloak.sh stop; fi; }
trap stop_ours EXIT

[[ -n "${SEEDKEEPER_BENCH_KC_SKIP_BUILD:-}" ]] || cargo build --release --quiet
[[ -x target/release/seedkeeper ]] || { echo "bench-keycloak: no target/release/seedkeeper: cargo build --release" >&2; exit 1; }
admin_db="${SEEDKEEPER_TEST_DATABASE_URL:-$(scripts/local-db.sh admin-url)}"
kc_home="$(bash scripts/keycloak.sh fetch)"
kc_run="$(bash scripts/keycloak.sh run-dir)"
kc_pid="$(cat "$kc_run/pid")"

python3 - "$base" "$admin_db" "$kc_home" "$kc_pid" "$kc_run" <<'PY'
import json, os, re, shutil, subprocess, sys, tempfile, time, uuid
import urllib.error, urllib.parse, urllib.request

base, admin_db, kc_home, kc_pid = sys.argv[1].rstrip("/"), sys.argv[2], sys.argv[3], int(sys.argv[4])
run_dir = sys.argv[5]  # scripts/keycloak.sh run-dir: the instance's pid and logs
sizes = sorted({int(s) for s in os.environ.get("SEEDKEEPER_BENCH_KC_SIZES", "10000,50000").split(",") if s.strip()})
chunk = int(os.environ.get("SEEDKEEPER_BENCH_KC_CHUNK", "1000"))
budget = float(os.environ.get("SEEDKEEPER_BENCH_KC_IMPORT_BUDGET", "600"))
json_out = os.environ.get("SEEDKEEPER_BENCH_KC_JSON", "bench-results/bench-keycloak.json")
# The single-file export runs in one transaction: past Keycloak's default transaction timeout
# (300 s) it is aborted. It is attempted up to this size only.
file_export_max = int(os.environ.get("SEEDKEEPER_BENCH_KC_FILE_EXPORT_MAX", "10000"))
rounds = max(1, int(os.environ.get("SEEDKEEPER_BENCH_KC_ROUNDS", "5")))
root = os.getcwd()
binary = os.path.join(root, "target/release/seedkeeper")
tick = os.sysconf("SC_CLK_TCK")
tag = uuid.uuid4().hex[:8]
# seedkeeper settings given to the benchmark (SEEDKEEPER_KEYCLOAK__PAGE_SIZE,
# SEEDKEEPER_KEYCLOAK__REQUEST_TIMEOUT, SEEDKEEPER_DATABASE__STATEMENT_TIMEOUT, ...) reach
# seedkeeper; the rest of its environment is cleared.
passthrough = {k: v for k, v in os.environ.items() if re.match(r"SEEDKEEPER_[A-Z]+__", k)
               and k not in ("SEEDKEEPER_KEYCLOAK__BASE_URL", "SEEDKEEPER_KEYCLOAK__REALM",
                             "SEEDKEEPER_KEYCLOAK__CLIENT_SECRET", "SEEDKEEPER_IDENTITY__SOURCE",
                             "SEEDKEEPER_DATABASE__URL", "SEEDKEEPER_LOG__FORMAT")}
work = tempfile.mkdtemp(prefix="bench-kc-")


def log(msg):
    print(f"bench-keycloak: {msg}", file=sys.stderr, flush=True)


# --- the admin API (master admin-cli token: 60 s lifespan, renewed after 30 s) ---------------
token = [None, 0.0]


def admin_token():
    if token[0] and time.monotonic() - token[1] < 30:
        return token[0]
    form = urllib.parse.urlencode({"grant_type": "password", "client_id": "admin-cli",
                                   "username": "admin", "password": "admin"}).encode()
    with urllib.request.urlopen(f"{base}/realms/master/protocol/openid-connect/token", form, timeout=60) as r:
        token[:] = [json.load(r)["access_token"], time.monotonic()]
    return token[0]


def admin(method, path, body=None, ok=(200, 201, 204)):
    req = urllib.request.Request(f"{base}/admin/realms{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Authorization": f"Bearer {admin_token()}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=900) as r:
            status, text = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read()
    if status not in ok:
        raise RuntimeError(f"{method} /admin/realms{path}: {status} {text[:500]!r}")
    return json.loads(text) if text else None


def strip_ids(v):
    if isinstance(v, dict):
        v.pop("id", None)
        v.pop("containerId", None)
        for x in v.values():
            strip_ids(x)
    elif isinstance(v, list):
        for x in v:
            strip_ids(x)


def dev_realm_as(name):
    with open(os.path.join(root, "realms/dev-realm.json")) as f:
        rep = json.load(f)
    rep["realm"] = name
    rep.pop("id", None)
    for key in ("clients", "groups", "roles", "defaultRole"):
        if key in rep:
            strip_ids(rep[key])
    for u in rep.get("users", []):
        u["id"] = str(uuid.uuid4())
    return rep


def bench_user(i):
    u = {"username": f"bench{i:07d}", "email": f"bench{i:07d}@bench.example", "emailVerified": True,
         "firstName": "Bench", "lastName": f"User {i}", "enabled": i % 50 != 7}
    m = i % 100
    if m == 0:
        u["realmRoles"] = ["admin"]
    elif m == 1:
        u["groups"] = ["/operators"]
    elif m == 2:
        u["groups"] = ["/operators/oncall"]
    elif m == 3:
        u["groups"] = ["/platform-admins"]
    elif m == 4:
        u["realmRoles"] = ["ops"]
    return u


# --- processes ------------------------------------------------------------------------------
def keycloak_java():
    """The Keycloak server's java process: the pid in run-<version>/pid of the state folder or a descendant of it whose
    command line runs the distribution (a `kc.sh export` java is not a descendant)."""
    def cmdline(p):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                return f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""
    if "java" in cmdline(kc_pid).split(" ")[0]:
        return kc_pid
    out = subprocess.run(["pgrep", "-f", f"java.*{kc_home}"], capture_output=True, text=True).stdout.split()
    for p in map(int, out):
        q = p
        while q > 1:
            if q == kc_pid:
                return p
            try:
                with open(f"/proc/{q}/status") as f:
                    q = int(next(l for l in f if l.startswith("PPid:")).split()[1])
            except (OSError, StopIteration):
                break
    raise RuntimeError(f"no java process of {kc_home} under pid {kc_pid}")


java = keycloak_java()


def java_cpu():
    with open(f"/proc/{java}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / tick  # utime + stime


def machine_cpu():
    """Busy CPU seconds of the whole machine so far, every core (/proc/stat's first line: user,
    nice, system, irq, softirq and steal; not idle, not iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return (sum(v) - v[3] - v[4]) / tick


def psql(db_url, sql):
    return subprocess.run(["psql", "-w", "-X", "-Atq", "-v", "ON_ERROR_STOP=1", db_url, "-c", sql],
                          check=True, capture_output=True, text=True).stdout.strip()


def db_url(name):
    return admin_db.rsplit("/", 1)[0] + "/" + name


class Failed(RuntimeError):
    def __init__(self, msg, seconds):
        super().__init__(msg)
        self.seconds = seconds


def timed(cmd, env=None, check=True):
    """(wall seconds, peak RSS KiB or None, user+sys CPU seconds or None, stderr) of one run;
    with check=False the exit code is appended and a failure is not raised."""
    tv = os.path.join(work, "time.txt")
    have_time = os.access("/usr/bin/time", os.X_OK)
    full = (["/usr/bin/time", "-v", "-o", tv] if have_time else []) + cmd
    t0 = time.monotonic()
    p = subprocess.run(full, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    wall = time.monotonic() - t0
    if p.returncode != 0 and check:
        raise Failed(f"{' '.join(cmd)} exited {p.returncode}: {p.stderr[-2000:]}", wall)
    rss = cpu = None
    if have_time and os.path.exists(tv) and "Maximum resident" in open(tv).read():
        t = open(tv).read()
        rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
        cpu = float(re.search(r"User time \(seconds\): ([\d.]+)", t).group(1)) + \
            float(re.search(r"System time \(seconds\): ([\d.]+)", t).group(1))
    return (wall, rss, cpu, p.stderr) if check else (wall, rss, cpu, p.stderr, p.returncode)


def seedkeeper(realm, db):
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/"),
           "SEEDKEEPER_IDENTITY__SOURCE": "keycloak", "SEEDKEEPER_KEYCLOAK__BASE_URL": base,
           "SEEDKEEPER_KEYCLOAK__REALM": realm,
           "SEEDKEEPER_KEYCLOAK__CLIENT_SECRET": "seedkeeper-dev-secret",
           "SEEDKEEPER_DATABASE__URL": db_url(db), "SEEDKEEPER_LOG__FORMAT": "json",
           # the request count is only in this debug line
           "RUST_LOG": "warn,seedkeeper::identity::keycloak=debug"}
    env.update(passthrough)
    c0, m0 = java_cpu(), machine_cpu()
    wall, rss, own_cpu, err, code = timed([binary, "--once"], env, check=False)
    kc_cpu, busy = java_cpu() - c0, machine_cpu() - m0
    requests, listing, warnings = None, None, []
    for line in err.splitlines():
        if '"WARN"' in line or " WARN " in line:
            warnings.append(line[:300])
        if "user listing complete" in line:
            try:
                ev = json.loads(line)
                listing = {k: v for k, v in (ev.get("fields") or ev).items() if k != "message"}
                requests = int(listing.get("requests"))
            except (ValueError, TypeError, AttributeError):
                m = re.search(r"requests\D+(\d+)", line)
                requests = int(m.group(1)) if m else None
    row = {"seconds": wall, "exit": code, "peak_rss_kib": rss, "requests": requests, "listing": listing,
           "keycloak_cpu_seconds": kc_cpu, "seedkeeper_cpu_seconds": own_cpu, "machine_cpu_seconds": busy,
           "warnings": len(warnings), "warning_lines": warnings[:10]}
    try:  # a refused configuration (exit 78) leaves no table at all
        last = psql(db_url(db), "SELECT outcome, counts, coalesce(error, '') FROM seed_runs ORDER BY started_at DESC LIMIT 1")
    except subprocess.CalledProcessError:
        last = ""
    outcome, counts, error = (last.split("|", 2) + ["", "{}", ""])[:3] if last else ("none", "{}", "")
    row["outcome"], row["counts"] = outcome, json.loads(counts or "{}")
    if code != 0 or outcome != "succeeded":
        # recorded, not raised: a run that fails against the real Keycloak is a result
        row["failed"] = True
        row["reason"] = (error or err.strip().splitlines()[-1] if err.strip() else error)[:500]
        log(f"seedkeeper --once in {db} FAILED (exit {code}, outcome {outcome}): {row['reason']}")
    return row


def tuples_written(db):
    last = None
    for _ in range(40):
        v = int(psql(db_url(db), "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables "
                                 "WHERE schemaname = 'public' AND relname <> 'seed_runs'"))
        if v == last:
            return v
        last = v
        time.sleep(0.15)
    return last


def export(realm, mode):
    """`kc.sh export` of one realm. dir: `--dir D --users different_files` (Keycloak's default of
    50 users a file, each file in a transaction of its own); file: `--file F` (one transaction,
    under Keycloak's default transaction timeout). A failed export is recorded, not raised."""
    out = os.path.join(work, f"{realm}-{mode}")
    args = ["--dir", out, "--users", "different_files"] if mode == "dir" else ["--file", out + ".json"]
    cmd = ["bash", "scripts/keycloak.sh", "export", "--realm", realm] + args
    try:
        wall, _, cpu, _ = timed(cmd)
    except Failed as e:
        errors = [l.split("ERROR: ", 1)[1] for l in str(e).splitlines() if "ERROR: " in l
                  and "For more details" not in l and "Failed to start server" not in l]
        reason = errors[-1] if errors else str(e)[-300:]
        try:  # scripts/keycloak.sh keeps the export's log in its state folder
            with open(os.path.join(run_dir, "export.log")) as fh:
                if "ARJUNA012121" in fh.read():  # the transaction reaper cancelled the export's transaction
                    reason = "transaction timeout: Keycloak's transaction reaper cancelled the export (" + reason + ")"
        except OSError:
            pass
        subprocess.run(["rm", "-rf", out, out + ".json"])
        return {"mode": mode, "failed": True, "seconds": e.seconds,
                "reason": reason[:300]}
    files = [os.path.join(out, f) for f in sorted(os.listdir(out))] if mode == "dir" else [out + ".json"]
    users = size = 0
    for f in files:
        with open(f) as fh:
            users += len(json.load(fh).get("users", []))
        size += os.path.getsize(f)
    subprocess.run(["rm", "-rf", out, out + ".json"])
    return {"mode": mode, "seconds": wall, "cpu_seconds": cpu, "users": users, "bytes": size, "files": len(files)}


def fetch_pages(realm, count, page=500, in_flight=4):
    """The plain fetch of every page of the user listing, the reference of the ratios a sync is
    held to: GET users?briefRepresentation=true in pages of `page`, `in_flight` at a time (the
    keycloak source's defaults), each body read and parsed, nothing else asked or written."""
    from concurrent.futures import ThreadPoolExecutor
    token = admin_token()

    def one(first):
        req = urllib.request.Request(
            f"{base}/admin/realms/{realm}/users?briefRepresentation=true&first={first}&max={page}",
            headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=900) as r:
            return len(json.load(r))

    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=in_flight) as pool:
        users = sum(pool.map(one, range(0, count + 1, page)))
    return {"seconds": time.monotonic() - t0, "users": users, "requests": count // page + 1,
            "page_size": page, "in_flight": in_flight}


# --- the run ----------------------------------------------------------------------------------
def save():
    os.makedirs(os.path.dirname(json_out) or ".", exist_ok=True)
    with open(json_out, "w") as f:
        json.dump(result, f, indent=2)


realms, dbs = [], []
result = {"date": time.strftime("%Y-%m-%d"), "keycloak_base_url": base, "sizes": sizes, "chunk": chunk,
          "import_budget_seconds": budget, "seedkeeper_settings": passthrough, "runs": [], "imports": []}
try:
    req = urllib.request.Request(f"{base}/admin/serverinfo", headers={"Authorization": f"Bearer {admin_token()}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        si = json.load(r)["systemInfo"]
    cpu_model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem_gib = round(int(next(l for l in open("/proc/meminfo") if l.startswith("MemTotal")).split()[1]) / 2**20)
    result["machine"] = {"cpus": os.cpu_count(), "cpu": cpu_model, "memory_gib": mem_gib,
                         "keycloak": si.get("version"), "java": si.get("javaVersion"),
                         "postgresql": psql(admin_db, "SHOW server_version")}
    git = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
    result["binary"] = {"commit": git("rev-parse", "--short", "HEAD"),
                        "uncommitted_src_changes": bool(git("status", "--porcelain", "--", "src")),
                        "built": time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(binary)))}
    log(f"Keycloak {si.get('version')} at {base} (java pid {java}); {os.cpu_count()} cpus, {cpu_model}")

    # The baseline: kc.sh export of an empty realm (JVM start, Quarkus boot, one realm written).
    empty = f"bench-kc-empty-{tag}"
    admin("POST", "", {"realm": empty, "enabled": True}, ok=(201,))
    realms.append(empty)
    result["export_baseline"] = export(empty, "dir")
    if result["export_baseline"].get("failed"):
        raise RuntimeError(f"kc.sh export of an empty realm failed: {result['export_baseline']['reason']}")
    log(f"export of an empty realm: {result['export_baseline']['seconds']:.1f} s")
    admin("DELETE", f"/{empty}")
    realms.remove(empty)

    realm = f"bench-kc-{tag}"
    admin("POST", "", dev_realm_as(realm), ok=(201,))
    realms.append(realm)
    have = 0  # bench users in the realm
    for size in sizes:
        t0 = time.monotonic()
        stopped = False
        while have < size:
            n = min(chunk, size - have)
            r = admin("POST", f"/{realm}/partialImport",
                      {"ifResourceExists": "SKIP", "users": [bench_user(i) for i in range(have, have + n)]})
            if r.get("added", n) != n:
                raise RuntimeError(f"partialImport added {r.get('added')} of {n}: {str(r)[:300]}")
            have += n
            if time.monotonic() - t0 > budget and have < size:
                stopped = True
                break
        took = time.monotonic() - t0
        count = admin("GET", f"/{realm}/users/count")
        imp = {"size": size, "reached": have, "seconds": took, "users_count": count,
               "users_per_second": (have - (result["imports"][-1]["reached"] if result["imports"] else 0)) / took if took else None}
        result["imports"].append(imp)
        log(f"partialImport up to {have} users: {took:.1f} s (users/count = {count})")
        if stopped:
            log(f"import stopped: {have} of {size} users after {took:.0f} s (budget {budget:.0f} s); larger sizes skipped")
            imp["stopped_by_budget"] = True
            break

        # cold: the first read of these users since they were imported, so Keycloak's caches are
        # cold too; noop: right after it, same database; warm: a second fresh database, with the
        # Keycloak that has just served the listing twice.
        fresh = []
        for k in ("a", "b"):
            db = f"bench_kc_{size}_{k}_{tag}"
            psql(admin_db, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            psql(admin_db, f"CREATE DATABASE {db}")
            dbs.append(db)
            fresh.append(db)
        cold = seedkeeper(realm, fresh[0])
        log(f"{size}: cold {cold['seconds']:.2f} s, {cold['requests']} requests, {cold['warnings']} warnings")
        before = tuples_written(fresh[0])
        noop = seedkeeper(realm, fresh[0])
        noop["tuples_written"] = tuples_written(fresh[0]) - before
        if cold.get("failed"):
            noop["not_a_noop"] = "the cold run before it failed, so this run had the whole realm to write"
        log(f"{size}: no-op {noop['seconds']:.2f} s, {noop['requests']} requests, {noop['warnings']} warnings")
        warm = seedkeeper(realm, fresh[1])
        log(f"{size}: cold on a warm Keycloak {warm['seconds']:.2f} s, {warm['requests']} requests")
        # The no-op again, on the warm cold run's database: the first no-op follows the first read
        # of the users, so Keycloak is still warming up for it.
        before = tuples_written(fresh[1])
        warm_noop = seedkeeper(realm, fresh[1])
        warm_noop["tuples_written"] = tuples_written(fresh[1]) - before
        log(f"{size}: no-op on a warm Keycloak {warm_noop['seconds']:.2f} s, {warm_noop['requests']} requests")
        # Right after seedkeeper's runs, so that Keycloak is as warm for it as for them.
        fetch = fetch_pages(realm, count)
        log(f"{size}: plain fetch of every page {fetch['seconds']:.2f} s ({fetch['users']} users, {fetch['requests']} requests)")
        # Keycloak warmed up by fetches (6 at least) until the last three agree within 5 %.
        warmup = [fetch["seconds"]]
        while len(warmup) < 20 and (len(warmup) < 6 or max(warmup[-3:]) > 1.05 * min(warmup[-3:])):
            warmup.append(fetch_pages(realm, count)["seconds"])
        log(f"{size}: Keycloak warmed up by {len(warmup)} fetches: " + ", ".join(f"{x:.2f}" for x in warmup))
        # Interleaved rounds: a plain fetch, a warm no-op, a warm cold run (its own database).
        samples = {"fetch": [], "noop_warm_keycloak": [], "cold_warm_keycloak": [], "warmup": warmup,
                   "cpu": {"fetch": [], "noop_warm_keycloak": [], "cold_warm_keycloak": []}}
        for r in range(rounds):
            m0 = machine_cpu()
            samples["fetch"].append(fetch_pages(realm, count)["seconds"])
            samples["cpu"]["fetch"].append(machine_cpu() - m0)
            noop_again = seedkeeper(realm, fresh[1])
            samples["noop_warm_keycloak"].append(noop_again["seconds"])
            samples["cpu"]["noop_warm_keycloak"].append(noop_again["machine_cpu_seconds"])
            db = f"bench_kc_{size}_r{r}_{tag}"
            psql(admin_db, f"CREATE DATABASE {db}")
            dbs.append(db)
            again = seedkeeper(realm, db)
            samples["cold_warm_keycloak"].append(again["seconds"] if not again.get("failed") else float("inf"))
            samples["cpu"]["cold_warm_keycloak"].append(again["machine_cpu_seconds"])
            psql(admin_db, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            dbs.remove(db)
            log(f"{size}: round {r + 1} of {rounds}: plain fetch {samples['fetch'][-1]:.2f} s, "
                f"no-op {samples['noop_warm_keycloak'][-1]:.2f} s, cold {samples['cold_warm_keycloak'][-1]:.2f} s")
        for db in fresh:
            psql(admin_db, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            dbs.remove(db)
        exp = export(realm, "dir")
        if exp.get("failed"):
            raise RuntimeError(f"kc.sh export --dir of {size} users failed: {exp['reason']}")
        if exp["users"] < size:
            raise RuntimeError(f"the export holds {exp['users']} users, expected at least {size}")
        log(f"{size}: kc.sh export --dir {exp['seconds']:.1f} s ({exp['users']} users in {exp['files']} files)")
        file_exp = None
        if size <= file_export_max:
            file_exp = export(realm, "file")
            log(f"{size}: kc.sh export --file {file_exp['seconds']:.1f} s"
                + (f" FAILED: {file_exp['reason']}" if file_exp.get("failed") else ""))
        listed = cold["counts"].get("identities", {}).get("listed")
        result["runs"].append({"users": size, "identities_listed": listed, "cold": cold, "noop": noop,
                               "cold_warm_keycloak": warm, "export": exp, "export_file": file_exp,
                               "noop_warm_keycloak": warm_noop, "fetch": fetch, "rounds": samples})
        save()  # each size as soon as it is measured
finally:
    for r in list(realms):
        try:
            admin("DELETE", f"/{r}")
        except Exception as e:  # noqa: BLE001 - best effort, reported
            log(f"could not delete realm {r}: {e}")
    for d in dbs:
        subprocess.run(["psql", "-w", "-Atqc", f"DROP DATABASE IF EXISTS {d} WITH (FORCE)", admin_db], capture_output=True)
    shutil.rmtree(work, ignore_errors=True)

# --- the report -----------------------------------------------------------------------------
base_export = result["export_baseline"]["seconds"]
rows = []
for run in result["runs"]:
    exp = run["export"]["seconds"]
    net = exp - base_export
    for phase, target in (("cold", 1.0), ("noop", 0.5), ("cold_warm_keycloak", 1.0)):
        m = run[phase]
        m["x_export"] = m["seconds"] / exp
        m["x_export_net"] = m["seconds"] / net if net > 0 else None
        m["target_x_export"] = target
        m["met"] = m["x_export"] <= target and not m.get("failed")
        label = {"cold": "seedkeeper cold", "noop": "seedkeeper no-op",
                 "cold_warm_keycloak": "seedkeeper cold, warm Keycloak"}[phase]
        if m.get("not_a_noop"):
            label = "seedkeeper second run (cold failed: not a no-op)"
        if m.get("failed"):
            label += f" (FAILED: {m['reason'][:160]})"
        rows.append((run["users"], label, m["seconds"],
                     f"{m['x_export']:.3f}", f"{m['x_export_net']:.3f}" if m["x_export_net"] else "-",
                     f"≤ {target}: " + ("FAILED run" if m.get("failed") else "met" if m["met"] else "NOT met"), m["requests"] if m["requests"] is not None else "?",
                     f"{m['keycloak_cpu_seconds']:.2f}",
                     f"{m['seedkeeper_cpu_seconds']:.2f}" if m.get("seedkeeper_cpu_seconds") is not None else "-", m["warnings"], f"{m['peak_rss_kib'] / 1024:.1f}" if m["peak_rss_kib"] else "-",
                     "-" if m.get("not_a_noop") else m.get("tuples_written", "-")))
    rows.append((run["users"], "kc.sh export --dir", exp, "1.000", f"{exp / net:.3f}" if net > 0 else "-", "-", "-",
                 f"{run['export']['cpu_seconds']:.2f}" if run["export"]["cpu_seconds"] is not None else "-", "-", "-", "-", "-"))
    fe = run.get("export_file")
    if fe:
        rows.append((run["users"], "kc.sh export --file" + (" (FAILED: " + fe["reason"] + ")" if fe.get("failed") else ""),
                     fe["seconds"], f"{fe['seconds'] / exp:.3f}" if fe["seconds"] else "-", "-", "-", "-",
                     f"{fe['cpu_seconds']:.2f}" if fe.get("cpu_seconds") is not None else "-", "-", "-", "-", "-"))
# Against the plain fetch of every page (Keycloak warm): a warm cold run within 1.3x of it and
# a no-op within 1.1x, medians over the rounds.
def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2


def spread(xs):
    return f"{min(xs):.2f} to {max(xs):.2f}"


cores = os.cpu_count() or 1


def cpu_bound(samples, phase, f):
    """The machine's median busy CPU in `phase` over its cores, against the fetch's median
    time: the ratio of a run that kept every core busy throughout."""
    busy = median(samples["cpu"][phase])
    return f"{busy:.2f}", f"{busy / cores / f:.2f}"


fetch_rows = []
for run in result["runs"]:
    samples = run["rounds"]
    f = median(samples["fetch"])
    run["fetch"]["median_seconds"] = f
    for phase, label, target in (("cold_warm_keycloak", "seedkeeper cold, warm Keycloak", 1.3),
                                 ("noop_warm_keycloak", "seedkeeper no-op, warm Keycloak", 1.1)):
        m = run[phase]
        s = median(samples[phase])
        m["median_seconds"], m["x_fetch"], m["target_x_fetch"] = s, s / f, target
        met = m["x_fetch"] <= target and not m.get("failed")
        fetch_rows.append((run["users"], label, s, spread(samples[phase]), f"{m['x_fetch']:.2f}",
                           f"≤ {target}: " + ("met" if met else "NOT met"), *cpu_bound(samples, phase, f)))
    m = run["noop"]
    m["x_fetch"] = m["seconds"] / f
    fetch_rows.append((run["users"], "seedkeeper no-op right after the first cold run (one run)", m["seconds"], "-",
                       f"{m['x_fetch']:.2f}", "-", "-", "-"))
    fetch_rows.append((run["users"], f"plain fetch of every page ({run['fetch']['requests']} requests, "
                       f"{run['fetch']['in_flight']} in flight)", f, spread(samples["fetch"]), "1.00", "-",
                       *cpu_bound(samples, "fetch", f)))
rows.append((0, "kc.sh export --dir (empty realm)", base_export, "-", "-", "-", "-",
             f"{result['export_baseline']['cpu_seconds']:.2f}" if result["export_baseline"]["cpu_seconds"] is not None else "-", "-", "-", "-", "-"))

hdr = ("users", "run", "seconds", "x export", "x export-baseline", "target", "requests", "Keycloak CPU s", "seedkeeper CPU s", "retries/warnings", "peak RSS MiB", "tuples written")
print()
print("| " + " | ".join(hdr) + " |")
print("|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
for r in rows:
    print("| " + " | ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in r) + " |")
print()
print(f"| users | run | median s ({rounds} rounds) | range s | x plain fetch | target | machine busy CPU s | CPU-bound x |")
print("|---:|---|---:|---|---:|---|---:|---:|")
for r in fetch_rows:
    print("| " + " | ".join(f"{x:.3f}" if isinstance(x, float) else str(x) for x in r) + " |")
print()
prev = 0
for imp in result["imports"]:
    print(f"bulk creation (partialImport, chunks of {chunk}) from {prev} to {imp['reached']} users: {imp['seconds']:.1f} s"
          + (f" ({imp['users_per_second']:.0f} users/s)" if imp["users_per_second"] else "")
          + ("; STOPPED by the time budget" if imp.get("stopped_by_budget") else ""))
    prev = imp["reached"]
print("Keycloak CPU s: utime+stime of the server's java process during the run (for kc.sh export: "
      "the CPU of the export's own JVM). x export: against the full time of kc.sh export --dir (the target); "
      "x export-baseline: against that time minus an empty realm's export. cold: the first read of "
      "the users since their import (Keycloak's caches cold); cold, warm Keycloak: a second fresh database "
      "right after. retries/warnings: seedkeeper's WARN lines (most retries log one; a body cut off "
      "mid-read is retried without one). machine busy CPU s: every core's busy time during the "
      f"measure (median over the rounds); CPU-bound x: that over the {cores} cores, against the plain "
      "fetch's median time, the ratio of a run that kept every core busy from start to end.")
save()
print(f"JSON: {json_out}")
missing = [s for s in sizes if s not in {r["users"] for r in result["runs"]}]
if missing:
    print(f"sizes not measured (import budget): {missing}")
PY
