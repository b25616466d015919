"""Fault table rows: a run's files: hashes, values read back, locks, --out."""

from __future__ import annotations

from tests.faults.table import Case, train


# ------------------------------------------------------------------------------------- the lock
def _staging_of_another_writer(env) -> list:
    """Process A holds OUT's lock and writes OUT.partial; B is refused and must leave A's staging alone."""
    from filelock import FileLock

    out = env.tmp / "out"
    staging = env.tmp / "out.partial"
    staging.mkdir()
    (staging / "model.json").write_text("{}")            # A's files so far (no checkpoint yet)
    lock = FileLock(str(env.tmp / ".out.lock"))
    lock.acquire()
    env.extra["lock"] = lock
    return train(env, env.data, out=out)


CASES: list[Case] = [
    # ------------------------------------------------------------- 5. a refused writer leaves the owner's staging
    Case("r2-refused-writer-keeps-the-owners-staging", _staging_of_another_writer, says=("another medxfer process",),
         files=("out.partial/model.json",)),
]
