"""The one ``--key=value`` override parser the benchmark scripts share (constants at the top of each script)."""

from __future__ import annotations

import sys


def parse_overrides(defaults: dict, argv: list[str] | None = None) -> dict:
    """Return ``defaults`` with ``--key=value`` overrides applied, each cast to its default's type."""
    cfg = dict(defaults)
    for arg in sys.argv[1:] if argv is None else argv:
        key, _, value = arg.lstrip("-").partition("=")
        if key not in cfg:
            raise SystemExit(f"unknown option --{key}; known: {', '.join('--' + k for k in cfg)}")
        cfg[key] = type(cfg[key])(value)
    return cfg
