#!/usr/bin/env bash
# Debian's Chromium for the browser tests (tests/e2e/test_labeling_page.py), driven by Playwright
# from PyPI: Playwright's own browser download fails on these machines. Installed with apt-get
# (as root, or through sudo); nothing to do when /usr/bin/chromium is there already.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  exit 0
fi
sudo=()
if [ "$(id -u)" != 0 ]; then
  sudo=(sudo -n)
fi
"${sudo[@]}" apt-get update -qq
DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends chromium >/dev/null
/usr/bin/chromium --version
