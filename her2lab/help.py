"""``--help`` of the Hydra commands: the config groups a command composes, with their options.

Hydra's own listing shows every group under ``conf/`` for every command, partial configs
(``_``-prefixed) included. Here each command lists only the groups of its own defaults list
(``train``: model, backbone, data, …; ``eval``: cohort), without the partial configs. Only
PyYAML is needed, so ``--help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from her2lab import CONF_DIR


def command_groups(config_name: str, conf_dir: Path = CONF_DIR) -> dict[str, str | None]:
    """Group → default option (None for ``null``) of primary config ``config_name``'s defaults list."""
    data = yaml.safe_load((conf_dir / f"{config_name}.yaml").read_text()) or {}
    groups: dict[str, str | None] = {}
    for entry in data.get("defaults", []):
        if not isinstance(entry, dict):
            continue  # _self_
        for key, value in entry.items():
            key = key.removeprefix("optional ").strip()
            if key.startswith("override ") or key == "hydra" or key.startswith("hydra/"):
                continue
            groups[key] = None if value is None else str(value)
    return groups


def options(group: str, conf_dir: Path = CONF_DIR) -> list[str]:
    """The options of ``group`` a user can pick (partial ``_``-prefixed configs left out)."""
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml") if not p.stem.startswith("_"))


def groups_text(config_name: str) -> str:
    """One line per group: ``  model: abmil*, convnext, …`` (``*``: the default)."""
    lines = []
    groups = command_groups(config_name)
    width = max(map(len, groups), default=0)
    for group, default in groups.items():
        opts = [f"{o}*" if o == default else o for o in options(group)]
        lines.append(f"  {group + ':':<{width + 1}} {', '.join(opts)}" + ("" if default else "   (none by default)"))
    return "\n".join(lines)


def register_resolvers(summaries: dict[str, str]) -> None:
    """``${her2lab.help_groups:<config>}`` and ``${her2lab.summary:<command>}`` (from ``summaries``)
    for the help template."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("her2lab.help_groups", groups_text, replace=True)
    OmegaConf.register_new_resolver("her2lab.summary", lambda name: summaries.get(name, ""), replace=True)
