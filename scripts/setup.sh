#!/usr/bin/env bash
# One set-up for a fresh Debian machine (run as root, or with sudo available): system packages, then
# the Python package with its pinned torch/torchaudio pair.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
# flite speaks the embedded corpus; libsndfile reads/writes audio for soundfile.
if ! command -v flite >/dev/null 2>&1 || ! ldconfig -p | grep -q libsndfile; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq flite libsndfile1 >/dev/null
fi
# chromium renders the HTML report headless in tests/test_evaltools.py (skipped where it is absent).
if ! command -v chromium >/dev/null 2>&1; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
python -m pip install -q --upgrade pip
# torch and torchaudio first, as the pinned pair (see setup.cfg for why).
python -m pip install -q "torch==2.9.1" "torchaudio==2.9.1"
python -m pip install -q -e ".[test]"
# resemblyzer pins the original webrtcvad, which imports pkg_resources (gone from new setuptools);
# its dependencies are installed above (webrtcvad-wheels provides the same module).
python -m pip install -q --no-deps "resemblyzer==0.1.4"
# speechtokenizer lists torch/torchaudio unpinned; its real dependencies are in setup.cfg.
python -m pip install -q --no-deps "speechtokenizer==1.0.1"
python -c "import torch, torchaudio, trl, transformers, peft, speechbrain, encodec, resemblyzer, pocketsphinx, speechtokenizer, speechmos, onnxruntime; print('speechalign set-up OK: torch', torch.__version__, 'trl', trl.__version__)"
