"""Run the ``loretta-merge`` command line with every output write slowed down, so kill and
interrupt tests can catch a command in the middle of writing.

    python tests/_slow_cli.py SECONDS ARG...

Each call of :func:`loretta_merge.io.writer.write_bytes` (the one place bytes reach an
output file) sleeps SECONDS after writing. This is the tests' own patching, done in the
child process before the command runs; production code reads no test switch.
"""

from __future__ import annotations

import signal
import sys
import time


def main() -> None:
    import loretta_merge.io.writer as writer
    from loretta_merge.cli import main as cli_main

    # as on a terminal: a launcher that started the tests in the background (`cmd &` in a
    # script) leaves SIGINT ignored, and children inherit that; Ctrl-C tests need it live
    signal.signal(signal.SIGINT, signal.default_int_handler)
    delay = float(sys.argv[1])
    real = writer.write_bytes

    def slow_write(fd: int, data, offset: int) -> None:
        real(fd, data, offset)
        time.sleep(delay)

    writer.write_bytes = slow_write
    cli_main(sys.argv[2:])


if __name__ == "__main__":
    main()
