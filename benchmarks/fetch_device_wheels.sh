#!/usr/bin/env bash
# Download, here (where pip reaches a registry), the wheels the GPU machine lacks into .whl/
# (git-ignored), for its Python 3.12 on x86-64 Linux, then check from each wheel's METADATA that
# every requirement is either one of these wheels or a package the device image already has.
# Run from the repository root:  bash benchmarks/fetch_device_wheels.sh
# Then carry ".whl" with the device call; benchmarks/gpu_check.sh installs them (see docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
WHL=${WHL_DIR:-.whl}
# The packages the device image lacks (../shared/device-wheels.md; /work/.library/device/KINDS.md),
# with their own missing requirements: zarr needs donfig, numcodecs, google-crc32c; open_clip_torch
# needs ftfy, which needs wcwidth. Pinned to the versions this project is tested with here.
WHEELS=(zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.7.1
        open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.2.13 gguf==0.19.0)
mkdir -p "$WHL"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$WHL" "${WHEELS[@]}"

# Requirements check: each wheel's unconditional Requires-Dist (and those for python 3.12 on
# Linux) must be a wheel here or a package of the device image (KINDS.md, read 2026-11-17).
python3 - "$WHL" <<'PY'
import re, sys, zipfile
from pathlib import Path

from packaging.requirements import Requirement

DEVICE_HAS = set("""accelerate numpy packaging pyyaml regex requests safetensors timm tokenizers
torch torchvision tqdm transformers typing-extensions huggingface-hub pillow protobuf sentencepiece
h5py typer rich scipy pytest matplotlib fsspec filelock""".split())
canon = lambda n: re.sub(r"[-_.]+", "-", n).lower()
wheels = sorted(Path(sys.argv[1]).glob("*.whl"))
have = {canon(w.name.split("-")[0]) for w in wheels}
names = [canon(w.name.split("-")[0]) for w in wheels]
dupes = sorted({n for n in names if names.count(n) > 1})
if dupes:
    sys.exit(f"two versions of {dupes} in {sys.argv[1]}: keep one (pip refuses to install both)")
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
missing = []
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is not None and not req.marker.evaluate(env):
                continue  # an extra, or another Python / platform
            if canon(req.name) not in have | DEVICE_HAS:
                missing.append(f"{w.name} needs {req}")
print(f"{len(wheels)} wheels in {sys.argv[1]}, {sum(w.stat().st_size for w in wheels) / 2**20:.1f} MiB")
if missing:
    sys.exit("requirements neither among the wheels nor on the device image:\n  " + "\n  ".join(missing))
print("every requirement is a wheel here or on the device image")
PY
