#!/usr/bin/env bash
# Offline checks of the deployment files: scripts/deploy_checks/test_deploy.py, one test per rule
# (what each checks is its docstring). This script only provides what the tests run:
#   - python3 >= 3.11 with PyYAML, and the schema validators check-jsonschema (compose-spec) and
#     kubernetes-validate (Kubernetes 1.37), in .ci/venv, installed from PyPI once;
#   - the seedkeeper binary that judges config keys (target/debug/seedkeeper, built if missing);
#   - promtool, kubectl and systemd-analyze from the PATH (scripts/test-deps.sh installs them).
# A tool that cannot be had fails its checks, unless SEEDKEEPER_CHECK_DEPLOY_OFFLINE=1 says to skip
# them knowingly. SEEDKEEPER_CHECK_DEPLOY_DOCKER=1 (CI) makes a missing Docker engine a failure.
#
#   bash scripts/check-deploy.sh       # one line per check, a summary, exit 1 when one failed
#   bash scripts/check-deploy.sh -k systemd   # arguments go to unittest (here: only the systemd rules)
set -euo pipefail
cd "$(dirname "$0")/.."

venv=.ci/venv
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
if ! "$venv/bin/python" -c 'import yaml, tomllib, check_jsonschema, kubernetes_validate' 2>/dev/null; then
    "$venv/bin/pip" install --quiet --disable-pip-version-check --retries 1 --timeout 15 \
        'pyyaml==6.0.*' 'check-jsonschema==0.39.*' 'kubernetes-validate==1.37.*' >&2 \
        || echo "check-deploy: pip install into $venv failed; the schema checks will say so" >&2
fi
[[ -x target/debug/seedkeeper ]] || cargo build --quiet --bin seedkeeper

export SEEDKEEPER_BIN=target/debug/seedkeeper PROMTOOL="$(command -v promtool || true)"
export CHECK_JSONSCHEMA="$venv/bin/check-jsonschema" KUBERNETES_VALIDATE="$venv/bin/kubernetes-validate"
[[ -x "$CHECK_JSONSCHEMA" ]] || CHECK_JSONSCHEMA=""
[[ -x "$KUBERNETES_VALIDATE" ]] || KUBERNETES_VALIDATE=""
if (( $# )); then
    exec "$venv/bin/python" -m unittest scripts/deploy_checks/test_deploy.py "$@"
fi
exec "$venv/bin/python" scripts/deploy_checks/test_deploy.py
