# Sourced by scripts/test: the browser tests drive Debian's Chromium (/usr/bin/chromium) with
# playwright from PyPI. Install Chromium when it is missing (needs root and apt, as on the
# project's machines); playwright's own browser download is never used.
if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        echo "installing chromium (Debian package) for the browser tests ..." >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >&2
        apt-get install -y -qq chromium >&2
    else
        echo "the browser tests need /usr/bin/chromium: install Debian's 'chromium' package (as root)" >&2
        exit 1
    fi
fi
