# Sourced on the device machine from the tree's copy (start.sh): installs the carried
# wheels (.whl) into /tmp/site once, puts the package (src/) and the carried wordfreq
# (.wfqs_min) on the path, and states the commit the tree is, since no .git travels
# (.dev/COMMIT, written here by `git rev-parse HEAD > .dev/COMMIT` and carried).
if [ ! -e /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && touch /tmp/site/.done || return 1
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/.wfqs_min
ROBUST_GATE_COMMIT=$(cat .dev/COMMIT) && [ -n "$ROBUST_GATE_COMMIT" ] || { echo "env: no .dev/COMMIT"; return 1; }
export ROBUST_GATE_COMMIT
export PYTHONUNBUFFERED=1
# The wheels of googleapis-common-protos and tensorflow-metadata check the protobuf
# runtime at import; the image's may be older than they ask.
export TEMPORARILY_DISABLE_PROTOBUF_VERSION_CHECK=true
