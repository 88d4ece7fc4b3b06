#!/usr/bin/env bash
# Waits up to N seconds for the chain (start.sh) to end, then prints its log and each
# step's tail and packs the results into $OUT/res.tgz (pack.sh). Its exit status is the
# chain's once it has ended, 0 while it runs.
#   bash .dev/wait.sh N
n=${1:?usage: wait.sh SECONDS}
[ -e /tmp/logs/chain.log ] || { echo "wait: no chain on this machine (a fresh one?)"; exit 1; }
end=$(( $(date +%s) + n ))
while [ ! -e /tmp/logs/rc ] && [ "$(date +%s)" -lt "$end" ]; do sleep 5; done
cat /tmp/logs/chain.log
for f in /tmp/logs/[0-9]*.log; do echo "== $f"; tail -n 8 "$f"; done
[ -e /tmp/logs/rc ] && echo "wait: chain ended, rc=$(cat /tmp/logs/rc)" || echo "wait: chain still running"
bash "$(dirname "$0")/pack.sh"
exit "$(cat /tmp/logs/rc 2>/dev/null || echo 0)"
