#!/usr/bin/env bash
# `python3 -m pip install .` without network, in a virtual environment that sees the system's
# packages (Debian's python3 is externally managed; torch comes from python3-torch): the module of
# BUILD (MOE_CPP_BUILD_DIR, as setup.py allows) installed from SOURCE, then imported and used from
# another folder.
#   tests/python/test_pip_install.sh SOURCE BUILD WORK
set -euo pipefail
src=$1 build=$2 work=$3
rm -rf "$work"
mkdir -p "$work"
/usr/bin/python3 -m venv --system-site-packages "$work/venv"
MOE_CPP_BUILD_DIR=$build "$work/venv/bin/python" -m pip install --no-index --quiet "$src"
cd "$work"
"$work/venv/bin/python" - <<'PY'
import moe_cpp, torch
assert moe_cpp.__file__.startswith(__import__("sys").prefix), moe_cpp.__file__
layer = moe_cpp.MoeLayer(d_model=16, d_ffn=32, n_experts=4, top_k=2)
y = layer(torch.randn(5, 16))
(y.sum() + layer.aux_loss).backward()
print("installed:", moe_cpp.__file__, tuple(y.shape))
PY
