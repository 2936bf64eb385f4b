"""``her2lab <command> …``: one console command for every task.

=========  ===========================================  ==========================================
command    what it runs                                  same as, in a clone
=========  ===========================================  ==========================================
train      train one model (``-m``: sweeps)              ``python train.py …``
eval       test a run, or score new slides with it       ``python eval.py …``
prepare    tissue, tiles, thumbnails and QC of a cohort  ``python -m her2lab.prepare …``
extract    embed every tile with a frozen encoder        ``python -m her2lab.extract …``
cv         cross-validation summary of a sweep folder    ``python -m her2lab.cv …``
compare    experiments side by side on the same slides   ``python -m her2lab.compare …``
doctor     what this machine has: versions, GPU, slides  ``python -m her2lab.doctor``
=========  ===========================================  ==========================================

The Hydra tasks take the same overrides as the scripts and compose the configs shipped inside
the package (:data:`her2lab.CONF_DIR`), so they run from any folder; relative paths (``data/``,
``logs/``) resolve against the folder they are launched from.

Nothing heavy is imported here: Lightning, torch and the slide readers load only once a task
runs, so ``--help`` answers at once.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from her2lab import CONF_DIR, __version__
from her2lab.errors import one_line_errors


@dataclass(frozen=True)
class Command:
    name: str
    summary: str
    target: str  # "module:function"
    config: str | None = None  # Hydra primary config; None: an argparse command taking argv


COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command("train", "train one model (-m for sweeps, e.g. -m fold=0,1,2,3,4)", "her2lab.run.train:train", "train"),
        Command("eval", "test a trained run, or score new slides with it (a fold sweep as an ensemble)",
                "her2lab.run.predict:score", "eval"),
        Command("prepare", "tissue masks, tile grids, thumbnails and QC pictures of a cohort",
                "her2lab.run.prepare:prepare_task", "prepare"),
        Command("extract", "embed every tile of a cohort with a frozen encoder", "her2lab.run.extract:run_extract",
                "extract"),
        Command("cv", "cross-validation summary of a sweep folder", "her2lab.cv:main"),
        Command("compare", "experiments side by side on the same slides", "her2lab.compare:main"),
        Command("doctor", "what this machine has: versions, GPU, OpenSlide, folders, W&B", "her2lab.doctor:main"),
    )
}


def _load(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _eval_dir(*args: Any) -> str:
    from her2lab.eval.run_folder import eval_dir

    return eval_dir(*args)


# One module-level function per Hydra task (sweep launchers pickle the task function by reference).
@one_line_errors
def train_task(cfg: Any) -> Any:
    return _load(COMMANDS["train"].target)(cfg)


@one_line_errors
def eval_task(cfg: Any) -> Any:
    return _load(COMMANDS["eval"].target)(cfg)


@one_line_errors
def prepare_task(cfg: Any) -> Any:
    return _load(COMMANDS["prepare"].target)(cfg)


@one_line_errors
def extract_task(cfg: Any) -> Any:
    return _load(COMMANDS["extract"].target)(cfg)


_TASKS = {"train": train_task, "eval": eval_task, "prepare": prepare_task, "extract": extract_task}


def run_task(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> Any:
    """Run Hydra task ``name`` on ``argv`` (default: ``sys.argv[1:]``) as its script would."""
    import hydra
    from omegaconf import OmegaConf

    from her2lab.help import register_resolvers

    OmegaConf.register_new_resolver("her2lab.eval_dir", _eval_dir, replace=True)
    register_resolvers({c.name: c.summary for c in COMMANDS.values()})
    command = COMMANDS[name]
    if argv is not None:
        sys.argv = [prog or f"her2lab {name}", *argv]
    args = sys.argv[1:]
    if any(a in ("-h", "--help") for a in args) and print_help(name, [a for a in args if a not in ("-h", "--help")]):
        return None
    main = hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=command.config)(_TASKS[name])
    return main()


def print_help(name: str, overrides: list[str]) -> bool:
    """``--help`` of Hydra command ``name``: the template of ``conf/hydra/help/her2lab.yaml`` filled
    with the config composed from ``overrides``. Hydra's own ``--help`` would also list every
    config group of every command, which takes longer than the rest together (the template does
    not show that list). False when this cannot answer (e.g. sweep or Hydra flags among the
    overrides): Hydra's own ``--help`` then does."""
    import string

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    if any(a.startswith("-") for a in overrides):
        return False
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name=name):
            cfg = compose(config_name=COMMANDS[name].config, overrides=overrides, return_hydra_config=True)
        template = cfg.hydra.help.template
        with open_dict(cfg):
            del cfg["hydra"]
        text = string.Template(template).safe_substitute(CONFIG=OmegaConf.to_yaml(cfg))
    except Exception:
        return False
    print(text)
    return True


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        f"her2lab {__version__}: HER2 scoring from whole-slide images",
        "",
        "usage: her2lab <command> [overrides …]      (her2lab <command> --help for its options)",
        "",
        "commands:",
        *(f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS.values()),
        "",
        "Hydra commands take group=option and key=value overrides, e.g.",
        "  her2lab prepare cohort=demo",
        "  her2lab train model=abmil backbone=hne",
        "  her2lab train -m fold=0,1,2,3,4",
        "  her2lab eval run_dir=logs/train/multiruns/<time> slides=/path/to/slides",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> Any:
    """The ``her2lab`` console command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return None
    if args[0] == "--version":
        print(f"her2lab {__version__}")
        return None
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; one of: {', '.join(COMMANDS)} (her2lab --help)", file=sys.stderr)
        raise SystemExit(2)
    command = COMMANDS[name]
    if command.config is not None:
        return run_task(name, rest)
    return _load(command.target)(rest)


if __name__ == "__main__":
    main()
