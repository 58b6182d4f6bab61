"""How fast each slot runs each script, learned from the attempts themselves.

The worker that records a job's success adds what it took to its slot's estimate for the
job's script: seconds per unit of work (a job's ``"cost"``, 1 without one), as an
exponentially weighted moving average, so a slot that turns slow (a throttled GPU, a
neighbour on the card) is seen within a few jobs. The estimates outlive the run: the next
run of the same script starts from them, and one not updated for ``FORGET_AFTER_S`` is
forgotten. A slot's speed is the fastest slot's seconds per unit over its own (1.0: the
fastest; 0.5: half as fast).

    <p>:speeds:<script>   hash: slot -> {"spu": seconds per unit, "n": samples, "at": time}
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import redis

from worker_tasks.kinds import fits
from worker_tasks.tracking import KEY_PREFIX, decode

# Weight of the newest attempt in the average (higher: a slowed slot is seen sooner).
EWMA_WEIGHT = 0.3
# An estimate not updated for this long is forgotten (seconds): the hardware changes.
FORGET_AFTER_S = 7 * 24 * 3600.0

# Update one slot's average in one step (two workers of one slot never race, but the
# read-modify-write stays on the server all the same).
# KEYS: 1 the script's hash. ARGV: 1 slot, 2 seconds per unit, 3 weight, 4 now, 5 forget
# after, 6 TTL.
RECORD_LUA = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local spu, n = tonumber(ARGV[2]), 1
local ok, old = pcall(cjson.decode, raw or 'null')
if ok and type(old) == 'table' and type(old.at) == 'number' and type(old.spu) == 'number'
    and type(old.n) == 'number' then  -- else none yet, or edited by hand: start again
  if tonumber(ARGV[4]) - old.at < tonumber(ARGV[5]) then
    spu = old.spu + tonumber(ARGV[3]) * (spu - old.spu)
    n = old.n + 1
  end
end
redis.call('HSET', KEYS[1], ARGV[1], cjson.encode({spu = spu, n = n, at = tonumber(ARGV[4])}))
redis.call('EXPIRE', KEYS[1], ARGV[6])
return tostring(spu)
"""


def speeds_key(script: str) -> str:
    return f"{KEY_PREFIX}:speeds:{script}"


@dataclass(frozen=True)
class SlotSpeed:
    """One slot's estimate for one script.

    Parameters:
        seconds_per_unit: the average time of a unit of work (a job without a cost is 1).
        samples: how many attempts made it.
        speed: the fastest slot's seconds per unit over this one's (1.0: the fastest).
    """

    seconds_per_unit: float
    samples: int
    speed: float


class SlotSpeeds:
    """The estimates on the tracking Redis (written by workers, read by the head).

    Parameters:
        client: a client on the tracking Redis.
    """

    def __init__(self, client: redis.Redis) -> None:
        self.client = client
        self._record = client.register_script(RECORD_LUA)

    def after_success(self, script: str, slot: str, seconds: float, cost: float,
                      pipe: redis.client.Pipeline | None = None) -> float | None:
        """An attempt of ``script`` on ``slot`` succeeded in ``seconds`` for ``cost`` units:
        the slot's new seconds per unit (None when queued on ``pipe``, for its caller to
        execute)."""
        per_unit = max(seconds, 0.0) / cost
        args = [slot, per_unit, EWMA_WEIGHT, time.time(), FORGET_AFTER_S, int(FORGET_AFTER_S)]
        if pipe is not None:
            # By its body: a pipeline asks Redis first whether each script it sends by hash
            # is loaded (one more round trip after every job); Redis caches it by hash anyway.
            pipe.eval(RECORD_LUA, 1, speeds_key(script), *args)
            return None
        return float(self._record(keys=[speeds_key(script)], args=args))

    def of(self, script: str) -> dict[str, SlotSpeed]:
        """slot -> its estimate for ``script`` (forgotten ones left out)."""
        return estimates(self.client.hgetall(speeds_key(script)), time.time())

    def scripts(self) -> list[str]:
        """The scripts with estimates (one scan; for ``cluster status`` and metrics)."""
        prefix = speeds_key("")
        return sorted(key.decode()[len(prefix):]
                      for key in self.client.scan_iter(match=f"{prefix}*", count=1000))


def estimates(raw: Mapping[bytes, bytes], now: float) -> dict[str, SlotSpeed]:
    fresh = {}
    for slot, entry in decode(raw).items():
        if not (isinstance(entry, dict) and all(fits(entry.get(name), float)
                                                for name in ("at", "spu", "n"))):
            continue  # edited by hand: as if never measured
        if now - entry["at"] < FORGET_AFTER_S and entry["spu"] > 0:
            fresh[slot] = (float(entry["spu"]), int(entry["n"]))
    if not fresh:
        return {}
    fastest = min(spu for spu, _ in fresh.values())
    return {slot: SlotSpeed(spu, samples, round(fastest / spu, 3))
            for slot, (spu, samples) in sorted(fresh.items())}
