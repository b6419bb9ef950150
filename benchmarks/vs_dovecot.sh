#!/bin/bash
# qmailtx vs a private Dovecot, POP3 download (LIST, RETR+DELE of every
# message, QUIT), in one invocation of the shared harness
# (../shared/bench/pop3_throughput.sh, seen from the checkout; trials
# alternate Dovecot, qmailtx, Dovecot, ...).
#
#   bash benchmarks/vs_dovecot.sh [SIZE] [harness options]
#
# SIZE             payload bytes per message; default 1024
# harness options  passed on to the shared driver, e.g. -n 1000 -r 5,
#                  --pop-client raw, --json FILE (default
#                  /tmp/qmailtx-bench.jsonl, appended), --log FILE
# environment      BENCH=../shared/bench (relative to the checkout)
#                  BENCH_REF=none to run qmailtx alone
#                  BENCH_QUOTA=10GB gives the bench user a Maildir++ quota
#                    (deletions then also go to maildirsize)
#
# Uses benchmarks/bench.toml: POP3 on 127.0.0.1:2641, data in
# /tmp/bench-qmailtx (wiped at the start: it is scratch). The bench user
# bench@bench.test (password "bench") is made with qmailctl, so its password
# is stored as qmailctl stores every password (scrypt); Dovecot's reference
# compares a plain static password.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
case "${1:-}" in -h|--help) awk 'NR>1{if(/^#/)print; else exit}' "$0"; exit 2 ;; esac
SIZE=1024
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then SIZE=$1; shift; fi

BENCH=${BENCH:-../shared/bench}
DATA=/tmp/bench-qmailtx
MD=$DATA/domains/bench.test/bench/Maildir
QTX="$ROOT/.venv/bin/twistd -n --pidfile= qmailtx --config $ROOT/benchmarks/bench.toml"

json=(--json /tmp/qmailtx-bench.jsonl)
for a in "$@"; do
    case $a in --json|--json=*) json=() ;; esac
done

rm -rf -- "$DATA"
CTL=("$ROOT/.venv/bin/qmailctl" --config "$ROOT/benchmarks/bench.toml")
quota=()
[ -n "${BENCH_QUOTA:-}" ] && quota=(--quota "$BENCH_QUOTA")
"${CTL[@]}" domain add bench.test
echo bench | "${CTL[@]}" user add bench@bench.test --password-stdin "${quota[@]}"

exec bash "$BENCH/pop3_throughput.sh" "$QTX" 2641 "$MD" -l "$SIZE" \
    --user bench@bench.test --password bench --label qmailtx "${json[@]}" "$@"
