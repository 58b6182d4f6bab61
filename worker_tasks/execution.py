"""The concerns of running one job on a worker, one small class each.

``run_job.JobExecution`` walks a delivery from its checks to its final state; what it must
watch on the way is here, each concern with hooks named for the moment it acts (as
Dramatiq's middleware are):

* ``OneDelivery``: a message delivered again while its first delivery still runs on
  another slot waits for it ``before_lease``;
* ``SlotHold``: the slot's lease, taken ``before_attempts`` and given back
  ``after_attempts``: one job at a time per slot, whatever the pool size;
* ``CancelWatch``: whether the job is still wanted (not cancelled, still this message),
  asked ``while_running`` and ``while_backing_off``;
* ``TimeLimit``: the job's own ``timeout``, started ``when_script_starts``, asked
  ``while_running``;
* ``Launch``: warm or cold, chosen ``before_script`` (a wanted warm start that cannot be
  had falls back to cold and says why in the job's log);
* ``Marker``: the ``.done`` file, prepared ``before_finish``, put in place
  ``after_finish`` or thrown away ``when_refused``.

None of them reads a message field it was not given: ``run_job`` checks the message first.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from worker_tasks import warm
from worker_tasks.lease import SlotLease, task_holding
from worker_tasks.runner import JobProcess, Runner
from worker_tasks.spec import slot_of_worker
from worker_tasks.tracking import JobState
from worker_tasks.warm import WarmRunner

# How often a running job looks whether it was cancelled or superseded (seconds).
CANCEL_POLL_S = 1.0

Note = Callable[[str], None]


class CancelWatch:
    """Whether the job is still wanted: its run not cancelled, its message still the current
    one, no later attempt of it started.

    Parameters:
        read: the job's record (at least ``state``, ``task_id`` and ``attempts``); may raise
            ``redis.RedisError``.
        task_id: this delivery's message.
        attempt: this delivery's attempt number (0 before its first, and for a backup copy,
            which counts none).
    """

    def __init__(self, read: Callable[[], dict[str, Any]], task_id: str,
                 attempt: Callable[[], int] = lambda: 0) -> None:
        self.read = read
        self.task_id = task_id
        self.attempt = attempt

    def while_running(self) -> bool:
        """False once the job was cancelled, its message superseded, or it was overtaken."""
        try:
            record = self.read()
        except redis.RedisError:
            return True  # Redis away: keep running; the final write waits for it
        if not record:
            return True  # the record vanished (Redis lost its data): nothing says stop
        return (record.get("state") != JobState.CANCELLED
                and record.get("task_id") == self.task_id and not self.overtaken(record))

    def overtaken(self, record: dict[str, Any]) -> bool:
        """A later attempt of the job started: this one's worker was taken for dead (frozen
        past ``SC_RETURN_AFTER``, a paused VM) and its message delivered again elsewhere."""
        mine = self.attempt()
        theirs = record.get("attempts")
        return bool(mine) and isinstance(theirs, int) and theirs > mine

    def while_backing_off(self, seconds: float) -> bool:
        """Wait out a backoff; False if the job is cancelled or superseded meanwhile."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(min(CANCEL_POLL_S, max(0.0, deadline - time.monotonic())))
            if not self.while_running():
                return False
        return True


# How often a percentage limit without a median yet asks for one (seconds).
MEDIAN_RECHECK_S = 2.0
# A percentage limit is never shorter than this (seconds): a median of tiny jobs.
MIN_PERCENT_LIMIT_S = 1.0


class TimeLimit:
    """The job's own time limit over one attempt's script.

    Parameters:
        timeout: the job's ``timeout``: seconds, ``"P%"`` of the median duration of its
            run's succeeded jobs of the same script, or None (no limit).
        median: the median and how many it is taken over, once 3 such jobs have succeeded
            (else None); asked again while a percentage has no median yet.
    """

    def __init__(self, timeout: float | str | None,
                 median: Callable[[], tuple[float, int] | None] = lambda: None) -> None:
        self.percent = float(timeout[:-1]) if isinstance(timeout, str) else None
        self.seconds = None if isinstance(timeout, str) else timeout
        self.median = median
        self.basis: tuple[float, int] | None = None  # the median the limit was set from
        self.started: float | None = None
        self.deadline: float | None = None
        self.asked = 0.0

    def when_script_starts(self) -> None:
        self.started = time.monotonic()
        self.deadline = None if self.seconds is None else self.started + self.seconds
        self.resolve()

    def resolve(self) -> None:
        """A percentage becomes seconds once its median exists (looked up at most every
        ``MEDIAN_RECHECK_S``: a job may run for hours)."""
        if self.percent is None or self.deadline is not None or self.started is None:
            return
        moment = time.monotonic()
        if moment - self.asked < MEDIAN_RECHECK_S and self.asked:
            return
        self.asked = moment
        basis = self.median()
        if basis is not None:
            self.basis = basis
            self.seconds = max(MIN_PERCENT_LIMIT_S, basis[0] * self.percent / 100)
            self.deadline = self.started + self.seconds

    def next_wait(self, poll: float = CANCEL_POLL_S) -> float:
        """How long to wait for the script before looking again."""
        if self.deadline is None:
            return poll
        return max(0.0, min(poll, self.deadline - time.monotonic()))

    def while_running(self) -> bool:
        """False once the limit has passed."""
        self.resolve()
        return self.deadline is None or time.monotonic() < self.deadline

    def reason(self) -> str:
        if self.basis is not None and self.percent is not None:
            median, count = self.basis
            return (f"timed out after {self.seconds:g} s ({self.percent:g}% of the median "
                    f"{median:g} s of {count} succeeded jobs of its script); killed")
        return f"timed out after {self.seconds:g} s; killed"


class GpuMemoryWatch:
    """The peak GPU memory of an attempt's processes, where NVML can tell (``pynvml``, from
    ``nvidia-ml-py``, the gpu extra): sampled each time the worker looks at the running
    script. Without NVML or a GPU, ``peak_mb`` stays None.

    Parameters:
        group: the attempt's process group (its runner's pid): a GPU process counts when it
            is in it (the script and what it started; a ``setsid`` child escapes the count).
    """

    def __init__(self, group: int) -> None:
        self.group = group
        self.peak_mb: float | None = None
        self.nvml = nvml()

    def while_running(self) -> None:
        if self.nvml is None:
            return
        try:
            used = 0
            for index in range(self.nvml.nvmlDeviceGetCount()):
                handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
                for process in self.nvml.nvmlDeviceGetComputeRunningProcesses(handle):
                    if in_group(process.pid, self.group):
                        used += process.usedGpuMemory or 0
        except Exception:  # NVML errors are many and not ours: no figure rather than no job
            return
        self.peak_mb = max(self.peak_mb or 0.0, round(used / 2**20, 1))


def in_group(pid: int, group: int) -> bool:
    try:
        return os.getpgid(pid) == group
    except OSError:
        return False


@functools.cache
def nvml() -> Any:
    """NVML, initialised once, or None (not installed, no driver, no GPU)."""
    try:
        import pynvml  # type: ignore[import-not-found]

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded...
        return None


class Launch:
    """How an attempt's script starts: forked from the worker's zygote (warm) or fresh.

    Parameters:
        wanted: the job's ``warm`` field (None: as the worker is set).
        job_env: the job's own environment variables (some rule a warm start out).
        cwd: where the script runs.
        note: a line into the job's log (why a wanted warm start ran cold).
    """

    def __init__(self, wanted: bool | None, job_env: dict[str, str], cwd: Path,
                 note: Note) -> None:
        self.wanted = warm.enabled() if wanted is None else wanted
        self.job_env = job_env
        self.cwd = cwd
        self.note = note

    def before_script(self, argv: list[str], env: dict[str, str], log: Path) -> JobProcess:
        """The script started, warm where wanted and possible, else cold."""
        return self.warm(argv, env, log) or Runner(argv, self.cwd, env, log)

    def warm(self, argv: list[str], env: dict[str, str], log: Path) -> WarmRunner | None:
        if not self.wanted:
            return None
        socket_path = warm.socket_for(Path(argv[1]))
        why = (warm.cold_reason(self.job_env) or
               (None if socket_path else "this worker keeps no warm interpreter "
                                         "(coordinator worker --warm): ran cold"))
        if why is None:
            assert socket_path is not None
            try:
                return WarmRunner(socket_path, argv, self.cwd, env, log)
            except warm.WarmUnavailable as err:
                why = f"{err}: ran cold"
        self.note(f"not warm: {why}")
        return None


class Marker:
    """The ``.done`` file: written aside first, put in place only once the record agrees.

    Parameters:
        done: the marker's path (confined to the workdir).
        fields: what it says (run, job, node, host, output, duration).
    """

    def __init__(self, done: Path, fields: dict[str, Any]) -> None:
        self.done = done
        self.fields = fields
        self.pending = done.with_name(f".{done.name}.{os.getpid()}.pending")

    def before_finish(self) -> None:
        self.pending.write_text(json.dumps(self.fields) + "\n", encoding="utf-8")

    def after_finish(self) -> None:
        os.replace(self.pending, self.done)

    def when_refused(self) -> None:
        self.pending.unlink(missing_ok=True)


# How often a delivery waiting for its message's other delivery looks again (seconds).
ELSEWHERE_POLL_S = 1.0


class OneDelivery:
    """One execution of a message at a time, across slots. kombu hands a message out again
    once it has been unacknowledged for the visibility timeout, even while its first delivery
    still runs (a job longer than ``SC_VISIBILITY_TIMEOUT``); another slot would then run the
    same job beside it. So a delivery whose record is running under its own message on
    another slot waits while that slot's lease names the message (its worker is alive), then
    goes on with the record as it then is: ended (nothing to run), or still running with the
    lease gone (that worker died, and this delivery runs the job).

    Parameters:
        client: the tracking Redis.
        read: the job's record (``state``, ``task_id``, ``host``).
        task_id: this delivery's message.
        slot: this delivery's slot.
        note: a line into the worker's log, once, when it waits.
    """

    def __init__(self, client: redis.Redis, read: Callable[[], dict[str, Any]], task_id: str,
                 slot: str, note: Note) -> None:
        self.client = client
        self.read = read
        self.task_id = task_id
        self.slot = slot
        self.note = note

    def elsewhere(self, record: dict[str, Any]) -> str | None:
        """The other slot where this message runs, alive; None if there is none."""
        if record.get("state") not in (JobState.RUNNING, JobState.FINISHING) or \
                record.get("task_id") != self.task_id:
            return None
        slot = slot_of_worker(str(record.get("host") or ""))
        if not slot or slot == self.slot:
            return None  # on this slot, the lease itself keeps two from overlapping
        try:
            holder = task_holding(self.client, slot)
        except redis.RedisError:
            return None  # Redis away: as before this check; the record's steps still judge
        return slot if holder == self.task_id else None

    def before_lease(self, record: dict[str, Any]) -> dict[str, Any]:
        """Wait while this message runs elsewhere; the record once it does not."""
        said = False
        while (slot := self.elsewhere(record)) is not None:
            if not said:
                self.note(f"message {self.task_id} was delivered again while it runs on "
                          f"{slot} (a job longer than the broker's visibility timeout, "
                          f"SC_VISIBILITY_TIMEOUT): waiting for that execution to end")
                said = True
            time.sleep(ELSEWHERE_POLL_S)
            record = self.read()
        return record


class SlotHold:
    """The slot's lease around a job's attempts.

    Parameters:
        lease: the slot's lease for this delivery.
        watch: whether the job is still wanted (a cancelled one stops waiting).
        retrying: runs a Redis call, retried while Redis is away.
    """

    def __init__(self, lease: SlotLease, watch: CancelWatch,
                 retrying: Callable[[str, Callable[[], bool]], bool]) -> None:
        self.lease = lease
        self.watch = watch
        self.retrying = retrying

    def before_attempts(self) -> bool:
        """Wait for the lease: True once it is ours, False if the job stopped being wanted."""
        return self.retrying("lease", lambda: self.lease.acquire(
            give_up=lambda: not self.watch.while_running()))

    def after_attempts(self) -> None:
        self.lease.release()
