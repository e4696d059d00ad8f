#!/usr/bin/env bash
# The GPU readiness check in one command, for a bare device machine (docs/benchmarks.md, "GPU check").
#
#   bash benchmarks/gpu_check.sh [--quick] [any option of `python -m benchmarks gpu`]
#   bash benchmarks/gpu_check.sh --device cpu --tiny      # the same steps at toy sizes, on a CPU
#
# Run from the repository root. Set-up: the wheels in .whl/ (benchmarks/fetch_device_wheels.sh,
# carried with the call) are installed with --no-deps into a private folder, the project itself
# too (--no-deps, so `molt` exists), and every module the check imports is tried first: a missing
# one stops the run at once, named. Results go to $OUT when it is set, else ./gpu-check/.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${MOLT_SITE:-/tmp/molt-site}
WHL=${WHL_DIR:-.whl}
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore  # the device runs commands as root
t0=$(date +%s)
if compgen -G "$WHL/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl \
    || { echo "gpu_check: installing the wheels in $WHL failed (see above)" >&2; exit 3; }
  # the project, --no-deps: gives the `molt` console script; the checkout stays first on the path.
  # The check itself runs `python -m cli.main`, so a failure here is reported loudly but not fatal:
  # a device call is too scarce to lose to the console script.
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir --upgrade \
      --target "$SITE" . >/dev/null \
    || echo "gpu_check: WARNING: installing the project (pip install --no-deps .) failed (see above); no \`molt\` script, the check runs python -m cli.main" >&2
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
  echo "gpu_check: installed $(ls "$WHL"/*.whl | wc -l) wheels from $WHL into $SITE ($(( $(date +%s) - t0 )) s)"
else
  echo "gpu_check: no wheels in $WHL; using the packages already importable (bash benchmarks/fetch_device_wheels.sh makes them)"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -m benchmarks.bench_gpu --check-imports || exit 3
exec "$PY" -m benchmarks gpu "$@"
