"""The ``scoreflow`` command line (also ``python main.py`` and ``python -m scoreflow``).

Drivers, with the reference's flags::

    scoreflow --config configs/vp/cifar10_ddpmpp_continuous.py --workdir runs/vp --mode train \\
        --config.training.likelihood_weighting=True --config.training.importance_weighting=True
    scoreflow --config ... --workdir ... --mode eval [--eval_folder eval]
    scoreflow --config ... --workdir ... --mode train_deq [--deq_folder flowpp_dequantizer]

Each runs on several GPUs or machines under ``torchrun`` (docs/distributed.md)::

    torchrun --standalone --nproc_per_node=8 -m scoreflow --config ... --workdir ... --mode train

Tools, each with its own flags (``scoreflow convert --help``)::

    scoreflow convert ...      foreign checkpoints to scoreflow's layout
    scoreflow fid-stats ...    FID reference statistics of a data set

A user mistake (unknown flag or mode, missing config file, a bad ``--config.`` override,
incompatible settings, a missing data or checkpoint file, a file system error such as a
``--workdir`` that names a file) ends the program with one line ``scoreflow: error: ...`` on
stderr and exit status 2; a run that diverged exits with 1, an interrupted one (Ctrl-C) with 130.
``SCOREFLOW_TRACEBACK=1`` shows full tracebacks instead. This module computes and writes
nothing: it parses, checks and dispatches (the drivers write the config they run with).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

PROG = "scoreflow"
MODES = ("train", "eval", "train_deq")
USAGE = (
    f"usage: {PROG} --config FILE --workdir DIR --mode {{{'|'.join(MODES)}}} "
    "[--eval_folder NAME] [--deq_folder NAME] [--config.<field>=<value> ...]\n"
    f"       {PROG} convert ...\n"
    f"       {PROG} fid-stats ..."
)

__all__ = ["main", "run"]


def _subcommands() -> dict[str, Callable[[list[str]], int]]:
    """Tools behind ``scoreflow <name> ...``, imported only when used."""

    def convert(argv: list[str]) -> int:
        from scoreflow.convert import convert_main

        return convert_main(argv)

    def fid_stats(argv: list[str]) -> int:
        from scoreflow.evaluate_sampling import stats_main

        return stats_main(argv)

    return {"convert": convert, "fid-stats": fid_stats}


class UsageError(Exception):
    """A mistake on the command line; its message is shown as one line."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    if isinstance(err, KeyError) and err.args:
        text = str(err.args[0])
    if not text and err.__cause__ is not None:
        return _first_line(err.__cause__)
    return text.splitlines()[0] if text else type(err).__name__


def _parse(argv: list[str]):
    """Parse driver flags; returns the parsed FlagValues or raises UsageError."""
    from absl import flags
    from ml_collections import config_flags

    fv = flags.FlagValues()
    config_flags.DEFINE_config_file(
        "config", None, "experiment config file (ml_collections)", flag_values=fv,
        lock_config=True,
    )  # fmt: skip
    flags.DEFINE_string("workdir", None, "folder of the run's checkpoints and logs", flag_values=fv)
    flags.DEFINE_string("mode", None, f"what to run: {', '.join(MODES)}", flag_values=fv)
    flags.DEFINE_string(
        "eval_folder", "eval", "subfolder of workdir for --mode eval", flag_values=fv
    )
    flags.DEFINE_string(
        "deq_folder",
        "flowpp_dequantizer",
        "subfolder of workdir holding the Flow++ dequantiser (train_deq; eval.dequantizer)",
        flag_values=fv,
    )

    if any(a in ("-h", "--help", "--helpfull", "-help") for a in argv[1:]):
        print(USAGE)
        print()
        print(fv.get_help())
        raise SystemExit(0)
    try:
        extra = fv(argv)
        if fv["config"].present or fv["config"].value is not None:
            _ = fv.config.training  # the file is only loaded on first access
    except flags.Error as err:
        raise UsageError(_first_line(err)) from err
    except Exception as err:  # config loading and overrides raise assorted errors
        if "Failed loading config file" in str(err) or "earlier failure" in str(err):
            raise UsageError(f"cannot load the --config file: {_last_line(err)}") from err
        if isinstance(err, AttributeError) and isinstance(err.args[0], KeyError):
            # the field, then possibly ml_collections' "Did you mean ..." on further lines
            field, *hint = str(err.args[0].args[0]).splitlines()
            hint = f" ({' '.join(hint).strip()})" if any(h.strip() for h in hint) else ""
            message = f"unknown config field {field} in a --config.* override{hint}"
            raise UsageError(message) from err
        raise UsageError(f"bad --config override: {_first_line(err)}") from err
    if len(extra) > 1:
        raise UsageError(f"unexpected arguments: {' '.join(extra[1:])}")
    for name in ("config", "workdir", "mode"):
        if fv[name].value is None:
            raise UsageError(f"--{name} is required (see {PROG} --help)")
    if fv.mode not in MODES:
        raise UsageError(f"unknown --mode {fv.mode!r}; choose one of {', '.join(MODES)}")
    if Path(fv.workdir).exists() and not Path(fv.workdir).is_dir():
        raise UsageError(f"--workdir {fv.workdir} is a file; name a folder (created if missing)")
    return fv


def _last_line(err: BaseException) -> str:
    for line in str(err).splitlines()[::-1]:
        if line.strip():
            return line.strip()
    return type(err).__name__


def _dispatch(fv) -> None:
    """Check the config, join the process group (under torchrun), run the driver, leave it."""
    from scoreflow import distributed, factory

    factory.check_config(fv.config)
    distributed.init(fv.config.device)  # NCCL on GPUs, gloo on CPUs; nothing on one process
    try:
        _run_driver(fv)
        # leave together, so that no rank tears its gloo connections down while another still
        # writes its last checkpoint; after a failure the launcher stops the other ranks instead
        distributed.barrier()
    finally:
        distributed.destroy()


def _run_driver(fv) -> None:
    config, workdir, mode = fv.config, fv.workdir, fv.mode
    if mode == "train":
        from scoreflow.train import train

        train(config, workdir)
    elif mode == "eval":
        from scoreflow.evaluate import evaluate

        evaluate(config, workdir, fv.eval_folder, deq_folder=fv.deq_folder)
    else:
        from scoreflow.train_deq import train_deq

        train_deq(config, workdir, fv.deq_folder)


def run(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv``); returns the exit status.

    Set the environment variable ``SCOREFLOW_TRACEBACK=1`` to see the full traceback of an
    error that would otherwise be reported in one line.
    """
    argv = list(sys.argv if argv is None else argv)
    try:
        if len(argv) > 1 and argv[1] in _subcommands():
            return int(_subcommands()[argv[1]](argv[2:]) or 0)
        _dispatch(_parse(argv))
    except KeyboardInterrupt:
        return _error(
            "interrupted; run the same command again to resume from the last checkpoint", 130
        )
    except Exception as err:
        status = None if os.environ.get("SCOREFLOW_TRACEBACK") else _report(err, argv)
        if status is None:
            raise
        return status
    return 0


def _report(err: Exception, argv: list[str]) -> int | None:
    """The exit status of a failed run, after its one-line report; None for a real bug."""
    if isinstance(err, UsageError):
        return _error(str(err), 2)
    if isinstance(err, (ValueError, OSError)):
        # ConfigError is a ValueError: the drivers' one-line reports of user mistakes; an
        # OSError is a file or folder that is missing, unwritable, full, or of the wrong kind
        return _error(_first_line(err), 2)
    if isinstance(err, ModuleNotFoundError) and (err.name or "").startswith("scoreflow"):
        what = argv[1] if len(argv) > 1 and argv[1] in _subcommands() else "this mode"
        return _error(f"{what} is not available: module {err.name} is missing", 2)
    if isinstance(err, NotImplementedError):
        return _error(f"not supported: {_first_line(err)}", 2)
    # by now torch is loaded, so these imports cost nothing
    from scoreflow.checkpoints import CheckpointError
    from scoreflow.train import TrainingDivergedError

    if isinstance(err, CheckpointError):
        return _error(_first_line(err), 2)
    if isinstance(err, TrainingDivergedError):
        return _error(_first_line(err), 1)
    return None


def _error(message: str, status: int) -> int:
    """Report ``message`` as the one line ``scoreflow: error: ...`` on stderr; return status."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Entry point of ``scoreflow``, ``python -m scoreflow`` and ``python main.py``: exits.

    A process started by ``torchrun`` (or another launcher that sets RANK and WORLD_SIZE) dumps
    the Python stacks of its threads if it is aborted (faulthandler), so that a crashed rank says
    where it was, and it ends without the interpreter's teardown: once DistributedDataParallel
    has wrapped a model, the gloo group's C++ threads outlive ``destroy_process_group`` (they are
    still running when the driver returns), and tearing the interpreter and the C++ statics
    down under running threads can abort a rank that had finished its work ("terminate called
    without an active exception", exit -6, seen rarely), which makes the launcher fail the
    whole job. The drivers have closed their files by then; the logs and standard streams are
    flushed first.
    """
    if not _launched_by_torchrun():
        sys.exit(run(argv))
    import faulthandler
    import logging

    faulthandler.enable(all_threads=True)
    try:
        status = run(argv)
    except SystemExit as stop:  # --help, or an exit from a library
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
        status = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
    except BaseException:
        import traceback

        traceback.print_exc()
        status = 1
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(status)


def _launched_by_torchrun() -> bool:
    # scoreflow.distributed.launched_by_torchrun without importing torch (for --help)
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ
