"""The params files shipped inside the package (``src/sparsetrain/configs``; ``configs/`` in a
checkout is a link to it), so the README's commands work after ``pip install sparsetrain`` too:
``--params builtin:gpt2_tiny_sparse`` reads one, ``sparsetrain configs`` lists, shows or copies them.

A shipped config that reads a data file of its own names it relative to itself (``data/...``); a
relative data path is looked up beside the params file when the working directory lacks it (see
:mod:`sparsetrain.data`), and ``--copy`` writes those files beside the copied config.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from sparsetrain.config.fields import closest
from sparsetrain.errors import ConfigError, UserError

PREFIX = "builtin:"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def builtin_path(spec: str | Path) -> Path:
    """``builtin:NAME`` (with or without ``.yaml``) as the shipped file's path; any other path as it is."""
    text = str(spec)
    if not text.startswith(PREFIX):
        return Path(spec)
    name = text[len(PREFIX):].removesuffix(".yaml")
    path = CONFIG_DIR / f"{name}.yaml"
    if "/" in name or not path.is_file():
        raise ConfigError(f"{text}: no shipped config of that name{closest(name, names(), 'names')} "
                          "(`sparsetrain configs` lists them)")
    return path


def description(path: Path) -> str:
    """The first comment line of a config: what it is for."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        if line.strip():
            break
    return ""


def data_files(path: Path) -> list[Path]:
    """The files a shipped config reads relative to itself (its ``data_path`` values that exist
    beside it), relative to the configs directory."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    found = []
    for section in raw.values() if isinstance(raw, dict) else ():
        value = section.get("data_path") if isinstance(section, dict) else None
        if isinstance(value, str) and not Path(value).is_absolute() and (path.parent / value).is_file():
            found.append(Path(value))
    return sorted(set(found))


def configs_command(requested: list[str], copy_to: Path | None = None, overwrite: bool = False) -> int:
    """``sparsetrain configs [NAME...] [--copy DIR]``: list, print or copy shipped configs."""
    paths = [builtin_path(PREFIX + n.removeprefix(PREFIX)) for n in requested]
    if copy_to is not None:
        for line in copy_configs(paths or [CONFIG_DIR / f"{n}.yaml" for n in names()], copy_to, overwrite):
            print(line)
        return 0
    if len(paths) == 1:
        print(paths[0].read_text(encoding="utf-8"), end="")
        return 0
    for path in paths:
        print(f"# ---- builtin:{path.stem}\n{path.read_text(encoding='utf-8')}")
    if not paths:
        width = max(map(len, names()))
        for name in names():
            print(f"{name:<{width}}  {description(CONFIG_DIR / f'{name}.yaml')}")
        print("\nuse one: sparsetrain train --params builtin:NAME --model_dir DIR; copy: sparsetrain configs NAME --copy DIR")
    return 0


def copy_configs(paths: list[Path], out_dir: Path, overwrite: bool) -> list[str]:
    """Copy ``paths`` and their data files into ``out_dir``; nothing is replaced without
    ``overwrite``, and nothing is written when one file would be refused."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--copy {out_dir}: not a directory")
    files = sorted({*(Path(p.name) for p in paths), *(f for p in paths for f in data_files(p))})
    clashes = [str(out_dir / f) for f in files if (out_dir / f).exists()]
    if clashes and not overwrite:
        raise UserError(f"--copy {out_dir}: {clashes[0]} exists" + (f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else "")
                        + "; pass --overwrite to replace, or choose another directory")
    written = []
    for f in files:
        target = out_dir / f
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CONFIG_DIR / f, target)
        written.append(f"wrote {target}")
    return written
