"""What a data set's files look like on disk, checked with the standard library alone (no torch, no torchvision).

A dataset option declares the files its builder reads under `dataset.root` and the format of each (`files:` in
`conf/dataset/*.yaml`); the pre-run check asks `problem` about them, so a missing, packed or truncated download is
refused in one line before anything trains, not by torchvision after the MLflow run has started.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Callable, Mapping

IDX_UBYTE = 0x08  # IDX type code of unsigned bytes, the only one MNIST-format sets use


def _idx(path: str) -> str | None:
    """MNIST's unpacked IDX files: magic 0x0000 <type> <ndim>, ndim big-endian uint32 sizes, then the bytes."""
    with open(path, "rb") as f:
        head = f.read(4)
        if len(head) < 4 or head[:2] != b"\0\0" or head[2] != IDX_UBYTE or head[3] not in (1, 3):
            packed = " (still gzip-compressed? unpack it)" if head[:2] == b"\x1f\x8b" else ""
            return f"{path} is not an unpacked IDX file of bytes{packed}"
        sizes = f.read(4 * head[3])
    values = math.prod(struct.unpack(f">{len(sizes) // 4}I", sizes))  # one byte each, after the header
    if len(sizes) < 4 * head[3] or os.path.getsize(path) != 4 + len(sizes) + values:
        return f"{path} has the wrong size for its IDX header (truncated?)"
    return None


def _pickle(path: str) -> str | None:
    """CIFAR's python batches: pickles of protocol 2, so they start with the PROTO opcode (never unpickled here)."""
    with open(path, "rb") as f:
        if f.read(1) != b"\x80":
            return f"{path} is not a pickle (the python version of CIFAR, cifar-10-python.tar.gz, unpacked)"
    return None


def _image_folder(path: str) -> str | None:
    """An ImageFolder split: one sub-folder per class."""
    if not any(entry.is_dir() for entry in os.scandir(path)):
        return f"{path} holds no class folders (<class>/<image>)"
    return None


FORMATS: dict[str, Callable[[str], str | None]] = {"idx": _idx, "pickle": _pickle, "image_folder": _image_folder}


def listing(files: Mapping[str, str]) -> str:
    """The paths of `files` in one short phrase, those of one folder as folder/{a, b}."""
    by_folder: dict[str, list[str]] = {}
    for name, kind in files.items():
        folder, _, base = name.rpartition("/")
        by_folder.setdefault(folder, []).append(base + ("/<class>/<image>" if kind == "image_folder" else ""))
    return ", ".join(f"{folder}/{{{', '.join(names)}}}" if folder else ", ".join(names)
                     for folder, names in by_folder.items())


def problem(root: str | None, files: Mapping[str, str]) -> str | None:
    """What keeps `root` from holding `files` ({relative path: format}), or None when each is there and looks right."""
    if root is None:
        return "dataset.root is not set"
    if not os.path.isdir(root):
        return f"{root} is not a directory" if os.path.exists(root) else f"{root} does not exist"
    for name, kind in files.items():
        if kind not in FORMATS:
            return f"files.{name}: {kind} is not a format pqsweep.datafiles knows ({', '.join(FORMATS)})"
        path = os.path.join(root, name)
        if not (os.path.isdir(path) if kind == "image_folder" else os.path.isfile(path)):
            return f"{path} is missing"
        trouble = FORMATS[kind](path)
        if trouble:
            return trouble
    # ImageFolder numbers classes per folder: splits with different class folders would disagree on every label
    classes = {name: sorted(e.name for e in os.scandir(os.path.join(root, name)) if e.is_dir())
               for name, kind in files.items() if kind == "image_folder"}
    if len({tuple(c) for c in classes.values()}) > 1:
        return f"{' and '.join(classes)} under {root} hold different class folders"
    return None
