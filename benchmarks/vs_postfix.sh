#!/bin/bash
# qmailtx vs a private Postfix, SMTP receive + delivery into a Maildir, in one
# invocation of the shared harness (../shared/bench/smtp_throughput.sh, seen
# from the checkout; trials alternate Postfix, qmailtx, Postfix, ...).
#
#   bash benchmarks/vs_postfix.sh [SIZE] [harness options]
#
# SIZE             payload bytes per message (smtp-source -l); default 1024
# harness options  passed on to the shared driver, e.g. -n 2000 -c 10 -r 5,
#                  -d (reuse connections), --json FILE (default
#                  /tmp/qmailtx-bench.jsonl, appended), --log FILE
# environment      BENCH=../shared/bench (relative to the checkout)
#                  BENCH_REF=none to run qmailtx alone
#                  BENCH_USER=folder (default): bench@bench.test is the plain
#                    folder of the control-file local domain bench.test;
#                  BENCH_USER=virtual: a user of the user database, made with
#                    qmailctl (domain add, user add) before the server starts;
#                  BENCH_USER=virtual-quota: the same with a 10GB Maildir++ quota
#
# Examples (as root, from anywhere):
#   bash benchmarks/vs_postfix.sh 1024   -n 2000 -c 10 -r 5
#   bash benchmarks/vs_postfix.sh 102400 -n 1000 -c 10 -r 5
#   python3 ../shared/bench/lib/summarize.py /tmp/qmailtx-bench.jsonl
#
# Uses benchmarks/bench.toml: SMTP on 127.0.0.1:2640, data in
# /tmp/bench-qmailtx (wiped at the start: it is scratch), the bench user's
# Maildir /tmp/bench-qmailtx/domains/bench.test/bench/Maildir (the same path
# for every BENCH_USER). The servers' output goes to /tmp/mtabench-server.log;
# after the run this script reports qmailtx errors found in it and anything
# left in the queue.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
case "${1:-}" in -h|--help) awk 'NR>1{if(/^#/)print; else exit}' "$0"; exit 2 ;; esac
SIZE=1024
if [ $# -gt 0 ] && [[ $1 =~ ^[0-9]+$ ]]; then SIZE=$1; shift; fi

BENCH=${BENCH:-../shared/bench}
DATA=/tmp/bench-qmailtx
MD=$DATA/domains/bench.test/bench/Maildir
LOG=/tmp/mtabench-server.log
QTX="$ROOT/.venv/bin/twistd -n --pidfile= qmailtx --config $ROOT/benchmarks/bench.toml"

json=(--json /tmp/qmailtx-bench.jsonl)
for a in "$@"; do
    case $a in --json|--json=*) json=() ;; --log=*) LOG=${a#--log=} ;; esac
done
prev=
for a in "$@"; do [ "$prev" = --log ] && LOG=$a; prev=$a; done

# Scratch: start from an empty data folder (queue included) and the bench user.
rm -rf -- "$DATA"
CTL=("$ROOT/.venv/bin/qmailctl" --config "$ROOT/benchmarks/bench.toml")
LABEL=qmailtx
case ${BENCH_USER:=folder} in
folder) mkdir -p "$MD"/{tmp,new,cur} ;;
virtual | virtual-quota)
    LABEL=qmailtx-$BENCH_USER
    quota=()
    [ "$BENCH_USER" = virtual-quota ] && quota=(--quota 10GB)
    "${CTL[@]}" domain add bench.test
    echo bench | "${CTL[@]}" user add bench@bench.test --password-stdin "${quota[@]}"
    ;;
*) echo "BENCH_USER must be folder, virtual or virtual-quota, not $BENCH_USER" >&2; exit 2 ;;
esac
logStart=$(stat -c %s "$LOG" 2>/dev/null || echo 0)

status=0
bash "$BENCH/smtp_throughput.sh" "$QTX" 2640 "$MD" -l "$SIZE" --label "$LABEL" \
    "${json[@]}" "$@" || status=$?

# After the run: qmailtx errors in its log, messages left in its queue.
errors=$(tail -c +"$((logStart + 1))" "$LOG" 2>/dev/null |
    grep -E 'Traceback|Unhandled|#(error|critical|warn)\]' | sed 's/^[0-9T:+-]* //' |
    sort | uniq -c | sort -rn | head -20 || true)
if [ -n "$errors" ]; then
    echo "qmailtx: errors or warnings in $LOG during this run (count, line):"
    echo "$errors"
fi
left=$(find "$DATA/queue/tmp" "$DATA/queue/mess" -type f 2>/dev/null | wc -l)
[ "$left" -gt 0 ] && echo "qmailtx: $left file(s) left in $DATA/queue after the last trial"
exit "$status"
