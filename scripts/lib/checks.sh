# One line per check with its wall time, for scripts/image-test.sh and scripts/stack-test.sh
# (sourced): `t=$(now)`, then `ok "$t" "what"` or `fail "$t" "what" "detail"`; `$failed` counts
# the failures for the script's exit status.
failed=0
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
ok() { echo "ok   [$(secs "$1" "$(now)") s] $2"; }
fail() {
    echo "FAIL [$(secs "$1" "$(now)") s] $2"
    [[ -z "${3:-}" ]] || printf '%s\n' "$3" | sed 's/^/       /'
    failed=$((failed + 1))
}
