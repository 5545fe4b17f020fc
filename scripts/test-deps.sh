#!/usr/bin/env bash
# What the test suite runs besides cargo, installed from Debian's packages when missing: the one
# setup step of both `make test` (scripts/test.sh) and CI (.ci/run), so they cannot diverge.
#
#   postgresql, postgresql-client   the database of every test (scripts/local-db.sh starts one)
#   openjdk-17-jre-headless, maven, unzip, curl
#                                   the real Keycloak (scripts/keycloak.sh fetches and runs it)
#   python3, openssl, make, systemd (systemd-analyze)
#                                   the pty relay of tests/it/progress.rs and the deploy checks,
#                                   the TLS tests, tests/it/ops.rs, the unit check
#   pgbouncer                       tests/it/pooler.rs starts its own on a free port
#   prometheus (and its promtool)   tests/it/dashboard.rs runs one; tests/it/signals.rs lints
#                                   /metrics with promtool
#   time (/usr/bin/time)            tests/it/memory.rs reads a run's peak RSS with it
#
# Packages whose postinst would start a service (pgbouncer, prometheus) are installed under a
# policy-rc.d that answers 101, Debian's way to say "start no service", removed again after.
# Nothing missing: nothing done. Something missing and not root: exit 1 with the one command to
# run. Tests that need one of these fail naming the package; none skips itself.
set -euo pipefail

need=()
command -v psql >/dev/null 2>&1 || need+=(postgresql postgresql-client)
command -v java >/dev/null 2>&1 || ls /usr/lib/jvm/*/bin/java >/dev/null 2>&1 || need+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || need+=(maven)
command -v unzip >/dev/null 2>&1 || need+=(unzip)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v python3 >/dev/null 2>&1 || need+=(python3)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v make >/dev/null 2>&1 || need+=(make)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
[[ -x /usr/sbin/pgbouncer ]] || command -v pgbouncer >/dev/null 2>&1 || need+=(pgbouncer)
[[ -x /usr/bin/prometheus ]] || command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
[[ -x /usr/bin/time ]] || need+=(time)

if (( ${#need[@]} == 0 )); then
    exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
    echo "test-deps: missing ${need[*]}; install them once with: sudo bash scripts/test-deps.sh" >&2
    exit 1
fi
echo "test-deps: installing ${need[*]}" >&2
own_policy=""
if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    own_policy=1
fi
rc=0
{ apt-cache show "${need[@]}" >/dev/null 2>&1 || apt-get update -qq; } \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || rc=$?
if [[ -n "$own_policy" ]]; then rm -f /usr/sbin/policy-rc.d; fi
if (( rc != 0 )); then
    echo "test-deps: installing ${need[*]} failed (apt-get exit $rc)" >&2
    exit 1
fi
