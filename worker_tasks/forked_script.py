"""A job's script in an interpreter forked from a zygote, run as ``python script.py`` runs it.

``run_script`` is the script's process from its job on: the environment, working directory,
``sys.argv`` and ``sys.path[0]`` of a cold start, the script's code in its own ``__main__``
(``run_as_main``), its exit status as ``python`` would end with (``exit_status_of``), an
uncaught exception told by the script's ``sys.excepthook`` or its own traceback
(``print_uncaught``). Its exit (``finish``) does what a cold interpreter's does and
``os._exit`` does not: non-daemon threads joined, atexit handlers run, and the files the
script left open written out (``let_go``), then ``os._exit``: the zygote's modules, shared
with the job through the fork, are never torn down (18 ms of a NumPy zygote's pages
written for nothing).
"""

from __future__ import annotations

import builtins
import contextlib
import gc
import importlib.util
import io
import marshal
import os
import runpy
import shlex
import signal
import sys
import threading
import traceback
import types
from importlib.machinery import SourceFileLoader
from typing import Any, NoReturn

from worker_tasks.daemon import WARM_JOB_NAME
from worker_tasks.runner import name_process

# A zip application (``python app.pyz``) ends with a zip's end-of-directory record: its
# signature, within the record's 22 bytes and a comment of up to 64 KiB from the end.
ZIP_END = b"PK\x05\x06"
ZIP_TAIL_BYTES = 22 + 65535


def exit_status_of(exit_: SystemExit) -> int:
    """The status ``python script.py`` ends with for this ``SystemExit`` (None: 0, an int:
    itself, anything else: printed to stderr, 1)."""
    code = exit_.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def reseed_after_fork() -> None:
    """Every job its own random numbers, as a fresh interpreter would draw them: ``random``
    reseeds itself at fork; NumPy's legacy global generator does not."""
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        with contextlib.suppress(Exception):
            numpy_random.seed()


def run_script(argv: list[str], cwd: str, env: dict[str, str]) -> NoReturn:
    """The script's process (forked from the runner): ``python argv[1] argv[2:]``, warm."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    # ps shows the script's command line, as for a cold start (not its zygote's).
    name_process(shlex.join(argv), WARM_JOB_NAME)
    script = argv[1]
    sys.argv, sys.orig_argv = argv[1:], list(argv)
    sys.path[0] = os.path.dirname(os.path.realpath(script))
    imported_before = set(sys.modules)
    main = types.ModuleType("__main__")
    status = 0
    try:
        run_as_main(script, main)
    except SystemExit as exit_:
        status = exit_status_of(exit_)
    except KeyboardInterrupt as err:  # as Python does: the exit's work, then die of SIGINT
        print_uncaught(err, script)
        finish(1, main, imported_before)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    except BaseException as err:  # an uncaught exception: its traceback, status 1
        print_uncaught(err, script)
        status = 1
    os._exit(finish(status, main, imported_before))


def run_as_main(script: str, main: types.ModuleType, install: bool = True) -> None:
    """Run ``script`` as ``python script`` does: its code (source, or compiled) in ``main``,
    installed as ``__main__`` (``install``), which keeps its globals until the exit clears
    them (``let_go``); a zip application's ``__main__`` from the archive."""
    with io.open_code(script) as handle:
        source = handle.read()
    if ZIP_END in source[-ZIP_TAIL_BYTES:]:  # a zip application: runpy finds its __main__
        runpy.run_path(script, run_name="__main__")
        return
    if source[:4] == importlib.util.MAGIC_NUMBER:  # compiled (16 bytes of header)
        code = marshal.loads(source[16:])
    else:
        code = compile(source, script, "exec")
    main.__dict__.update(__file__=script, __cached__=None, __builtins__=builtins,
                         __loader__=SourceFileLoader("__main__", script))
    if install:
        sys.modules["__main__"] = main
    exec(code, main.__dict__)


def print_uncaught(err: BaseException, script: str) -> None:
    """What ``python script.py`` prints for an uncaught exception: the script's
    ``sys.excepthook`` called, or the traceback from the script's own frames on (this
    module's are not the job's)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != script:
        tb = tb.tb_next
    tb = tb or err.__traceback__
    if sys.excepthook is not sys.__excepthook__:
        try:
            sys.excepthook(type(err), err.with_traceback(tb), tb)
            return
        except BaseException as hook_error:  # noqa: BLE001 (as Python: said, then the default)
            print("Error in sys.excepthook:", file=sys.stderr)
            traceback.print_exception(hook_error)
            print("\nOriginal exception was:", file=sys.stderr)
    traceback.print_exception(type(err), err, tb)


def finish(status: int, main: types.ModuleType, imported_before: set[str]) -> int:
    """What the interpreter does at exit: join non-daemon threads, run atexit, let go of the
    script's objects (``let_go``), flush."""
    with contextlib.suppress(Exception):
        threading._shutdown()  # type: ignore[attr-defined]
    import atexit

    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    with contextlib.suppress(Exception):
        let_go(main, imported_before)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    return status


def let_go(main: types.ModuleType, imported_before: set[str]) -> None:
    """What a cold interpreter's exit does for the files a script left open, which
    ``os._exit`` does not. The globals of ``__main__`` are cleared as a cold exit clears
    them, so each object they held is freed in turn and each file closed (a gzip file writes
    its trailer). Whatever file of the job's is still open then (held by a module, or by a
    reference cycle) is closed (``close_files``) while the modules whose code closes it still
    have their globals; then those of the modules the script imported are cleared too, and
    the cycles collected. A daemon thread still running keeps every global (a cold exit
    stops it first; here it could wake to find them gone): its job's files are closed all
    the same. The zygote froze its own objects before the fork (``zygote.freeze_heap``), so
    the walk and the collection see the job's objects only, and few of them once the
    globals are gone."""
    cleared = threading.active_count() == 1
    if cleared:
        clear_globals(main.__dict__)
    close_files()
    if cleared:
        new = (sys.modules.get(name) for name in set(sys.modules) - imported_before)
        for module in new:
            if isinstance(module, types.ModuleType):
                clear_globals(module.__dict__)
        gc.collect()


def close_files() -> None:
    """Every open file of the job's closed, as a cold exit's teardown closes them: outer
    layers first (``file_layer``), so that each writes what it holds into the one under it
    before that one closes, and a compressed file writes its trailer. The interpreter's own
    streams stay open (``finish`` flushes them). Its own frame: the references it takes end
    with it."""
    streams = {id(stream) for stream in (sys.stdin, sys.stdout, sys.stderr, sys.__stdin__,
                                         sys.__stdout__, sys.__stderr__)}
    files = [thing for thing in gc.get_objects()
             if isinstance(thing, io.IOBase) and id(thing) not in streams]
    files.sort(key=file_layer)
    for file in files:
        with contextlib.suppress(Exception):
            if not file.closed:
                file.close()


def file_layer(file: io.IOBase) -> int:
    """How far out a file object sits in a stack of them: text (0) over a compressor such as
    a gzip file (1) over a buffer (2) over a raw file (3)."""
    if isinstance(file, io.TextIOBase):
        return 0
    if isinstance(file, (io.BufferedWriter, io.BufferedReader, io.BufferedRandom,
                         io.BufferedRWPair, io.BytesIO)):
        return 2
    if isinstance(file, io.BufferedIOBase):
        return 1
    return 3


def clear_globals(namespace: dict[str, Any]) -> None:
    """As CPython clears a module at exit: its names set to None, those that start with one
    underscore first, ``__builtins__`` kept (a ``__del__`` may still look names up)."""
    for first in (True, False):
        for name in list(namespace):
            if name != "__builtins__" and (name.startswith("_")
                                           and not name.startswith("__")) is first:
                namespace[name] = None
