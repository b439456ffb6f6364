#!/usr/bin/env bash
# The GPU check on a machine with the device image's python3 (torch, transformers, peft, ...):
# bash bench/gpu_check.sh [--tiny] [--device cuda:0]
cd "$(dirname "$0")/.." && PYTHONPATH=model:demo:server:learner:clients/python:proto exec python3 bench/gpu_check.py "$@"
