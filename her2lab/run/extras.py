"""What the ``extras`` config group asks of a training run before any work: silence warnings, insist
on tags that name the run, show the resolved config as a tree.

``extras.print_config`` prints the tree on the console and saves it as ``config_tree.log`` in the
run folder; ``extras.enforce_tags`` stops a run whose ``tags`` are empty or still train.yaml's
placeholder; ``extras.ignore_warnings`` filters out Python warnings.
"""

from __future__ import annotations

import io
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from her2lab.errors import Her2labError

log = logging.getLogger(__name__)

PLACEHOLDER_TAGS = ("dev",)  # train.yaml's tags: a run that keeps them has not been named
# The groups shown first, in this order; the other keys follow in the config's order.
TREE_ORDER = (
    "cohort",
    "labels",
    "backbone",
    "tiling",
    "data",
    "model",
    "trainer",
    "callbacks",
    "logger",
    "paths",
    "extras",
)


def apply_extras(cfg: DictConfig, run_dir: Path | None = None, show: bool = True) -> None:
    """Do what ``cfg.extras`` asks (nothing without it); ``show=False`` (ranks other than 0)
    checks the tags but prints and writes nothing."""
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        log.info("extras.ignore_warnings: Python warnings are silenced")
        warnings.filterwarnings("ignore")
    if extras.get("enforce_tags"):
        enforce_tags(cfg)
    if extras.get("print_config") and show:
        print_config_tree(cfg, run_dir / "config_tree.log" if run_dir is not None else None)


def enforce_tags(cfg: DictConfig) -> None:
    """A one-line error unless ``cfg.tags`` names the run (not empty, not the placeholder)."""
    tags = [str(t) for t in cfg.get("tags") or []]
    if not tags or tuple(tags) == PLACEHOLDER_TAGS:
        shown = f"[{','.join(tags)}]" if tags else "none"
        raise Her2labError(
            f"extras.enforce_tags is on and this run has no tags of its own ({shown}); "
            "name it with tags=[…], e.g. tags=[abmil,lr-sweep]"
        )


def config_tree(cfg: DictConfig, order: Sequence[str] = TREE_ORDER, wrap: bool = False):
    """The resolved config as a :class:`rich.tree.Tree`: one branch per top-level key (the groups
    of ``order`` first), its value as YAML; ``wrap``: long lines wrap (else they are cropped)."""
    from rich.syntax import Syntax
    from rich.text import Text
    from rich.tree import Tree

    def yaml(text: str) -> Syntax:
        return Syntax(text, "yaml", background_color="default", word_wrap=wrap)

    tree = Tree(Text("CONFIG", style="dim"), guide_style="dim")
    for key in [k for k in order if k in cfg] + [k for k in cfg if k not in order]:
        value = cfg[key]  # reading a value resolves its interpolations
        if isinstance(value, DictConfig | ListConfig) and len(value):
            tree.add(Text(str(key), style="bold"), guide_style="dim").add(
                yaml(OmegaConf.to_yaml(value, resolve=True).rstrip("\n"))
            )
        else:  # a scalar (or an empty node) on one line, as YAML writes it
            tree.add(yaml(OmegaConf.to_yaml({key: value}, resolve=True).strip()))
    return tree


def print_config_tree(cfg: DictConfig, path: Path | None = None) -> str:
    """Print :func:`config_tree` on the console (in colour on a terminal) and write it as plain
    text to ``path``; the text. Nothing is cropped: a terminal wraps long lines, the text keeps them."""
    from rich.console import Console

    recorder = Console(file=io.StringIO(), record=True, width=1000, no_color=True)
    recorder.print(config_tree(cfg))
    text = "\n".join(line.rstrip() for line in recorder.export_text().splitlines()) + "\n"
    console = Console(highlight=False)
    if console.is_terminal:
        console.print(config_tree(cfg, wrap=True))
    else:  # a log file: the plain text, one config line a line
        sys.stdout.write(text)
        sys.stdout.flush()
    if path is not None:
        Path(path).write_text(text)
    return text
