"""`python -m hiertrans {fit,validate,test,predict} --config lm.yaml`: one LightningCLI for every task.
`python -m hiertrans export --config X.yaml --ckpt_path CKPT --out DIR [--ema]` writes a checkpoint's
network as a Hugging Face-style folder (`save_pretrained`; `export`).

Configs use subclass form (`model: {class_path, init_args}`, same for `data`), so any
LightningModule/LightningDataModule of this project (or the user's) plugs in. A bare config name
such as `lm.yaml` resolves to the configs shipped with the package.

User errors (a bad config, a missing data path, an invalid hyperparameter, a corrupt image, ...)
end with one short `hiertrans: error: ...` line on stderr and exit code 2, and a run that failed
before it saved a checkpoint leaves no run directory behind. `--traceback` (or the environment
variable `HIERTRANS_TRACEBACK=1`) re-raises instead, for debugging. Other exceptions are bugs and
keep their traceback.

`fit --ckpt_path last` resumes the newest `last.ckpt` of the configured logger's runs (a file, or the
directory of a distributed fsdp2 checkpoint) and keeps logging into that run's directory (Lightning
alone would look in a fresh `version_N+1`). Every `--ckpt_path` is checked before anything runs: a file
that is not a checkpoint, a truncated one, one of the other task or of a network of another shape is a
user error naming the file and what is wrong.
"""

from __future__ import annotations

import importlib
import inspect
import os
import pickle
import re
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ArgumentError
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

_HERE = Path(__file__).resolve().parent
# installed: hiertrans/configs; source checkout or editable install: the repository's configs/
CONFIG_DIRS = (_HERE / "configs", _HERE.parent / "configs")
SUBCOMMANDS = ("fit", "validate", "test", "predict")


class UserError(Exception):
    """A mistake in the command line, the config or the data: reported in one line, no traceback."""


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


def check_config_files(args: list[str]) -> None:
    """Fail early, naming the shipped configs, when a `--config` file does not exist."""
    for i, arg in enumerate(args):
        value = args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else None
        if arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        if value is None:
            continue
        if not Path(value).is_file():
            raise UserError(f"config file {value!r} not found; shipped configs: {', '.join(shipped_configs())}")
        try:  # jsonargparse's YAML message does not say which file it was reading
            yaml.safe_load(Path(value).read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            raise UserError(f"config file {value!r} is not valid YAML{where}: {problem}") from exc


# ---------------------------------------------------------------------------------------------
# resuming with --ckpt_path last


def _logger_run_root(logger_cfg: Any) -> tuple[Path, str] | None:
    """(save_dir, name) under which a single TensorBoard, CSV or W&B logger's runs keep their
    `<version>/checkpoints/` (W&B: `<save_dir>/<project>/<run id>/`), else None."""
    init = getattr(logger_cfg, "init_args", None)
    save_dir = getattr(init, "save_dir", None) if init is not None else None
    if save_dir is None:
        return None
    if str(getattr(logger_cfg, "class_path", "")).endswith("WandbLogger"):
        return Path(str(save_dir)), str(getattr(init, "project", None) or "lightning_logs")
    return Path(str(save_dir)), str(getattr(init, "name", None) or "lightning_logs")


def _describe_logger(logger_cfg: Any) -> str:
    if isinstance(logger_cfg, (list, tuple)):
        return f"a list of {len(logger_cfg)} loggers"
    return str(getattr(logger_cfg, "class_path", None) or logger_cfg)


def find_last_checkpoint(save_dir: Path, name: str) -> tuple[Path, int | str] | None:
    """The newest `<save_dir>/<name>/<version>/checkpoints/last.ckpt` (a file, or a distributed checkpoint's
    directory) and its version (an int for version_N)."""
    candidates = sorted((save_dir / name).glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        return None
    last = candidates[-1]
    version_dir = last.parent.parent.name
    match = re.fullmatch(r"version_(\d+)", version_dir)
    return last, int(match.group(1)) if match else version_dir


# ---------------------------------------------------------------------------------------------
# checking --ckpt_path

LIGHTNING_CKPT_NAMES = ("best", "last", "hpc", "registry")  # resolved by Lightning itself
META_FILE = "meta.pt"  # Lightning's metadata file inside a distributed checkpoint directory


def read_checkpoint(path: str | Path, weights_only: bool = True) -> tuple[dict[str, Any], dict[str, tuple[int, ...]]]:
    """`(metadata, parameter shapes)` of a Lightning checkpoint: a file, or the directory of a distributed
    (fsdp2) checkpoint. The metadata is the checkpoint without its tensors' values (hyper-parameters,
    loop state); shapes are `{state_dict key: shape}`. `UserError` naming the file and what is wrong."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"--ckpt_path {str(path)!r} does not exist")
    if path.is_dir():
        if not (path / META_FILE).is_file():
            raise UserError(f"--ckpt_path {str(path)!r} is a directory, not a checkpoint (a checkpoint is a .ckpt "
                            f"file, or a distributed checkpoint directory holding {META_FILE})")
        from torch.distributed.checkpoint import FileSystemReader

        meta = _load(path / META_FILE, path, weights_only)
        try:
            tensors = FileSystemReader(str(path)).read_metadata().state_dict_metadata
        except Exception as exc:  # noqa: BLE001 - any unreadable shard index is the same user problem
            raise UserError(f"--ckpt_path {str(path)!r}: its distributed-checkpoint index is unreadable "
                            f"({_first_line(exc)}): the directory is incomplete or damaged") from None
        shapes = {key.removeprefix("state_dict."): tuple(getattr(value, "size", ()))
                  for key, value in tensors.items() if key.startswith("state_dict.")}
        return meta, shapes
    checkpoint = _load(path, path, weights_only)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict):
        what = f"keys {sorted(map(str, checkpoint))[:6]}" if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UserError(f"--ckpt_path {str(path)!r} is not a Lightning checkpoint: it holds no state_dict ({what})")
    shapes = {key: tuple(value.shape) for key, value in state.items() if hasattr(value, "shape")}
    return {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states",
                                                               "current_model_state")}, shapes


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(". ")


def _load(file: Path, shown: Path, weights_only: bool) -> Any:
    import torch

    with open(file, "rb") as f:
        head = f.read(4)
    zipped = head == b"PK\x03\x04"  # torch.save's format since PyTorch 1.6 (legacy files are a bare pickle)
    if not zipped and head[:1] != b"\x80":
        raise UserError(f"--ckpt_path {str(shown)!r} is not a PyTorch checkpoint (neither a torch.save zip "
                        f"archive nor a pickle: it starts with {head!r})")
    try:
        return torch.load(file, map_location="cpu", weights_only=weights_only, mmap=zipped)
    except pickle.UnpicklingError as exc:
        if weights_only and "weights only load failed" in str(exc).lower():
            raise UserError(f"--ckpt_path {str(shown)!r} holds pickled objects other than plain data, which "
                            f"weights_only=True refuses; load it only if you trust its author: "
                            f"--weights_only=false") from None
        raise UserError(f"--ckpt_path {str(shown)!r} is corrupt: {_first_line(exc)}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise UserError(f"--ckpt_path {str(shown)!r} is truncated or corrupt (torch.load: "
                        f"{_first_line(exc)[:160]})") from None


def checkpoint_model_config(path: str, meta: dict[str, Any], class_path: str | None) -> dict[str, Any] | None:
    """The model config LightningCLI will read from the checkpoint's hyperparameters (`{"class_path",
    "dict_kwargs"}`, None when it has none), after checking it was written by the configured task."""
    hparams = {k: v for k, v in (meta.get("hyper_parameters") or {}).items() if k != "_instantiator"}
    if not hparams:
        return None
    written_by = hparams.pop("_class_path", None)
    if written_by is None:
        raise UserError(f"--ckpt_path {path!r} was saved from Python, not by `python -m hiertrans fit`: its "
                        f"hyperparameters name no task, so the CLI cannot rebuild the model from them; load it "
                        f"in Python with <task>.load_from_checkpoint(path, net=...)")
    if class_path is not None and written_by != class_path:
        raise UserError(f"--ckpt_path {path!r} was written by {written_by}, but the config trains {class_path}: "
                        f"use a checkpoint of this task, or the config it was trained with")
    module, _, name = written_by.rpartition(".")
    parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    unknown = sorted(k for k in hparams if k not in parameters)
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        raise UserError(f"--ckpt_path {path!r} holds arguments {written_by} does not take (written by another "
                        f"version?): {', '.join(unknown)}")
    return {"class_path": written_by, "dict_kwargs": hparams}


def check_checkpoint_fits(path: str, shapes: dict[str, tuple[int, ...]], model: Any) -> None:
    """Every parameter and buffer of `model` is in the checkpoint with the same shape, and nothing else."""
    own = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own]
    resized = [f"{k} is {tuple(shapes[k])} in the checkpoint but {own[k]} in the model"
               for k in own if k in shapes and tuple(shapes[k]) != own[k]]
    if not (missing or unexpected or resized):
        return
    problems = []
    if resized:
        problems.append("; ".join(resized[:2]) + (f" (and {len(resized) - 2} more)" if len(resized) > 2 else ""))
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            problems.append(f"{len(keys)} {what} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
    raise UserError(f"--ckpt_path {path!r} does not fit the configured network: {'; '.join(problems)} (a network "
                    f"of another shape or kind; pass the config it was trained with)")


# ---------------------------------------------------------------------------------------------
# export


def export(args: list[str]) -> Path:
    """`export --config X.yaml --ckpt_path CKPT --out DIR [--ema]`: the network of a training checkpoint
    (a file, or a distributed checkpoint's directory) saved with its `save_pretrained` (`model.safetensors`
    + `config.json`, see `hiertrans.hub`), so `Class.from_pretrained(DIR)` rebuilds it. The network is
    the one the checkpoint's hyperparameters describe (the config names the task, which must match);
    its trained weights, or with `--ema` the EMA weights an EMA callback saved. The folder appears
    whole or not at all; an existing `--out` is refused."""
    import argparse
    import tempfile

    import torch

    from hiertrans.io import atomic_directory

    check_config_files(args)
    parser = argparse.ArgumentParser(prog="python -m hiertrans export", exit_on_error=False,
                                     description="Save a checkpoint's network as a save_pretrained folder.")
    parser.add_argument("--config", "-c", action="append", default=[], help="the config the run was trained with")
    parser.add_argument("--ckpt_path", help="a checkpoint written by `python -m hiertrans fit`")
    parser.add_argument("--out", help="the folder to write (must not exist)")
    parser.add_argument("--ema", action="store_true", help="the EMA weights (trained with an EMA callback)")
    opts, unknown = parser.parse_known_args(args)
    if unknown:
        raise UserError(f"export takes --config, --ckpt_path, --out and --ema, not {' '.join(unknown)} (the network "
                        f"is the one the checkpoint describes)")
    if not opts.ckpt_path or not opts.out:
        raise UserError("export needs --ckpt_path CKPT and --out DIR")
    out = Path(opts.out)
    if out.exists():
        raise UserError(f"--out {str(out)!r} already exists: remove it or choose a new folder")
    class_path = None
    for config in opts.config:
        class_path = ((yaml.safe_load(Path(config).read_text()) or {}).get("model") or {}).get("class_path", class_path)
    meta, _ = read_checkpoint(opts.ckpt_path)
    model = checkpoint_model_config(opts.ckpt_path, meta, class_path)
    if model is None:
        raise UserError(f"--ckpt_path {opts.ckpt_path!r} holds no hyperparameters to rebuild the network from")
    module, _, name = model["class_path"].rpartition(".")
    task = getattr(importlib.import_module(module), name)
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(opts.ckpt_path)
        if file.is_dir():  # a distributed checkpoint: gathered into one file first
            from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

            dcp_to_torch_save(file, Path(tmp) / "full.ckpt")
            file = Path(tmp) / "full.ckpt"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*WeightAveraging callback.*")
            # the checkpoint's state_dict: the averaged weights when an EMA callback saved it
            loaded = task.load_from_checkpoint(file, map_location="cpu", weights_only=True)
        trained = torch.load(file, map_location="cpu", weights_only=True, mmap=True).get("current_model_state")
        if opts.ema and trained is None:
            raise UserError(f"--ckpt_path {opts.ckpt_path!r} holds no EMA weights (trained without an EMA callback "
                            f"or ema_decay): export without --ema")
        if trained is not None and not opts.ema:
            loaded.load_state_dict(trained)
    net = getattr(loaded, "net", loaded)
    if not callable(getattr(net, "save_pretrained", None)):
        raise UserError(f"{type(net).__name__} has no save_pretrained (hiertrans.hub.HubMixin): it cannot be exported")
    with atomic_directory(out) as tmp:
        net.save_pretrained(tmp)
    print(f"hiertrans: wrote {'the EMA weights of ' if opts.ema else ''}{type(net).__name__} to {out} "
          f"({type(net).__name__}.from_pretrained({str(out)!r}) loads it)", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------
# the CLI


class _RunStarted(Callback):
    """Marks the moment the loops start real work: a ValueError before it is a user error.

    The sanity-check batches still count as start-up (a bad validation setup shows there first).
    Predict is left out on purpose: a prompt error raises inside `predict_step`.
    """

    def __init__(self) -> None:
        self.started = False

    def _start(self, trainer: Any, *args: Any) -> None:
        self.started = self.started or not trainer.sanity_checking

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = _start


class HiertransCLI(LightningCLI):
    """LightningCLI plus: `--ckpt_path last` resumes the logger's newest run; early checks."""

    current: HiertransCLI | None = None  # the CLI of this process, for main() when __init__ raises

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if sub is None:
            return
        if "weights_only" in self.config[sub] and self.config[sub].weights_only is None:
            # our checkpoints are plain data: never unpickle arbitrary objects (Lightning's None means
            # torch's default for local files but False for remote ones); --weights_only=false opts out
            self.config[sub].weights_only = True
        self.checkpoint_shapes = None
        if sub == "fit" and self.config[sub].get("ckpt_path") == "last":
            logger_cfg = self.config[sub].trainer.get("logger")
            root = _logger_run_root(logger_cfg)
            if logger_cfg in (None, True):  # Lightning's default logger: TensorBoard under default_root_dir
                root = Path(str(self.config[sub].trainer.get("default_root_dir") or ".")), "lightning_logs"
            if logger_cfg is False:  # one fixed <default_root_dir>/checkpoints: Lightning resolves "last" itself
                root = None
            elif root is None:
                raise UserError(f"--ckpt_path last: cannot tell where the last run's checkpoints are with "
                                f"trainer.logger={_describe_logger(logger_cfg)} (it looks under one TensorBoard, CSV "
                                f"or W&B logger's save_dir); pass the checkpoint's path instead")
            found = find_last_checkpoint(*root) if root else None
            if found is not None:  # else nothing to resume: start from scratch, as Lightning does (it warns)
                ckpt, version = found
                self.config[sub].ckpt_path = str(ckpt)
                if getattr(logger_cfg, "init_args", None) is not None:  # log into the interrupted run's directory
                    logger_cfg.init_args.version = version
                print(f"hiertrans: resuming from {ckpt}", file=sys.stderr)
        ckpt_path = self.config[sub].get("ckpt_path")
        if ckpt_path and ckpt_path not in LIGHTNING_CKPT_NAMES:
            # before LightningCLI reads its hyperparameters: a bad file fails here, in one line
            meta, self.checkpoint_shapes = read_checkpoint(ckpt_path, self.config[sub].get("weights_only") is not False)
            model = checkpoint_model_config(ckpt_path, meta, getattr(self.config[sub].get("model"), "class_path", None))
            if model is not None:  # what LightningCLI does next, with the file named when it fails
                try:
                    parser.parse_object({sub: {"model": model}}, self.config.clone())
                except ArgumentError as exc:
                    raise UserError(f"--ckpt_path {ckpt_path!r}: its hyperparameters do not fit {model['class_path']} "
                                    f"(written by another version?): {_argument_error_message(str(exc))}") from None

    def after_instantiate_classes(self) -> None:
        super().after_instantiate_classes()
        HiertransCLI.current = self
        ckpt_path = self.config[self.subcommand].get("ckpt_path")
        if getattr(self, "checkpoint_shapes", None) is not None:
            if Path(ckpt_path).is_dir() and not isinstance(self.trainer.strategy, ModelParallelStrategy):
                raise UserError(f"--ckpt_path {ckpt_path!r} is a distributed checkpoint (one shard per rank): load it "
                                f"with --trainer.strategy=fsdp2 (any number of processes)")
            check_checkpoint_fits(ckpt_path, self.checkpoint_shapes, self.model)
        if isinstance(self.trainer.strategy, ModelParallelStrategy):
            task_callbacks = self.model.configure_callbacks() or []  # e.g. the classifier's ema_decay
            averaging = [type(cb).__name__ for cb in [*self.trainer.callbacks, *task_callbacks]
                         if isinstance(cb, WeightAveraging)]
            if averaging:
                raise UserError(f"trainer.callbacks: {averaging[0]} (EMA) does not support sharded models: use "
                                f"--trainer.strategy=ddp with it, or remove it for fsdp2")
        self.run_started = _RunStarted()
        self.trainer.callbacks.append(self.run_started)
        if self.subcommand == "fit":
            from lit_modules.callbacks import SaveOnSigterm, StopOnNonFiniteLoss

            # nothing lost on pre-emption, nothing saved from a NaN: on for every fit, whatever the config
            for kind in (SaveOnSigterm, StopOnNonFiniteLoss):
                if not any(isinstance(cb, kind) for cb in self.trainer.callbacks):
                    self.trainer.callbacks.append(kind())
        self.new_paths = self._paths_this_run_may_create()
        if self.subcommand == "predict":
            self._check_prompt()

    def _paths_this_run_may_create(self) -> list[Path]:
        """Log/checkpoint directories that do not exist yet (and their missing parents)."""
        dirs = []
        for logger in self.trainer.loggers:
            log_dir = getattr(logger, "log_dir", None)  # TensorBoard: computes the next version number
            if log_dir:
                dirs.append(Path(log_dir))
        for cb in self.trainer.checkpoint_callbacks:
            if getattr(cb, "dirpath", None):
                dirs.append(Path(cb.dirpath))
        missing = []
        for d in dirs:
            d = d.absolute()
            while not d.exists() and d != d.parent:
                missing.append(d)
                d = d.parent
        return missing

    def remove_partial_run(self) -> None:
        """Delete directories this failed run created, unless a checkpoint was saved into them."""
        for d in sorted(set(getattr(self, "new_paths", [])), key=lambda p: len(p.parts)):
            if d.is_dir() and not any(d.rglob("*.ckpt")):
                shutil.rmtree(d, ignore_errors=True)

    def _check_prompt(self) -> None:
        prompt = getattr(self.datamodule, "prompt", None)
        seq_len = getattr(getattr(self.model, "net", None), "seq_len", None)
        if isinstance(prompt, str) and seq_len is not None and len(prompt.encode("utf-8")) > seq_len:
            raise UserError(f"data.init_args.prompt is {len(prompt.encode('utf-8'))} bytes, longer than the "
                            f"model's seq_len={seq_len}")


def _root_cause(exc: BaseException) -> BaseException:
    """jsonargparse wraps a constructor's ValueError in 'Does not validate against any of the Union
    subtypes'; the original is its __cause__."""
    while exc.__cause__ is not None and isinstance(exc.__cause__, Exception):
        exc = exc.__cause__
    return exc


# jsonargparse's noise: the whole parsed value and the Union alternatives that did not apply
_NOISE = ("Given value", "Subtypes:", "- Expected a <class 'NoneType'>")


def _argument_error_message(message: str) -> str:
    """`model.init_args.depth: Expected a <class 'int'>. Got value: abc` from jsonargparse's nested report."""
    keys = re.findall(r'Parser key "([^"]+)"', message)
    skip = _NOISE + ("Parser key", "Does not validate against", "Errors:", "Problem with given class_path")
    lines = [ln.strip().lstrip("- ") for ln in message.splitlines()
             if ln.strip() and not ln.strip().lstrip("- ").startswith(skip)]
    detail = "; ".join(dict.fromkeys(lines)) or message.strip()
    if len(keys) > 1 and keys[0] in ("model", "data"):  # each nesting level is a class: its arguments are init_args
        keys = [keys[0], *(part for key in keys[1:] for part in ("init_args", key))]
    return f"{'.'.join(keys)}: {detail}" if keys else detail


def _short(message: str, max_lines: int = 4) -> str:
    lines = [ln for ln in message.strip().splitlines() if ln.strip() and not ln.lstrip().startswith(_NOISE)]
    return "\n  ".join(lines[:max_lines]) or "(no message)"


USER_ERRORS = (UserError, ArgumentError, ValueError, TypeError, FileNotFoundError, NotADirectoryError,
               IsADirectoryError, PermissionError, MisconfigurationException)


def _is_user_error(exc: BaseException, cli: HiertransCLI | None) -> bool:
    if isinstance(exc, UserError | ArgumentError):
        return True
    from datamodules.images import CorruptImageError  # a data problem wherever it surfaces

    if isinstance(exc, CorruptImageError):
        return True
    started = cli is not None and getattr(getattr(cli, "run_started", None), "started", False)
    return isinstance(exc, USER_ERRORS) and not started


def run(args: list[str]) -> HiertransCLI:
    import lit_modules.fsdp2  # noqa: F401 - registers --trainer.strategy=fsdp2

    check_config_files(args)
    # jsonargparse raises instead of printing its 50-line usage: main() prints one line
    parser_kwargs: dict[str, Any] = {"exit_on_error": False, **{s: {"exit_on_error": False} for s in SUBCOMMANDS}}
    with warnings.catch_warnings():
        # we pass args= on purpose (resolved config names), not by mistake
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter is intended.*")
        # EMAWeightAveraging warns for every task (they define configure_model for fsdp2, which it then
        # refuses), and when a checkpoint is loaded outside fit (validate/test/predict use the averaged
        # weights the checkpoint holds): neither is a problem here
        warnings.filterwarnings("ignore", message=".*WeightAveraging callback with a model that overrides.*")
        warnings.filterwarnings("ignore", message=".*WeightAveraging callback, but loading a checkpoint outside.*")
        # our training samplers restart mid-epoch themselves (EpochSampler, EpochShuffleSampler)
        warnings.filterwarnings("ignore", message=".*before the epoch ended and your dataloader is not resumable.*")
        return HiertransCLI(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            # the modules build their own optimizers (weight-decay groups, warm-up + cosine)
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            parser_kwargs=parser_kwargs,
            args=args,
        )


def main(args: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if args is None else args)
    debug = "--traceback" in args or os.environ.get("HIERTRANS_TRACEBACK", "") not in ("", "0")
    args = resolve_config_args([a for a in args if a != "--traceback"])
    HiertransCLI.current = None
    try:
        export(args[1:]) if args[:1] == ["export"] else run(args)
    except SIGTERMException:
        # SaveOnSigterm wrote last.ckpt; 128 + SIGTERM is the exit status schedulers expect
        print("hiertrans: stopped by SIGTERM; continue with --ckpt_path last", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except Exception as exc:  # sorted into user errors and bugs below
        cli = HiertransCLI.current
        from lit_modules.callbacks import NonFiniteLossError

        if isinstance(exc, NonFiniteLossError):
            if debug:
                raise
            print(f"hiertrans: error: {exc}", file=sys.stderr)
            sys.exit(1)
        if not _is_user_error(exc, cli):
            raise
        if cli is not None:
            cli.remove_partial_run()
        if debug:
            raise
        cause = exc if isinstance(exc, UserError) else _root_cause(exc)
        message = _argument_error_message(str(exc)) if isinstance(exc, ArgumentError) else _short(str(cause))
        where = re.search(r"class_path='([\w.]+)'", str(exc))
        if where and where.group(1) not in message:
            message = f"{where.group(1)}: {message}"
        if isinstance(cause, ArgumentError | UserError) or isinstance(exc, ArgumentError):
            sub = next((a for a in args if a in (*SUBCOMMANDS, "export")), "fit")
            message += f"\n  (python -m hiertrans {sub} --help lists every option)"
        print(f"hiertrans: error: {message}", file=sys.stderr)
        sys.exit(2)
