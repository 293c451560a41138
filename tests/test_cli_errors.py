"""CLI errors from the I/O layer end in one clear line, not a traceback."""

import errno

from zo2tier import cli
from zo2tier.store.io import BlockIOError


def test_io_errors_become_one_line(monkeypatch, capsys):
    def boom(*args, **kwargs):
        raise BlockIOError(errno.ENOSPC, "cannot write block b0 of store /s: it needs 4096 bytes")

    monkeypatch.setattr("zo2tier.planning.describe_plan", boom)
    rc = cli.main(["plan", "config.json", "--budget", "device=1GiB"])
    err = capsys.readouterr().err
    assert rc == 1
    assert err.strip() == "zo2tier plan: error: [Errno 28] cannot write block b0 of store /s: it needs 4096 bytes"
