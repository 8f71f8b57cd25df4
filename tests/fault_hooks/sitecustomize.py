"""Fault injection for the reliability tests, loaded by every Python process started with this
folder on PYTHONPATH (Python imports `sitecustomize` at start-up). Inert unless one of these
environment variables is set:

RELORA_FAULT_STEP_DELAY=SECONDS   `relora train` sleeps this long after every optimizer step, so a
                                  12-step run lasts long enough to be killed or signalled mid-run
                                  (timing only: the trajectory is unchanged).
RELORA_FAULT_AUDIT_DIR=DIR        `relora train` records every write-like operation (files opened
                                  for writing, renames, links, mkdir, deletions) with the time in
                                  DIR/<pid>.tsv (first line: cwd and argv), through Python's
                                  audit hooks (PEP 578). Files written from C/C++/Rust (torch,
                                  safetensors, pyarrow) are seen through their temporary names
                                  in the renames that publish them.
RELORA_FAULT_KILL_ON_REPLACE=NAME a `relora` process SIGKILLs itself when it is about to rename a
                                  finished temporary file onto a path ending in NAME: the state
                                  of a job killed mid-write, deterministically.
"""

import json
import os
import sys
import time


def _is_relora(command: str | None = None) -> bool:
    argv = getattr(sys, "argv", None) or []
    if not argv or "relora" not in argv[0]:
        return False
    return command is None or argv[1:2] == [command]


def _after_import(module_name: str, patch) -> None:
    """Run patch(module) right after `module_name` is first imported."""
    import importlib.abc
    import importlib.util

    class Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name != module_name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            exec_module = spec.loader.exec_module

            def exec_and_patch(module):
                exec_module(module)
                patch(module)

            spec.loader.exec_module = exec_and_patch
            return spec

    sys.meta_path.insert(0, Finder())


def _slow_steps(module) -> None:
    if not _is_relora("train"):
        return
    delay = float(os.environ["RELORA_FAULT_STEP_DELAY"])
    train_step = module.Trainer.train_step

    def slow_train_step(self):
        row = train_step(self)
        time.sleep(delay)
        return row

    module.Trainer.train_step = slow_train_step


# audit event -> (how many leading arguments are paths, indices of its dir_fd arguments)
PATH_ARGS = {"os.rename": (2, (2, 3)), "os.link": (2, (2, 3)), "os.symlink": (2, (2,)),
             "os.remove": (1, (1,)), "os.rmdir": (1, (1,)), "os.mkdir": (1, (2,)),
             "os.chmod": (1, (2,)), "os.utime": (1, (3,)), "os.truncate": (1, ()),
             "shutil.rmtree": (1, (1,)), "shutil.move": (2, ()), "shutil.copytree": (2, ()),
             "shutil.copyfile": (2, ())}


def _audit(folder: str) -> None:
    WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    state = {"fd": None, "busy": False}

    def hook(event, args):
        if state["busy"] or not event.startswith(("open", "os.", "shutil.")):
            return
        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            writes = (any(c in mode for c in "wax+") if isinstance(mode, str)
                      else bool((flags or 0) & WRITE_FLAGS))
            if not writes:
                return
            paths = [path]
        elif event in PATH_ARGS:
            n_paths, dir_fds = PATH_ARGS[event]
            if any(i < len(args) and args[i] is not None for i in dir_fds):
                return  # relative to a folder descriptor: shutil.rmtree's inner steps, recorded whole
            paths = list(args[:n_paths])
        else:
            return
        if not _is_relora("train"):
            return
        state["busy"] = True
        try:
            if state["fd"] is None:
                os.makedirs(folder, exist_ok=True)
                state["fd"] = os.open(os.path.join(folder, f"{os.getpid()}.tsv"),
                                      os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                header = f"#\t{os.getcwd()}\t{json.dumps(sys.argv)}\n"  # who, and where
                os.write(state["fd"], header.encode())
            for p in paths:
                if isinstance(p, int):
                    continue
                p = os.fsdecode(p)
                line = f"{time.time():.6f}\t{event}\t{os.path.abspath(p)}\n"
                os.write(state["fd"], line.encode())
        finally:
            state["busy"] = False

    def safe_hook(event, args):  # an exception here would fail the traced operation itself
        try:
            hook(event, args)
        except Exception:
            pass

    sys.addaudithook(safe_hook)


def _kill_on_replace(suffix: str) -> None:
    import signal

    def hook(event, args):
        if event == "os.rename" and _is_relora():
            dst = os.fsdecode(args[1]) if not isinstance(args[1], int) else ""
            if dst.endswith(suffix) and not os.path.basename(dst).startswith("."):
                os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


if os.environ.get("RELORA_FAULT_STEP_DELAY"):
    _after_import("relora.train", _slow_steps)
if os.environ.get("RELORA_FAULT_AUDIT_DIR"):
    _audit(os.environ["RELORA_FAULT_AUDIT_DIR"])
if os.environ.get("RELORA_FAULT_KILL_ON_REPLACE"):
    _kill_on_replace(os.environ["RELORA_FAULT_KILL_ON_REPLACE"])
