#!/usr/bin/env bash
# Downloads the wheels bench/gpu_check.sh and bench/gpu_crash_check.sh install on the device machine (Python 3.12 there).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform any -d .whl cpm_kernels==1.0.11 "setuptools==81.*" tqdm==4.70.1
ls .whl
# bench/gpu_scale_check.sh runs the stages themselves: Luigi, h5py, matplotlib and scikit-learn with
# their dependencies (torch and numpy come with the device's image)
python3 -m pip download -q --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
    luigi h5py matplotlib scikit-learn 2>&1 | tail -3
rm -f .whl/numpy-*.whl
ls .whl
