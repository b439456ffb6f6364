#!/usr/bin/env bash
# Put Prometheus's promtool at .venv/bin/promtool (or $1) for `promtool check metrics` in
# tests/integration/test_metrics.py. It comes from Debian's `prometheus` package, unpacked rather
# than installed: no root needed, no Prometheus server started. apt uses a private state and
# cache directory, so the system's package lists are left alone.
set -euo pipefail

dest="${1:-.venv/bin/promtool}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/root"
apt=(apt-get -qq -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
  -o "Debug::NoLocking=1" -o "APT::Sandbox::User=$(id -un)")

"${apt[@]}" update
(cd "$work" && "${apt[@]}" download prometheus)
dpkg-deb -x "$work"/prometheus_*.deb "$work/root"
mkdir -p "$(dirname "$dest")"
install -m 0755 "$work/root/usr/bin/promtool" "$dest"
"$dest" --version 2>&1 | head -n 1
