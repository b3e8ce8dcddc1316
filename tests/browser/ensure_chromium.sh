#!/bin/sh
# Makes sure a Chromium exists for the dashboard's browser tests (tests/browser).
# Playwright's own browser download is unreachable here, so Debian's package serves it
# (through executable_path). Installs only when missing and running as root; otherwise
# says what to do, and the browser tests skip naming the same fix.
for b in chromium chromium-browser; do
    if command -v "$b" >/dev/null 2>&1; then exit 0; fi
done
if [ -n "${CHROMIUM_BIN:-}" ] && [ -x "$CHROMIUM_BIN" ]; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing Debian's chromium for the dashboard's browser tests (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null
    command -v chromium >/dev/null 2>&1 && exit 0
    echo "warning: apt-get did not install chromium; the browser tests will be skipped" >&2
    exit 0
fi
echo "note: no chromium found; install it (apt-get install chromium) or set CHROMIUM_BIN" \
     "to a Chromium binary, else the dashboard's browser tests are skipped" >&2
exit 0
