#!/usr/bin/env bash
# What the browser tests (tests/browser) need besides the Python packages: a Chromium that
# Playwright drives instead of downloading its own. One step shared by `make test` and .ci/run.
#
# - PERL_CHROMIUM=/path/to/chromium, or Debian's /usr/bin/chromium when present: nothing to do.
# - Missing and this user can install packages (root, or sudo without a password) on a system
#   with apt-get: installs Debian's `chromium` (its dependencies bring the libraries and fonts it needs).
# - Otherwise: one line naming the package and the command, and exit code 1.
set -euo pipefail

chromium="${PERL_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$chromium" ]; then
  exit 0
fi
if [ -n "${PERL_CHROMIUM:-}" ]; then
  echo "provision_browser: PERL_CHROMIUM=$PERL_CHROMIUM is not an executable file; point it at a chromium binary or unset it to use Debian's chromium." >&2
  exit 1
fi

as_root=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root="sudo -n"
  fi
fi
if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" -eq 0 ] || [ -n "$as_root" ]; }; then
  echo "provision_browser: installing Debian's chromium for the browser tests (apt-get install -y chromium)"
  if $as_root apt-get update -qq && DEBIAN_FRONTEND=noninteractive $as_root apt-get install -y -qq chromium >/dev/null \
     && [ -x "$chromium" ]; then
    exit 0
  fi
  echo "provision_browser: installing Debian's chromium failed; the browser tests cannot run without it: try 'sudo apt-get install -y chromium' (or set PERL_CHROMIUM=/path/to/chromium)." >&2
  exit 1
fi
echo "provision_browser: the browser tests need Debian's chromium, which is missing and cannot be installed as this user: run 'sudo apt-get install -y chromium' (or set PERL_CHROMIUM=/path/to/chromium), then make test again." >&2
exit 1
