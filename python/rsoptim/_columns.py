"""Packing the columns of addresses and element counts the extension module takes."""

from __future__ import annotations

from array import array
from typing import Iterable


def pack(words: Iterable[int]) -> bytes:
    """A column of addresses or element counts as the binding takes it: native 64-bit words."""
    return array("Q", words).tobytes()
