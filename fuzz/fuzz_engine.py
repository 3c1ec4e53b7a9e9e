"""Coverage-guided fuzz target: the SMTP engine fed arbitrary bytes.

The input is cut into pieces (the first byte of each piece is its length),
fed to one engine, and every event is carried out as the server would.
Anything but a clean run is a bug: an exception, a malformed reply, a reply
code outside RFC 5321, a message event out of order, an event after Close,
unparsed input above the line limit while reading commands.  The checks are
``fuzz_targets.engine_input``.

    python fuzz/fuzz_engine.py -max_total_time=60 [corpus dir]
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from fuzz_targets import engine_input


def main() -> None:
    atheris.Setup(sys.argv, engine_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
