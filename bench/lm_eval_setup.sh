#!/usr/bin/env bash
# lm-evaluation-harness in its own venv (.venv-lmeval, gitignored via .venv-*/), for
# bench/lm_eval_check.py. torch is pinned through constraints.txt (the CPU wheel), so the hf
# model runs on the same torch and transformers as flywheel.
# Usage: bash bench/lm_eval_setup.sh   (versions land in bench/out/lm_eval_versions.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/out
venv=.venv-lmeval
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
find_links=$([ -d /opt/wheels ] && echo "--find-links /opt/wheels" || true)
"$venv/bin/pip" install -q $find_links -c constraints.txt "torch==2.13.0" "lm-eval[api,hf]==0.4.13"
"$venv/bin/pip" freeze | grep -iE '^(lm.eval|torch|transformers|tokenizers|datasets)==' \
  | tee bench/out/lm_eval_versions.txt
