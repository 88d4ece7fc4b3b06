#!/usr/bin/env bash
# Makes the workdirs that docs/results.md is generated from: for each config, the main
# job and every experiment on it (jsd runs its own main jobs). Configs run side by side,
# one process chain each; a chain's output goes to <root>/<config>.log.
#
#   launch/reproduce.sh <root> [config ...]   # default: wordfreq digits synthetic jsd
#   python3 launch/report.py --workdirs=<root>/wordfreq,<root>/digits,... --out=docs
#
# Extra flags for every launcher (e.g. --config.data_dir=/data/tfds) go in RG_FLAGS.
# RG_JOBS=N runs up to N of a config's experiments at a time once its main job is done
# (default 1: one after the other, and the chain stops at the first that fails; side by
# side, all run and the chain fails after them, naming each that failed). A run holds
# its workdir's lock, so each runs in its own whole copy of the main job's workdir,
# <root>/parallel/<config>.<experiment> (disk: N copies of the workdir, checkpoints
# included), its output in <root>/<config>.<experiment>.log; its files are moved into
# the main workdir's experiments/ when it ends (a failed one's copy stays). The commands
# the experiments record name their copies, which are gone: rerun one with the main
# workdir. The experiments only read the main job; on a GPU, processes side by side may
# be given other kernels than one alone, as runs on other machines may. Meant for the
# small configs on an accelerator, whose models leave it idle between steps (one H200:
# the digits and synthetic chains side by side with N = 5 reached 8 and 9 of their 9
# experiments in 340 s, one at a time 5 and 5 in 390 s); each process takes GPU memory
# as it needs it, not 75% of it at once.
set -euo pipefail
root=${1:?usage: launch/reproduce.sh <root> [config ...]}
shift
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(wordfreq digits synthetic jsd)
# Most telling first, so a run cut short by a time limit has them.
experiments=(convergence ema prune mixtures prior gate_size extend conflict)
# Experiments of some configs only, after the shared ones: the sequence-level gate on the
# Markov chains and digits (docs/math.md §2.2); on the source files, students of 1×, 2×
# and 4× an expert, and the main job's student against the same-size models over seeds
# (docs/math.md §5).
declare -A only=(
  [synthetic]="sequence_gate" [digits]="sequence_gate"
  [source_small]="student_size student_seeds" [source_h200]="student_size student_seeds"
)
# Settings of an experiment on one config (launch/experiment.py --setting=NAME=VALUE).
# source_h200's 4× student at the monolithic model's batch of 5 × 128 asks for one
# 77 GiB buffer, over one H200's 105 GiB with the rest (BUILD_NOTES, "Session 17"): half
# the batch for twice the steps, the same tokens.
declare -A settings=(
  [source_h200.student_size]="--setting=per_domain=64 --setting=steps=1000"
)
[[ ${RG_JOBS:-1} =~ ^[1-9][0-9]*$ ]] || { echo "reproduce: RG_JOBS must be a positive integer, got '${RG_JOBS}'" >&2; exit 2; }
cd "$(dirname "$0")/.."
mkdir -p "$root"
# The chains compile many identical programs (a gate game per experiment point):
# jax's persistent compilation cache lets each compile once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$root/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
# A size limit turns on jax's file lock around every cache read and write: the chains
# share one cache, and without it jax writes an entry in place and reads it unlocked.
export JAX_COMPILATION_CACHE_MAX_SIZE=${JAX_COMPILATION_CACHE_MAX_SIZE:-17179869184}
# Chains and experiments side by side on one GPU: each allocates as it needs.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}

chain() {
  local name=$1 config=launch/configs/$1.py workdir=$root/$1
  # shellcheck disable=SC2086  # RG_FLAGS is a list of flags
  if [ "$name" = jsd ]; then
    [ -e "$workdir/experiments/jsd.json" ] && return
    python3 launch/experiment.py --experiment=jsd --config="$config" --workdir="$workdir" ${RG_FLAGS:-}
    return
  fi
  python3 launch/main.py --config="$config" --workdir="$workdir" ${RG_FLAGS:-}
  # shellcheck disable=SC2206  # only[...] is a list of names
  local own=(${only[$name]:-}) at_once=${RG_JOBS:-1} started=() failed=0
  for e in "${experiments[@]}" ${own[@]+"${own[@]}"}; do
    # An experiment already written is kept: started again, the script continues.
    [ -e "$workdir/experiments/$e.json" ] && continue
    if [ "$at_once" -eq 1 ]; then
      # shellcheck disable=SC2086  # settings[...] is a list of flags
      python3 launch/experiment.py --experiment="$e" --config="$config" --workdir="$workdir" \
        ${settings[$name.$e]:-} ${RG_FLAGS:-}
      continue
    fi
    while [ "$(jobs -rp | wc -l)" -ge "$at_once" ]; do wait -n || true; done
    rm -f "$root/$name.$e.rc"
    {
      rc=0 copy=$root/parallel/$name.$e
      rm -rf "$copy" && mkdir -p "$root/parallel" && cp -a "$workdir" "$copy"
      # shellcheck disable=SC2086  # settings[...] is a list of flags
      python3 launch/experiment.py --experiment="$e" --config="$config" --workdir="$copy" \
        ${settings[$name.$e]:-} ${RG_FLAGS:-} >"$root/$name.$e.log" 2>&1 || rc=$?
      if [ $rc = 0 ]; then
        # Moved (a rename on one filesystem), the JSON last: it is the mark of a finished
        # experiment that a rerun skips, so it never stands beside a missing figure.
        {
          mkdir -p "$workdir/experiments" && shopt -s nullglob \
            && for f in "$copy/experiments/$e".*; do [ "${f##*.}" = json ] || mv "$f" "$workdir/experiments/"; done \
            && mv "$copy/experiments/$e.json" "$workdir/experiments/" && rm -rf "$copy"
        } || rc=1
      fi
      echo $rc >"$root/$name.$e.rc"
    } &
    started+=("$e")
  done
  wait
  for e in ${started[@]+"${started[@]}"}; do
    [ "$(cat "$root/$name.$e.rc" 2>/dev/null)" = 0 ] || { echo "reproduce: $name $e failed" >&2; failed=1; }
  done
  return $failed
}

pids=()
for name in "${configs[@]}"; do
  chain "$name" >"$root/$name.log" 2>&1 &
  pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "reproduce: ${configs[$i]} failed; see $root/${configs[$i]}.log" >&2
    status=1
  fi
done
exit $status
