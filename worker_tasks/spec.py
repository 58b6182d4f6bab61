"""The message contract between the head node and a worker: one job, fully planned.

The head node resolves everything that depends on the run (rewritten paths,
the ``.done`` marker, the log file) so the worker only has to execute it.
A message is untrusted input (anyone who can write to Redis can send one):
``JobSpec.from_message`` checks every field by the same rules the head node
applies to a jobs file, and refuses anything else with one line
(``InvalidMessage``). The rules live here, beside the contract; the head
node's jobs-file model imports them.
"""

from __future__ import annotations

import functools
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Protocol, TypeVar

# What a checked list holds (check_list).
Item = TypeVar("Item")

# The stable task name: workers and publishers of any version agree on it.
RUN_JOB_TASK = "scripts_coordinator.run_job"
# Base of the backoff between a failed attempt and the next, unless a job or run says (s).
DEFAULT_RETRY_DELAY_S = 2.0

# job_id is used in file names and node in queue names: keep both to safe labels.
# \Z, not $: "rig-a\n" must not pass.
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
PER_GPU_SUFFIX = re.compile(r"\.gpu[0-9]+\Z")
# An environment variable's name, as POSIX shells write them (so it also prints on one line).
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# GPU indexes a job may ask for (CUDA_VISIBLE_DEVICES takes one index).
MAX_GPU_ID = 255
# The longest per-job timeout (seconds): 30 days; longer is a typo, and inf is refused.
MAX_TIMEOUT_S = 30 * 24 * 3600.0
# The shortest (seconds): below it the script could only be killed as it starts.
MIN_TIMEOUT_S = 0.01
# A timeout given as a share of the median duration ("300%"), and its largest value.
PERCENT = re.compile(r"(\d{1,6}(?:\.\d{1,3})?)%\Z")
MAX_TIMEOUT_PERCENT = 100_000.0
# A script path's bounds: a file name the kernel accepts, a path that prints on one line.
MAX_SCRIPT_CHARS = 1024
MAX_NAME_BYTES = 255
# The node of the queue that messages published without a node land in (celeryconfig's
# task_default_queue): no job may name it, no worker serves it.
UNASSIGNED_NODE = "unassigned"
# Automatic retries of one job, and the longest base delay between attempts (seconds).
MAX_RETRIES = 100
MAX_RETRY_DELAY_S = 3600.0
# Bounds on a message's size: arguments, their total length, environment entries.
MAX_ARGS = 4096
# Jobs one job may wait for ("after").
MAX_AFTER = 1024
# The largest cost hint a job may carry (seeds in a chunk, say).
MAX_COST = 1e12
MAX_ARGS_CHARS = 1 << 20
MAX_ENV = 64
# Environment names a job may set: a small safe set unless the operator widens it
# (SC_JOB_ENV_ALLOW, a regular expression matched against the whole name, same value on
# the head node and the workers). Anything else could load code of the message's choosing
# (LD_PRELOAD, PYTHONPATH, OPENSSL_CONF, BASH_ENV, GCONV_PATH) or leave its GPU.
DEFAULT_ENV_ALLOW = r"JOB_[A-Z0-9_]+|(OMP|MKL|OPENBLAS|NUMEXPR|NUMBA)_NUM_THREADS"
ENV_ALLOW_VARIABLE = "SC_JOB_ENV_ALLOW"


# This project's own job scripts (the Step 3 scorer, the example): a worker looks there after
# its --scripts-dir, so an installed worker finds them without opening site-packages.
BUILTIN_SCRIPTS_DIR = Path(__file__).resolve().parent / "builtin_scripts"


class InvalidMessage(ValueError):
    """A field of a job (message or jobs-file entry) breaks the contract; one line."""


def env_allow_pattern() -> re.Pattern[str]:
    return re.compile(os.environ.get(ENV_ALLOW_VARIABLE) or DEFAULT_ENV_ALLOW)


def check_text(value: Any, what: str) -> str:
    """A string that can travel as UTF-8 JSON and be an argument: no NUL, no lone surrogate."""
    if not isinstance(value, str):
        raise InvalidMessage(f"{what} must be a string, not {type(value).__name__}")
    if "\0" in value:
        raise InvalidMessage(f"{what} contains a NUL byte")
    if value.isascii():  # no surrogate can hide in ASCII: the common case, cheaply
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidMessage(f"{what} is not valid text (a lone surrogate)") from None
    return value


def is_safe_name(value: str) -> bool:
    """The one rule for job ids and node labels: safe characters, and no ``..``."""
    return bool(SAFE_NAME.match(value)) and ".." not in value


def check_name(value: Any, what: str) -> str:
    check_text(value, what)
    if not is_safe_name(value):
        raise InvalidMessage(f"{what} {value!r} is not a safe name (letters, digits, '.', "
                             f"'_', '-'; no '..')")
    return value


def check_node(value: Any, what: str = "node") -> str:
    """A node label a job may name: a safe name that is not a queue of the system's own
    (``unassigned``) nor one GPU's queue (``rig-a.gpu1``); ``any`` floats."""
    check_name(value, what)
    if value == UNASSIGNED_NODE:
        raise InvalidMessage(f"{what} {value!r} is reserved (node.{value} is the queue of "
                             f"messages published without a node)")
    if PER_GPU_SUFFIX.search(value):
        raise InvalidMessage(f"{what} {value!r} ends like a GPU slot (.gpuN); name the node "
                             f"and give gpu_id")
    return value


def check_script(value: Any, what: str = "script") -> str:
    """A script path inside the scripts directory that can be a file and an argument."""
    check_relative_path(value, what)
    return _check_script_name(value, what)


@functools.lru_cache(maxsize=1024)  # a run names few scripts, each in thousands of jobs
def _check_script_name(value: str, what: str) -> str:
    if len(value) > MAX_SCRIPT_CHARS:
        raise InvalidMessage(f"{what} is {len(value)} characters long (at most "
                             f"{MAX_SCRIPT_CHARS})")
    if any(ord(char) < 32 or ord(char) == 127 for char in value):
        raise InvalidMessage(f"{what} {value!r} contains a control character")
    for part in value.split("/"):
        if part.startswith("-"):
            raise InvalidMessage(f"{what} {value!r} has a part starting with '-' (it would "
                                 f"read as an option)")
        if len(part.encode("utf-8")) > MAX_NAME_BYTES:
            raise InvalidMessage(f"{what} has a name longer than {MAX_NAME_BYTES} bytes")
    return value


def check_relative_path(value: Any, what: str) -> str:
    """A path that stays inside the directory it is relative to (no absolute, no '..')."""
    check_text(value, what)
    # String operations, not PurePosixPath: the same rule, 5x cheaper at 100,000 jobs.
    if not value.strip() or value.startswith(("/", "~")):
        raise InvalidMessage(f"{what} {value!r} is not a relative path")
    if ".." in value.split("/"):
        raise InvalidMessage(f"{what} {value!r} climbs out of its directory with '..'")
    return value


def check_gpu_id(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidMessage(f"gpu_id must be an integer, not {type(value).__name__}")
    if not 0 <= value <= MAX_GPU_ID:
        raise InvalidMessage(f"gpu_id {value} is outside 0..{MAX_GPU_ID}")
    return value


def check_seconds(value: Any, what: str, maximum: float, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidMessage(f"{what} must be a number of seconds, not {type(value).__name__}")
    number = float(value)
    low_ok = number >= 0 if allow_zero else number > 0
    if not math.isfinite(number) or not low_ok or number > maximum:
        bound = ">= 0" if allow_zero else "> 0"
        raise InvalidMessage(f"{what} {value!r} must be finite, {bound} and at most {maximum:g}")
    return number


def check_timeout(value: Any, what: str = "timeout") -> float | str:
    """A job's timeout: seconds, at most ``MAX_TIMEOUT_S``, at least ``MIN_TIMEOUT_S``; or
    ``"P%"``: P percent of the median duration of the run's succeeded jobs of the same
    script, once 3 have succeeded (GNU parallel's ``--timeout 200%``)."""
    if isinstance(value, str):
        match = PERCENT.match(value)
        if match is None or not 0 < float(match.group(1)) <= MAX_TIMEOUT_PERCENT:
            raise InvalidMessage(f"{what} {value!r} is neither seconds nor a percentage of "
                                 f"the median (e.g. \"300%\", at most "
                                 f"{MAX_TIMEOUT_PERCENT:g}%)")
        return f"{float(match.group(1)):g}%"
    number = check_seconds(value, what, MAX_TIMEOUT_S)
    if number < MIN_TIMEOUT_S:
        raise InvalidMessage(f"{what} {value!r} is shorter than {MIN_TIMEOUT_S:g} s: the "
                             f"script would be killed as it starts")
    return number


def check_env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise InvalidMessage(f"env must be an object of strings, not {type(value).__name__}")
    if len(value) > MAX_ENV:
        raise InvalidMessage(f"env has {len(value)} entries (at most {MAX_ENV})")
    allow = env_allow_pattern()
    refused = []
    for name, text in value.items():
        check_text(name, "an env name")
        if not ENV_NAME.match(name):
            raise InvalidMessage(f"env name {name!r} is not a variable name (letters, digits, "
                                 f"'_'; not a digit first)")
        check_text(text, f"env {name}")
        if not allow.fullmatch(name):
            refused.append(name)
    if refused:
        raise InvalidMessage(f"env may not set {', '.join(sorted(refused))} (allowed: names "
                             f"matching {allow.pattern!r}; {ENV_ALLOW_VARIABLE} widens it)")
    return dict(value)


def check_args(value: Any) -> list[str]:
    args = check_list(value, "args", "strings", MAX_ARGS, check_text)
    if sum(len(arg) for arg in args) > MAX_ARGS_CHARS:
        raise InvalidMessage(f"args are longer than {MAX_ARGS_CHARS} characters in all")
    return args


def check_cost(value: Any) -> float:
    """A job's cost: a finite number above 0, at most ``MAX_COST``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not (
            math.isfinite(value) and 0 < value <= MAX_COST):
        raise InvalidMessage(f"cost must be a number above 0 and at most {MAX_COST:g}, not "
                             f"{value!r}")
    return float(value)


def check_after(value: Any) -> list[str]:
    """The job ids a job waits for: safe names, at most ``MAX_AFTER``, none twice."""
    names = check_list(value, "after", "job ids", MAX_AFTER, check_name)
    if len(set(names)) != len(names):
        raise InvalidMessage("after names a job twice")
    return names


def check_list(value: Any, what: str, items: str, most: int,
               check_item: Callable[[Any, str], Item]) -> list[Item]:
    """A list of at most ``most`` entries, each checked by ``check_item`` (named
    ``what[i]`` in its error)."""
    if not isinstance(value, list):
        raise InvalidMessage(f"{what} must be a list of {items}, not {type(value).__name__}")
    if len(value) > most:
        raise InvalidMessage(f"{what} has {len(value)} entries (at most {most})")
    return [check_item(item, f"{what}[{index}]") for index, item in enumerate(value)]


def check_retries(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_RETRIES:
        raise InvalidMessage(f"retries must be an integer in 0..{MAX_RETRIES}, not {value!r}")
    return value


def check_flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise InvalidMessage(f"{what} must be true or false, not {value!r}")
    return value


# A job whose node is this floats: the first free node (or GPU slot) takes it, from the
# shared queue that every worker consumes after its own.
FLOATING_NODE = "any"


def is_floating(node: str) -> bool:
    return node == FLOATING_NODE


def floating_queue() -> str:
    """The shared queue of floating jobs, ``node.any``."""
    return queue_for(FLOATING_NODE)


def gpu_of_slot(slot: str) -> int | None:
    """The GPU index of a per-GPU slot (``rig-a.gpu1``: 1), None for a whole node."""
    match = PER_GPU_SUFFIX.search(slot)
    return int(match.group(0).removeprefix(".gpu")) if match else None


def queue_for(node: str, gpu: int | None = None) -> str:
    """The Redis queue of a node, ``node.<node>``; of one GPU of it, ``node.<node>.gpu<k>``."""
    return f"node.{node}" if gpu is None else f"node.{node}.gpu{gpu}"


def slot_of(node: str, gpu: int | None = None) -> str:
    """What one job at a time is enforced for: the node, or one GPU of it (per-GPU mode)."""
    return node if gpu is None else f"{node}.gpu{gpu}"


def node_of_queue(queue: str) -> str | None:
    """The node label a queue serves (``node.rig-a`` and ``node.rig-a.gpu1``: ``rig-a``)."""
    if not queue.startswith("node."):
        return None
    return node_of_slot(queue.removeprefix("node."))


def node_of_slot(slot: str) -> str:
    """The node of a slot (``rig-a.gpu1`` and ``rig-a``: ``rig-a``)."""
    return PER_GPU_SUFFIX.sub("", slot)


def slot_of_queue(queue: str) -> str | None:
    """The slot a queue serves (``node.rig-a``: ``rig-a``; ``node.rig-a.gpu1``: ``rig-a.gpu1``)."""
    return queue.removeprefix("node.") if queue.startswith("node.") else None


def worker_name(slot: str, host: str) -> str:
    """A worker's Celery name: ``<slot>@<machine>`` (``rig-a@box``, ``rig-a.gpu1@box``)."""
    return f"{slot}@{host}"


def slot_of_worker(name: str) -> str:
    """The slot in a worker's name (``rig-a.gpu1@box``: ``rig-a.gpu1``)."""
    return name.partition("@")[0]


class OnNode(Protocol):
    node: str


Placed = TypeVar("Placed", bound=OnNode)


def by_node(items: Iterable[Placed]) -> dict[str, list[Placed]]:
    """Messages or records grouped by their node, nodes in name order, items in theirs."""
    nodes: dict[str, list[Placed]] = defaultdict(list)
    for item in items:
        nodes[item.node].append(item)
    return dict(sorted(nodes.items()))


def done_path_for(output_file: str | None, output_dir: str, job_id: str) -> str:
    """The ``.done`` rule: ``<output-file>.done``, else ``<output-dir>/<job_id>.json.done``."""
    if output_file:
        return f"{output_file}.done"
    return f"{output_dir.rstrip('/')}/{job_id}.json.done"


@dataclass(frozen=True, slots=True)
class JobSpec:
    """One job as the worker receives it (JSON-serialisable).

    Parameters:
        run_id: the run this job belongs to (tracking keys, cancel flag).
        job_id: unique within the run.
        script: relative to the worker's scripts directory.
        args: final argument list (paths already rewritten).
        node, gpu_id: where it runs; gpu_id becomes ``CUDA_VISIBLE_DEVICES``.
        output_file: the file the script must produce, or None (relative to the workdir).
        done_file: the marker the worker writes on success (relative, ends in ``.done``).
        log_file: stdout and stderr of the script (relative, ends in ``.log``).
        timeout: seconds before the script is killed, or None.
        env: extra environment variables for the script (allow-listed names).
        retries: failed attempts retried automatically, on the same node.
        retry_delay: base of the exponential backoff between attempts (seconds).
        per_gpu: one job at a time per GPU of the node (queue ``node.<node>.gpu<k>``)
            instead of per node (the original contract, the default).
        warm: fork the script's interpreter from the worker's zygote (True), start it
            fresh (False), or as the worker is set (None: ``coordinator worker --warm``).
        task_id: the id of the message that carries the job, set as it is published: a
            signed message's headers are not signed, its body is (``worker_tasks.signing``).
        after: the jobs of the run it waits for: the worker runs it only once each has
            succeeded (left out of the message when empty, so workers of earlier versions
            read every other job).
        cost: how much work the job is, against the others of its script (the seeds of a
            chunk, say); None counts as 1. Slot speeds are learned per unit of it.
        speculate: False: never start a backup copy of it (``worker_tasks.copies``); None:
            as its run says.
        copy: the message is a backup copy of a running job, pinned to an idle slot: it runs
            only while it is the job's live copy, and claims the job only if it succeeds first.
    """

    run_id: str
    job_id: str
    script: str
    args: list[str]
    node: str
    gpu_id: int
    output_file: str | None
    done_file: str
    log_file: str
    timeout: float | str | None = None
    env: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    retry_delay: float = DEFAULT_RETRY_DELAY_S
    per_gpu: bool = False
    warm: bool | None = None
    task_id: str | None = None
    after: list[str] = field(default_factory=list)
    cost: float | None = None
    speculate: bool | None = None
    copy: bool = False

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The optional fields and the value each takes when a message leaves it out."""
        return {item.name: item.default if item.default is not MISSING else item.default_factory()
                for item in fields(cls)
                if item.default is not MISSING or item.default_factory is not MISSING}

    @property
    def floating(self) -> bool:
        return is_floating(self.node)

    @property
    def queue(self) -> str:
        if self.floating:
            return floating_queue()
        return queue_for(self.node, self.gpu_id if self.per_gpu else None)

    def placed_on(self, slot: str) -> JobSpec:
        """A floating job as it runs on ``slot`` (the worker that took it): its node, and in
        per-GPU slots the slot's own GPU; a pinned job as it is."""
        if not self.floating:
            return self
        gpu = gpu_of_slot(slot)
        return replace(self, node=node_of_slot(slot),
                       gpu_id=self.gpu_id if gpu is None else gpu, per_gpu=gpu is not None)

    @property
    def slot(self) -> str:
        return slot_of(self.node, self.gpu_id if self.per_gpu else None)

    def to_message(self) -> dict[str, Any]:
        """The message (a plain dict; lists and dicts are shared, not copied)."""
        message = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name in ("after", "cost", "copy"):  # left out when unset: earlier workers read
            if not message[name]:                # the rest
                del message[name]
        if message["speculate"] is None:
            del message["speculate"]
        return message

    @classmethod
    def from_message(cls, message: Any) -> JobSpec:
        """Check every field of an untrusted message; ``InvalidMessage`` says what is wrong."""
        if not isinstance(message, dict):
            raise InvalidMessage(f"a job message must be an object, not {type(message).__name__}")
        required = ("run_id", "job_id", "script", "args", "node", "gpu_id", "done_file",
                    "log_file")
        missing = [name for name in required if name not in message]
        if missing:
            raise InvalidMessage(f"message lacks {', '.join(missing)}")
        unknown = sorted(set(message) - set(cls.__dataclass_fields__))
        if unknown:
            raise InvalidMessage(f"message has unknown fields {', '.join(map(repr, unknown))}")
        run_id = check_text(message["run_id"], "run_id")
        if not RUN_ID.match(run_id):
            raise InvalidMessage(f"run_id {run_id!r} is not a run id")
        output = message.get("output_file")
        done = check_relative_path(message["done_file"], "done_file")
        log = check_relative_path(message["log_file"], "log_file")
        if not done.endswith(".done") or not log.endswith(".log"):
            raise InvalidMessage(f"marker {done!r} / log {log!r} must end in .done / .log")
        timeout = message.get("timeout")
        if message.get("copy") is True and message.get("node") == FLOATING_NODE:
            raise InvalidMessage("a backup copy names the slot it runs on, not 'any'")
        return cls(
            run_id=run_id,
            job_id=check_name(message["job_id"], "job_id"),
            script=check_script(message["script"]),
            args=check_args(message["args"]),
            node=check_node(message["node"]),
            gpu_id=check_gpu_id(message["gpu_id"]),
            output_file=None if output is None else check_relative_path(output, "output_file"),
            done_file=done,
            log_file=log,
            timeout=None if timeout is None else check_timeout(timeout),
            env=check_env(message.get("env", {})),
            retries=check_retries(message.get("retries", 0)),
            retry_delay=check_seconds(message.get("retry_delay", DEFAULT_RETRY_DELAY_S),
                                      "retry_delay", MAX_RETRY_DELAY_S, allow_zero=True),
            per_gpu=check_flag(message.get("per_gpu", False), "per_gpu"),
            warm=None if message.get("warm") is None else check_flag(message["warm"], "warm"),
            task_id=(None if message.get("task_id") is None
                     else check_text(message["task_id"], "task_id")),
            after=check_after(message.get("after", [])),
            cost=None if message.get("cost") is None else check_cost(message["cost"]),
            speculate=(None if message.get("speculate") is None
                       else check_flag(message["speculate"], "speculate")),
            copy=check_flag(message.get("copy", False), "copy"),
        )
