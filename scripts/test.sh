#!/usr/bin/env bash
# Set up everything the tests need, then run them.  Safe to run again.
#   bash scripts/test.sh            # the whole suite
#   bash scripts/test.sh -k tls     # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

# Real peers the tests talk to: swaks, Postfix (smtp-source, smtp-sink and a
# relay client), gnutls-cli and openssl.  Postfix is installed without a
# configuration, so no system mail service is started.
need=()
command -v swaks >/dev/null || need+=(swaks)
# smtp-source lives in /usr/sbin, which a non-root PATH may lack.
command -v smtp-source >/dev/null || [ -x /usr/sbin/smtp-source ] || need+=(postfix)
command -v gnutls-cli >/dev/null || need+=(gnutls-bin)
command -v openssl >/dev/null || need+=(openssl)
# A system Python that forbids pip installs (PEP 668, Debian 12 and later)
# gets a virtual environment of the project's own, .venv.
PY=python3
if [ -z "${VIRTUAL_ENV:-}" ] && python3 - <<'PYEOF'
import os, sys, sysconfig
sys.exit(0 if os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED")) else 1)
PYEOF
then
  python3 -c 'import ensurepip' 2>/dev/null || need+=(python3-venv)
  PY=.venv/bin/python
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ "$PY" != python3 ] && [ ! -x "$PY" ]; then
  python3 -m venv .venv
fi
"$PY" -m pip install -q --disable-pip-version-check -e '.[test]'

# Static checks first: lint (ruff, including its ASYNC rules for blocking
# calls in coroutines) and types (mypy, strict, on the package).
"$PY" -m ruff check src tests bench fuzz
"$PY" -m mypy

set +e
"$PY" -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit $rc
