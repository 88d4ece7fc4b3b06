#!/usr/bin/env bash
# Packs what the pages read from the workdirs under /tmp/rg (results and experiment
# JSON, figures, each model's provenance.json, the time tables) and the chain's logs
# into $OUT/res.tgz; no checkpoints or caches.
cd /tmp || exit 1
find rg \( -path '*/parallel' -o -path '*/tfds' \) -prune -o -type f \( -name '*.json' -o -name '*.png' -o -name '*.md' \
  -o -name '*.jsonl' \) -not -path '*/checkpoints/*' -not -path '*/cache*' -print >/tmp/pack.list
tar czf "${OUT:-/tmp}/res.tgz" -T /tmp/pack.list logs && ls -l "${OUT:-/tmp}/res.tgz"
