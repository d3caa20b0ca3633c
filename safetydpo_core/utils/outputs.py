"""No command writes over any of its inputs, or writes two of its outputs to one place.

Every command that writes files declares what it reads and what it writes, as ``{label: path}`` maps
(a label is what the user typed, e.g. ``--data``; a value may be a path, a list of paths or None), and
calls :func:`refuse_overlaps` before it touches anything. An output overlaps an input when, after links
are resolved, they are the same file, the output lies inside an input folder (writing into a dataset, a
model folder) or the input lies inside an output folder (a folder the command replaces). Two outputs
overlap the same way (``--out`` equal to ``--rejects``, or to ``<out>.config.json``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Union

from ..errors import ConfigError

PathLike = Union[str, os.PathLike]
Paths = Union[PathLike, Iterable[PathLike], None]


def _flatten(spec: Mapping[str, Paths]) -> list[tuple[str, Path, str]]:
    out = []
    for label, value in spec.items():
        if value is None or value == "":
            continue
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value)
        for v in values:
            if v is None or v == "":
                continue
            out.append((label, Path(v), os.path.realpath(os.path.expanduser(os.fspath(v)))))
    return out


def _relation(a: str, b: str) -> str | None:
    """How path ``a`` relates to path ``b`` (both resolved): "is", "inside", "contains" or None."""
    if a == b:
        return "is"
    try:
        if os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b):
            return "is"
    except OSError:
        pass
    try:
        common = os.path.commonpath([a, b])
    except ValueError:  # different drives
        return None
    if common == b:
        return "inside"
    if common == a:
        return "contains"
    return None


def refuse_overlaps(outputs: Mapping[str, Paths], inputs: Mapping[str, Paths] | None = None) -> None:
    """Raise :class:`ConfigError` if an output overlaps an input or another output (see the module doc)."""
    outs = _flatten(outputs)
    ins = _flatten(inputs or {})
    for label, path, real in outs:
        for ilabel, ipath, ireal in ins:
            rel = _relation(real, ireal)
            if rel is None:
                continue
            how = {"is": f"is the input {ilabel} {ipath}",
                   "inside": f"lies inside the input {ilabel} {ipath}",
                   "contains": f"contains the input {ilabel} {ipath}"}[rel]
            raise ConfigError(f"The output {label} {path} {how}: the command would write over its own input. "
                              f"Choose an output outside the inputs.")
    for i, (label, path, real) in enumerate(outs):
        for label2, path2, real2 in outs[i + 1:]:
            rel = _relation(real, real2)
            if rel is not None:
                how = {"is": "is the same file as", "inside": "lies inside", "contains": "contains"}[rel]
                raise ConfigError(f"The output {label} {path} {how} the output {label2} {path2}; one would write over "
                                  f"the other. Give them different paths.")
