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
# (default 1: one after the other). A run holds its workdir's lock, so each of them runs
# in its own copy of the main job's workdir, <root>/parallel/<config>.<experiment> (its
# output in <root>/<config>.<experiment>.log), and its files are copied back into
# experiments/ when it ends; the commands it records name the copy. The experiments
# only read the main job, so the results are those of runs one at a time. Worth it on
# an accelerator, where small models leave the device idle between steps.
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
cd "$(dirname "$0")/.."
mkdir -p "$root"
# The chains compile many identical programs (a gate game per experiment point):
# jax's persistent compilation cache lets each compile once.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$root/jax_cache}
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=${JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS:-0}
# A size limit turns on jax's file lock around every cache read and write: the chains
# share one cache, and without it jax writes an entry in place and reads it unlocked.
export JAX_COMPILATION_CACHE_MAX_SIZE=${JAX_COMPILATION_CACHE_MAX_SIZE:-17179869184}

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
  local own=(${only[$name]:-}) jobs=${RG_JOBS:-1} started=()
  for e in "${experiments[@]}" ${own[@]+"${own[@]}"}; do
    # An experiment already written is kept: started again, the script continues.
    [ -e "$workdir/experiments/$e.json" ] && continue
    if [ "$jobs" -le 1 ]; then
      python3 launch/experiment.py --experiment="$e" --config="$config" --workdir="$workdir" ${RG_FLAGS:-}
      continue
    fi
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    rm -f "$root/$name.$e.rc"
    {
      rc=0 copy=$root/parallel/$name.$e
      rm -rf "$copy" && mkdir -p "$root/parallel" && cp -a "$workdir" "$copy"
      python3 launch/experiment.py --experiment="$e" --config="$config" --workdir="$copy" \
        ${RG_FLAGS:-} >"$root/$name.$e.log" 2>&1 || rc=$?
      if [ $rc = 0 ]; then
        { mkdir -p "$workdir/experiments" && cp -a "$copy/experiments/$e".* "$workdir/experiments/" && rm -rf "$copy"; } || rc=1
      fi
      echo $rc >"$root/$name.$e.rc"
    } &
    started+=("$e")
  done
  wait
  for e in ${started[@]+"${started[@]}"}; do
    [ "$(cat "$root/$name.$e.rc" 2>/dev/null)" = 0 ] || { echo "reproduce: $name $e failed" >&2; return 1; }
  done
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
