#!/usr/bin/env bash
# Local entry point. Creates the virtual environment on first use (PyPI only) and refreshes it
# when requirements.txt or pyproject.toml change, then:
#   launch/local.sh run  [avg-jax overrides...]  the whole pipeline on the embedded avg_shapes data
#   launch/local.sh test [pytest args...]        ruff check and ruff format --check, then the
#                                                test suite, mypy included (CPU, 8 fake devices,
#                                                2 workers: AVG_JAX_TEST_WORKERS); installs
#                                                Debian's chromium for the browser test when
#                                                root and missing (else that test is skipped)
#   launch/local.sh env                          only create / refresh the environment
# Environment: PYTHON (interpreter to build the venv with), AVG_JAX_VENV (default .venv),
# WORKDIR (default runs/smoke), CONFIG (default configs/smoke.py).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${AVG_JAX_VENV:-.venv}"

# Interpreters to build the venv with, in order. The distribution's own (/usr/bin) first:
# Debian and Ubuntu build it with profile-guided and link-time optimisation, which pyenv and
# source builds leave off by default, and most of the test suite's CPU is Python (tracing and
# lowering the programs it compiles). Measured here on a fresh clone, both 3.11: pytest 9 min
# 44 s with pyenv's interpreter, 8 min 21 s with Debian's (docs/notebook/suite-time.md).
PYTHON_CANDIDATES=(/usr/bin/python3.11 /usr/bin/python3.12 /usr/bin/python3 python3.11 python3.12 python3)

# Creates $VENV with $PYTHON when set, else with the first candidate that is Python >= 3.11 and
# can create a venv (a distribution's python without its venv package cannot).
create_venv() {
  if [ -n "${PYTHON:-}" ]; then "$PYTHON" -m venv "$VENV"; return; fi
  local fresh=1
  [ -e "$VENV" ] && fresh=0
  for candidate in "${PYTHON_CANDIDATES[@]}"; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null &&
       "$candidate" -m venv "$VENV" >/dev/null 2>&1; then
      return
    fi
    # A failed try may leave a partial folder: removed only when this function made it.
    if [ "$fresh" = 1 ]; then rm -rf "$VENV"; fi
  done
  echo "launch/local.sh: need Python >= 3.11 with its venv module (set PYTHON=...)" >&2
  exit 2
}

ensure_env() {
  if [ ! -x "$VENV/bin/python" ]; then
    echo "launch/local.sh: creating $VENV" >&2
    create_venv
  fi
  local stamp="$VENV/.avg_jax_requirements"
  local want
  want="$(cat requirements.txt pyproject.toml | sha256sum | cut -d' ' -f1)"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    echo "launch/local.sh: installing requirements into $VENV" >&2
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # pip byte-compiles what it installs on one core (~35 of its ~65 s here); compileall
    # does the same files on every core. Bytecode only speeds up imports: a file that
    # cannot be compiled is reported, not fatal (it compiles when imported, as with pip).
    "$VENV/bin/python" -m pip install --quiet --no-compile -r requirements.txt
    "$VENV/bin/python" -m compileall -q -j 0 "$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null ||
      echo "launch/local.sh: some installed files were not byte-compiled (see compileall)" >&2
    "$VENV/bin/python" -m pip install --quiet --no-deps -e .
    echo "$want" > "$stamp"
  fi
}

# The search page's browser test drives Debian's `chromium` (never a downloaded browser).
ensure_browser() {
  if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
    return
  fi
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "launch/local.sh: installing Debian's chromium for the browser test" >&2
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 ||
       { apt-get update -qq >/dev/null 2>&1 &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; }; then
      return
    fi
  fi
  echo "launch/local.sh: no chromium (Debian package 'chromium'; needs root and apt-get):" \
       "the browser test will be skipped" >&2
}

command="${1:-}"
[ $# -gt 0 ] && shift
case "$command" in
  run)
    ensure_env
    exec "$VENV/bin/avg-jax" run --config "${CONFIG:-configs/smoke.py}" \
      --workdir "${WORKDIR:-runs/smoke}" "$@"
    ;;
  test)
    ensure_env
    ensure_browser
    export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
    export JAX_PLATFORMS=cpu
    # ~60 processes (two workers, the CLI and server subprocesses) import the project's own
    # modules: let Python cache their bytecode in __pycache__ (git-ignored) even where the
    # environment turns that off (collecting the suite: 8.6 -> 5.4 s of CPU per worker).
    unset PYTHONDONTWRITEBYTECODE
    # Lint and format check first (config in pyproject.toml); any finding fails the test. mypy
    # runs as a test of the suite (tests/test_type_check.py), beside the other worker's tests.
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    # Two workers (pytest-xdist): most of the suite is single-threaded XLA compilation. The
    # tests on the shared tiny pipeline form one group (tests/conftest.py) so it is built once;
    # groups are handed out longest first (tests/conftest.py, `_longest_first`).
    exec "$VENV/bin/python" -m pytest -q -n "${AVG_JAX_TEST_WORKERS:-2}" --dist loadgroup \
      --no-loadscope-reorder "$@"
    ;;
  env)
    ensure_env
    ;;
  *)
    echo "usage: launch/local.sh run|test|env [args...]" >&2
    exit 2
    ;;
esac
