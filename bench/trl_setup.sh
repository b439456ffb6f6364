#!/usr/bin/env bash
# Create two isolated TRL venvs next to the repo's .venv (both gitignored via .venv-*/):
#   .venv-trl116  trl==1.16.0  (RewardTrainer)
#   .venv-trl112  trl==1.12.0  (last release with trl.experimental.ppo.PPOTrainer)
# torch comes through constraints.txt (the CPU wheel pip finds in /opt/wheels); transformers/peft/
# accelerate/datasets are whatever pip resolves next to the TRL pin. Our package is added
# editable without deps so flywheel_learner imports in both venvs.
# Usage: bash bench/trl_setup.sh [116|112]   (default: both). Versions land in bench/out/trl_versions_<v>.txt
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p bench/out
which="${1:-all}"

setup() {
  local tag="$1" trl="$2" venv=".venv-trl$1"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q -c constraints.txt torch==2.13.0
  # transformers/peft/accelerate: try the repo's pins first, fall back to an unconstrained resolve.
  "$venv/bin/pip" install -q "torch==2.13.0" "trl==$trl" -c constraints.txt datasets safetensors tokenizers tqdm \
    || "$venv/bin/pip" install -q "torch==2.13.0" "trl==$trl" datasets peft safetensors tokenizers tqdm
  "$venv/bin/pip" install -q peft -c constraints.txt || "$venv/bin/pip" install -q peft
  "$venv/bin/pip" install -q --no-deps -e .
  "$venv/bin/pip" freeze | grep -iE '^(torch|trl|transformers|peft|accelerate|datasets|tokenizers|safetensors)==' \
    | tee "bench/out/trl_versions_$tag.txt"
}

case "$which" in
  116) setup 116 1.16.0 ;;
  112) setup 112 1.12.0 ;;
  all) setup 116 1.16.0; setup 112 1.12.0 ;;
  *) echo "usage: $0 [116|112]" >&2; exit 2 ;;
esac
