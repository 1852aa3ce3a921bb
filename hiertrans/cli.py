"""`python -m hiertrans {fit,validate,test,predict} --config lm.yaml`: one LightningCLI for every task.

Configs use subclass form (`model: {class_path, init_args}`, same for `data`), so any
LightningModule/LightningDataModule of this project (or the user's) plugs in. A bare config name
such as `lm.yaml` resolves to the configs shipped with the package.
"""

import sys
from pathlib import Path

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

_HERE = Path(__file__).resolve().parent
# installed: hiertrans/configs; source checkout or editable install: the repository's configs/
CONFIG_DIRS = (_HERE / "configs", _HERE.parent / "configs")


def shipped_configs() -> list[str]:
    return sorted({p.name for d in CONFIG_DIRS if d.is_dir() for p in d.glob("*.yaml")})


def resolve_config(name: str) -> str:
    """A path that exists is used as is; otherwise a bare name is looked up among the shipped configs."""
    if Path(name).exists() or Path(name).parent != Path("."):
        return name
    for directory in CONFIG_DIRS:
        for candidate in (directory / name, directory / f"{name}.yaml"):
            if candidate.is_file():
                return str(candidate)
    return name


def resolve_config_args(args: list[str]) -> list[str]:
    out, args = [], list(args)
    while args:
        arg = args.pop(0)
        if arg in ("--config", "-c") and args:
            out += [arg, resolve_config(args.pop(0))]
        elif arg.startswith("--config="):
            out.append("--config=" + resolve_config(arg.split("=", 1)[1]))
        else:
            out.append(arg)
    return out


def main(args: list[str] | None = None) -> None:
    args = resolve_config_args(sys.argv[1:] if args is None else args)
    LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        # the modules build their own optimizers (weight-decay groups, warm-up + cosine)
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
    )
