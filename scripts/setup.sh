#!/usr/bin/env bash
# One set-up for a fresh Debian machine (run as root, or as a user with sudo): system packages, then
# the Python package with its pinned torch/torchaudio pair.
#
# Which Python gets the packages:
#   1. an active virtual environment ($VIRTUAL_ENV), as it is;
#   2. else ./.venv, if an earlier run of this script made it;
#   3. else, when the interpreter is externally managed (PEP 668: Debian 12's /usr/bin/python3 has an
#      EXTERNALLY-MANAGED file and pip refuses to install into it), not writable by this user, or
#      there is no `python` command (Debian 12 has only python3): a new ./.venv (apt's python3.X-venv
#      first if ensurepip is missing), which you then activate with `. .venv/bin/activate` (printed);
#   4. else the interpreter itself (pyenv, conda, a python.org build).
#
#   bash scripts/setup.sh              # do it
#   bash scripts/setup.sh --dry-run    # print the decisions and every command, change nothing
#                                      # (also SPEECHALIGN_SETUP_DRY_RUN=1)
set -euo pipefail
cd "$(dirname "$0")/.."

DRY="${SPEECHALIGN_SETUP_DRY_RUN:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    *) echo "usage: bash scripts/setup.sh [--dry-run]" >&2; exit 2 ;;
  esac
done

say() { echo "setup: $*"; }
run() {  # a command that changes the machine: printed (and not run) in a dry run
  if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi
}

# -- root or sudo, for apt only --------------------------------------------------------------------
SUDO=()
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
  else
    SUDO=(__no_sudo__)
  fi
fi
APT_UPDATED=0
apt_install() {  # apt_install PKG...: once-updated apt, non-interactive
  if [ "${SUDO[*]-}" = "__no_sudo__" ]; then
    echo "setup: need root or sudo to apt-get install $*; run this script as root, or install them first" >&2
    exit 1
  fi
  if [ "$APT_UPDATED" = 0 ]; then
    run "${SUDO[@]}" apt-get update -qq
    APT_UPDATED=1
  fi
  run "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@"
}

# -- system packages -------------------------------------------------------------------------------
# flite speaks the embedded corpus; libsndfile reads/writes audio for soundfile.
# chromium renders the HTML report headless in tests/test_evaltools.py (skipped where it is absent).
APT_PKGS=()
command -v flite >/dev/null 2>&1 || APT_PKGS+=(flite)
# (ldconfig lives in /sbin, which is not on a Debian user's PATH)
{ ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null; } | grep -q libsndfile || APT_PKGS+=(libsndfile1)
command -v chromium >/dev/null 2>&1 || APT_PKGS+=(chromium)
if [ "${#APT_PKGS[@]}" -gt 0 ]; then
  say "system packages: ${APT_PKGS[*]}"
  apt_install "${APT_PKGS[@]}"
fi

# -- which Python ----------------------------------------------------------------------------------
# exit 0 when pip may install into this interpreter: a venv, or not externally managed and writable
PY_OK='
import os, sys, sysconfig
if sys.prefix != sys.base_prefix:
    sys.exit(0)
if os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")):
    sys.exit(3)
sys.exit(0 if os.access(sysconfig.get_paths()["purelib"], os.W_OK) else 4)
'
VENV=""
if [ -n "${VIRTUAL_ENV:-}" ]; then
  PY="$VIRTUAL_ENV/bin/python"
  say "installing into the active virtual environment $VIRTUAL_ENV"
elif [ -x .venv/bin/python ]; then
  PY="$PWD/.venv/bin/python"
  VENV=".venv"
  say "installing into ./.venv (made by an earlier run)"
else
  # `python` first: it is the interpreter the README's `python -m pytest` will run
  BASE=""
  for name in python python3; do
    if command -v "$name" >/dev/null 2>&1; then BASE="$(command -v "$name")"; break; fi
  done
  why=""
  if [ -z "$BASE" ]; then
    # no Python at all: Debian's python3 with the venv module
    say "no python3 or python on PATH"
    apt_install python3 python3-venv
    BASE=/usr/bin/python3
    why="no Python was installed"
  else
    set +e; "$BASE" -c "$PY_OK"; rc=$?; set -e
    case "$rc" in
      0) ;;
      3) why="$BASE is externally managed (PEP 668)" ;;
      4) why="$BASE's site-packages is not writable by $(id -un)" ;;
      *) echo "setup: $BASE does not run (exit $rc)" >&2; exit 1 ;;
    esac
    # there is no `python` command (Debian 12 ships only python3): the README's commands need one
    if [ -z "$why" ] && ! command -v python >/dev/null 2>&1; then why="there is no python command"; fi
  fi
  if [ -z "$why" ]; then
    PY="$BASE"
    say "installing into $BASE (not externally managed)"
  else
    VENV=".venv"
    PY="$PWD/.venv/bin/python"
    say "$why: making a virtual environment ./.venv with $BASE"
    # Debian keeps ensurepip (which venv needs for pip) in python3.X-venv
    if [ "$DRY" = 1 ] && [ ! -e "$BASE" ]; then
      :  # a dry run that has just planned to apt-get python3 cannot ask it anything
    elif ! "$BASE" -c "import ensurepip" >/dev/null 2>&1; then
      ver="$("$BASE" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
      say "$BASE has no ensurepip: installing python$ver-venv"
      apt_install "python$ver-venv"
    fi
    run "$BASE" -m venv .venv
    # keep the environment out of git status (what `python -m venv` does itself from Python 3.13)
    if [ "$DRY" = 1 ]; then echo "+ echo '*' > .venv/.gitignore"; else echo '*' > .venv/.gitignore; fi
  fi
fi

# -- the Python packages ---------------------------------------------------------------------------
run "$PY" -m pip install -q --upgrade pip
# torch and torchaudio first, as the pinned pair (see setup.cfg for why).
run "$PY" -m pip install -q "torch==2.9.1" "torchaudio==2.9.1"
run "$PY" -m pip install -q -e ".[test]"
# resemblyzer pins the original webrtcvad, which imports pkg_resources (gone from new setuptools);
# its dependencies are installed above (webrtcvad-wheels provides the same module).
run "$PY" -m pip install -q --no-deps "resemblyzer==0.1.4"
# speechtokenizer lists torch/torchaudio unpinned; its real dependencies are in setup.cfg.
run "$PY" -m pip install -q --no-deps "speechtokenizer==1.0.1"
run "$PY" -c "import torch, torchaudio, trl, transformers, peft, speechbrain, encodec, resemblyzer, pocketsphinx, speechtokenizer, speechmos, onnxruntime; print('speechalign set-up OK: torch', torch.__version__, 'trl', trl.__version__)"

if [ -n "$VENV" ]; then
  say "the package is installed in ./.venv; before the README's other commands (speechalign ..., python -m pytest -q), run:"
  say "    . .venv/bin/activate"
fi
if [ "$DRY" = 1 ]; then say "dry run: nothing was changed"; fi
