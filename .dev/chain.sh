#!/usr/bin/env bash
# Runs PLAN's lines one after the other (a line: one shell command; blank lines and #
# comments skipped), each's output in /tmp/logs/NN.log, its stdin empty; stops at the
# first that fails. Writes its exit status to /tmp/logs/rc at the end.
plan=$1 n=0 rc=0
[ -r "$plan" ] || { echo "chain: no plan $plan"; echo 1 >/tmp/logs/rc; exit 1; }
t0=$(date +%s)
while IFS= read -r line || [ -n "$line" ]; do
  [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
  n=$((n + 1)) && log=$(printf '/tmp/logs/%02d.log' $n) && s=$(date +%s)
  echo "[$(( s - t0 ))s] step $n: $line"
  bash -c "$line" </dev/null >"$log" 2>&1 || rc=$?
  echo "[$(( $(date +%s) - t0 ))s] step $n: rc=$rc, $(( $(date +%s) - s )) s"
  [ $rc = 0 ] || break
done <"$plan"
echo $rc >/tmp/logs/rc
