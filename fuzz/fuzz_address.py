"""Coverage-guided fuzz target: envelope address and parameter parsers.

``parse_path`` must return an address or raise ``AddressError``;
``parse_params`` must return or raise ``KeyError``/``ValueError``; nothing
else.  What it returns must keep the RFC 5321 §4.5.3.1 limits, and the
Maildir name made from it must stay one safe path component (no ``/``, no
leading dot, no NUL), whatever the input.  The checks are
``fuzz_targets.address_input``.

    python fuzz/fuzz_address.py -max_total_time=60 [corpus dir]
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from fuzz_targets import address_input


def main() -> None:
    atheris.Setup(sys.argv, address_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
