"""Which live invocation runs which cell of an experiment, so that two invocations of one experiment into one
results folder never compute a cell twice.

``running.json`` beside ``results.jsonl`` maps a cell's config hash to the invocation running it (host:pid);
it is changed under a file lock. An invocation claims the cells it is about to run and skips those a live
invocation holds; the claims of an invocation that died on this host are void, and every claim is released
when its invocation ends.
"""

from __future__ import annotations

import json
from pathlib import Path

from filelock import FileLock

from benchmark.errors import BenchmarkError
from benchmark.store import ResultStore
from benchmark.tracking import driver_id, driver_is_dead


class Claims:
    def __init__(self, store: ResultStore) -> None:
        self.path = store.dir / "running.json"
        self.me = driver_id()

    def _change(self, change) -> dict[str, str]:
        """Apply ``change(held) -> result`` to the live claims under the lock; write them back."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(self.path) + ".lock"):
                held = _read(self.path)
                held = {h: d for h, d in held.items() if not driver_is_dead(d)}
                result = change(held)
                if not held:
                    self.path.unlink(missing_ok=True)
                    return result
                tmp = self.path.with_name(f".running.json.{self.me.replace(':', '-')}")
                tmp.write_text(json.dumps(held, indent=1), encoding="utf-8")
                tmp.replace(self.path)
        except OSError as exc:
            raise BenchmarkError(f"{self.path}: cannot record which cells this run takes ({exc})") from None
        return result

    def take(self, hashes: list[str]) -> dict[str, str]:
        """Claim ``hashes`` for this invocation; the ones another live invocation holds (hash -> host:pid)
        are returned and not taken."""

        def change(held: dict[str, str]) -> dict[str, str]:
            theirs = {h: held[h] for h in hashes if held.get(h, self.me) != self.me}
            held.update({h: self.me for h in hashes if h not in theirs})
            return theirs

        return self._change(change)

    def release(self) -> None:
        """Give up every claim of this invocation."""

        def change(held: dict[str, str]) -> dict[str, str]:
            for h in [h for h, d in held.items() if d == self.me]:
                del held[h]
            return {}

        self._change(change)


def _read(path: Path) -> dict[str, str]:
    try:
        held = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in held.items()} if isinstance(held, dict) else {}
