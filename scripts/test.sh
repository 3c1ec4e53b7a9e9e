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
if [ ${#need[@]} -gt 0 ]; then
  echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

python3 -m pip install -q --disable-pip-version-check -e '.[test]'

# Static checks first: lint (ruff, including its ASYNC rules for blocking
# calls in coroutines) and types (mypy, strict, on the package).
python3 -m ruff check src tests bench fuzz
python3 -m mypy

set +e
python3 -m pytest "$@"
rc=$?
set -e
if [ $rc -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit $rc
