"""Which live invocation runs which cell of an experiment, so that two invocations of one experiment into one
results folder never compute a cell twice at the same time.

``running.json`` beside ``results.jsonl`` maps a cell's config hash to the invocation running it (host:pid)
and when that invocation last showed life (it claims at its start and again whenever it records a cell); it
is changed under a file lock. An invocation claims its cells before it reads which are finished, and skips
those a live invocation holds. A claim is void once its invocation has died on this host, or when it has
shown no life for ``STALE_S`` (an invocation killed on another host, whose death cannot be seen from here);
every claim is released when its invocation ends.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

from benchmark.errors import BenchmarkError
from benchmark.store import ResultStore
from benchmark.tracking import driver_id, driver_is_dead

STALE_S = 24 * 3600  # a claim without a sign of life for this long is void

Held = dict[str, dict]  # config hash -> {"driver": host:pid, "at": seconds since the epoch}


def claims_file(store: ResultStore) -> Path:
    """Where the claims of an experiment's invocations are kept."""
    return store.dir / "running.json"


class Claims:
    def __init__(self, store: ResultStore) -> None:
        self.path = claims_file(store)
        self.me = driver_id()

    def _change(self, change: Callable[[Held], dict[str, str]]) -> dict[str, str]:
        """Apply ``change(held)`` to the live claims under the lock and write them back; its result."""
        tmp = self.path.with_name(f".running.json.{self.me.replace(':', '-')}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock"):
                now = time.time()
                held = {
                    h: c for h, c in _read(self.path).items()
                    if not driver_is_dead(c["driver"]) and now - c["at"] < STALE_S
                }  # fmt: skip
                result = change(held)
                if not held:
                    self.path.unlink(missing_ok=True)
                    return result
                tmp.write_text(json.dumps(held, indent=1), encoding="utf-8")
                tmp.replace(self.path)
        except OSError as exc:
            raise BenchmarkError(f"{self.path}: cannot record which cells this run takes ({exc})") from None
        finally:
            tmp.unlink(missing_ok=True)
        return result

    def take(self, hashes: list[str]) -> dict[str, str]:
        """Claim ``hashes`` for this invocation; the ones another live invocation holds (hash -> host:pid)
        are returned and not taken."""

        def change(held: Held) -> dict[str, str]:
            theirs = {h: held[h]["driver"] for h in hashes if held.get(h, {}).get("driver", self.me) != self.me}
            held.update({h: {"driver": self.me, "at": time.time()} for h in hashes if h not in theirs})
            return theirs

        return self._change(change)

    def touch(self) -> None:
        """A sign of life: this invocation's claims are fresh again."""

        def change(held: Held) -> dict[str, str]:
            for claim in held.values():
                if claim["driver"] == self.me:
                    claim["at"] = time.time()
            return {}

        self._change(change)

    def release(self) -> None:
        """Give up every claim of this invocation."""

        def change(held: Held) -> dict[str, str]:
            for h in [h for h, c in held.items() if c["driver"] == self.me]:
                del held[h]
            return {}

        self._change(change)


def _read(path: Path) -> Held:
    """The claims in ``path``; none where it is absent or unreadable (a claim that cannot be read holds nothing)."""
    try:
        held = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(held, dict):
        return {}
    return {
        str(h): {"driver": str(c["driver"]), "at": float(c["at"])}
        for h, c in held.items()
        if isinstance(c, dict) and isinstance(c.get("driver"), str) and isinstance(c.get("at"), int | float)
    }
