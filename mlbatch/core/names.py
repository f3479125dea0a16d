"""The one rule for a name that comes from data and becomes part of a path, and the check that a path stays put.

Model names and versions, weights file names, registry references, run ids, dates, alias names:
whoever takes one from a package, a manifest, an export or a flag checks it here before it goes
into a path, so a version of ``../../x`` or a file name of ``/etc/passwd`` can never steer a
read or a write. One rule everywhere: 1 to 128 characters of letters, digits, ``.``, ``_`` and
``-``, starting with a letter or a digit (so never ``.``, ``..`` or a hidden name).
"""

from __future__ import annotations

import os
import re

SEGMENT_RE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_SEGMENT = re.compile(SEGMENT_RE)


class NameError_(ValueError):
    """A name from data that cannot be a path segment, or a path that leaves its root."""


def is_segment(value: object) -> bool:
    return isinstance(value, str) and _SEGMENT.fullmatch(value) is not None


def check_segment(value: object, what: str) -> str:
    """``value`` if it is one safe path segment; else ``NameError_`` naming ``what`` (the value shown in repr)."""
    if not is_segment(value):
        shown = repr(value[:200]) if isinstance(value, str) else f"(a {type(value).__name__}, not a string)"
        raise NameError_(f"{what} {shown}: use 1 to 128 letters, digits, '.', '_' and '-', starting with a letter "
                         "or a digit (it becomes a path segment)")
    return value


def check_inside(root: str, path: str, what: str) -> str:
    """The real path of a local ``path`` if it lies under ``root`` once every link is followed; else ``NameError_``."""
    real_root, real = os.path.realpath(root), os.path.realpath(path)
    if os.path.commonpath([real_root, real]) != real_root:
        raise NameError_(f"{what}: {path} leads outside {root}")
    return real
