"""The data that ships inside the package (README.md beside this file: origin and licence of each).

- `EVAL_DIR`: the reference evaluation files, the default of `eval.data_dir`.
- `path_of(name)`: a training or math evaluation file by name, what `data.*.builtin` names.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
EVAL_DIR = ROOT / "eval"
TRAIN_DIR = ROOT / "train"


def path_of(name: str) -> Path:
    """The file of built-in dataset `name` (a `config.schema.BuiltinDataset`)."""
    for path in (TRAIN_DIR / f"{name}.json", EVAL_DIR / f"{name}.json"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"no built-in dataset {name!r} under {ROOT}")
