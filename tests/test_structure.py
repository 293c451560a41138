"""tools/check_structure.py over zo2tier/: no import cycles, no reads of another object's private attributes."""

from __future__ import annotations

import ast
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import check_structure


def test_the_package_has_no_cycles_and_no_private_reads(capsys):
    assert check_structure.main() == 0, capsys.readouterr().out


def test_private_reads_spares_only_the_object_itself():
    src = """
class A:
    @classmethod
    def make(cls):
        a = cls()
        a._x = 1
        return a

    def peek(self, other):
        return self._y + other._z
"""
    assert [what for _, what in check_structure.private_reads(ast.parse(src))] == ["other._z"]
