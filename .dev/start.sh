#!/usr/bin/env bash
# On the device, from the repository root: copies the tree to /tmp/repo (a later call's
# sync cannot then change a running job's files) and starts chain.sh on PLAN there,
# detached (setsid), so that it runs on between `run` calls while the machine is warm.
#   bash .dev/start.sh .dev/plans/NAME.sh
set -eu
plan=${1:?usage: start.sh PLAN}
[ -r "$plan" ] || { echo "start: no plan $plan"; exit 1; }
[ -e /tmp/logs/chain.log ] && { echo "start: a chain already ran on this machine"; exit 1; }
rm -rf /tmp/repo && cp -a . /tmp/repo && cd /tmp/repo
# shellcheck disable=SC1091
source .dev/env.sh
mkdir -p /tmp/logs /tmp/rg
setsid nohup bash .dev/chain.sh "$plan" >/tmp/logs/chain.log 2>&1 </dev/null &
echo "start: chain on $plan at commit $ROBUST_GATE_COMMIT"
