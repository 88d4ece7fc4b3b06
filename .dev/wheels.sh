#!/usr/bin/env bash
# Here, from the repository root: builds the two ignored folders the device's commands
# carry (`carry: [".whl", ".wfqs_min", ".dev/COMMIT"]`): .whl, the wheels of what the
# device's image lacks (tensorflow-datasets and its needs; Python 3.12, x86-64), and
# .wfqs_min, wordfreq with its small lists only, which the configs' checks import (the
# wordfreq dataset itself is prepared here, where wordfreq's large lists are).
set -euo pipefail
plat=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_31 manylinux_2_17 manylinux2014 manylinux1; do
  plat+=(--platform "${p}_x86_64")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${plat[@]}" -d .whl tensorflow-datasets==4.9.10 array_record==0.8.6 dm-tree==0.1.10 \
  immutabledict==4.3.1 simple_parsing==0.1.9 docstring-parser==0.18.0 tensorflow-metadata==1.21.0 \
  googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2 ml_collections==1.1.0 \
  importlib_resources==7.1.0
python3 -m pip wheel -q --no-deps promise==2.3 -w .whl  # no wheel on PyPI
python3 -m pip install -q --no-deps --no-compile --target .wfqs_min wordfreq==3.1.1 ftfy==6.3.1 \
  langcodes==3.5.1 locate==1.1.1 wcwidth==0.9.4
find .wfqs_min/wordfreq/data -type f ! -regex '.*/small_\(en\|de\|fr\|es\|fi\|pl\)\.msgpack\.gz' -delete
du -sh .whl .wfqs_min
