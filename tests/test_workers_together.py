"""Three enrichment workers, as the separate processes they are in production, on one database.

Issues 4 and 7: several workers on one database lose nothing and never look a message up twice at
once. The workers run `python -m receiver worker` with receiver.enrich logging at DEBUG, each into
a log file of its own; enrich.py logs every claimed chunk (its lease and ids, by stage) once the
claim has committed, every renewal, and every release before its writes. From those lines the test
rebuilds, for every message, when each worker held it, and asserts that no two workers' holds
overlap.

How a hold is reckoned, so that a correct claim can never look like an overlap:
- it starts when the "claimed" line is written, which is after the claim committed;
- it ends when the "releasing" line is written (before the release's writes), or when the lease
  runs out, whichever comes first; a renewal extends it only if it was logged before the lease
  it renews ran out (then the renewal certainly found its own lease still on the rows).
So each hold is within the time the rows really carried that worker's lease.

Holds are told apart by message and stage: a sweep applies what TWIN says to every stored message
it names, so it may move a message another worker holds from `chat_id` on to `result`, and that
write clears the lease (enrich.apply_message_item): the `result` stage is a new hold, while the
first worker's sweep of the old stage runs on without effect on the row.
"""
from __future__ import annotations

import datetime as dt
import os
import re
import signal
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from receiver.models import Message

from .support import assert_matches_truth, phones, send_mailing, settings_env, wait_for

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 3
MESSAGES = 300

# Put on the workers' PYTHONPATH: the root logger gets a handler before `worker` looks (so its
# INFO basicConfig is skipped), with a timestamp precise enough to order lines across processes.
SITECUSTOMIZE = """\
import logging
logging.basicConfig(level=logging.INFO,
                    format="%(created).6f %(process)d %(levelname)s %(name)s: %(message)s")
logging.getLogger("receiver.enrich").setLevel(logging.DEBUG)
"""

_TIME = r"(?P<t>\d+\.\d+) \d+ DEBUG receiver\.enrich: "
_LEASE = r"\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d(?:\.\d+)?"
CLAIMED = re.compile(_TIME + rf"claimed \d+ messages with lease (?P<lease>{_LEASE}): (?P<groups>.*)$")
RENEWED = re.compile(_TIME + rf"renewed lease (?P<lease>{_LEASE}) of \d+ messages to (?P<new>{_LEASE})$")
RELEASING = re.compile(_TIME + rf"releasing lease (?P<lease>{_LEASE}) of \d+ messages")


@dataclass
class Hold:
    worker: int
    start: float
    end: float


def epoch(lease: str) -> float:
    """A lease as the workers wrote it (naive UTC) in seconds since the epoch."""
    return dt.datetime.fromisoformat(lease).replace(tzinfo=dt.UTC).timestamp()


def holds_from_log(worker: int, text: str) -> dict[tuple[str, str], list[Hold]]:
    """(message id, stage) -> the times this worker held it, from its DEBUG lines."""
    open_claims: dict[str, dict] = {}      # lease -> {"until": epoch, "started": [(key, t)]}
    holds: dict[tuple[str, str], list[Hold]] = defaultdict(list)

    def close(claim: dict, at: float) -> None:
        for key, start in claim["started"]:
            holds[key].append(Hold(worker, start, min(at, claim["until"])))

    for line in text.splitlines():
        if match := CLAIMED.match(line):
            t = float(match["t"])
            claim = open_claims.setdefault(match["lease"], {"until": epoch(match["lease"]), "started": []})
            for group in match["groups"].split():
                stage, _, ids = group.partition("=")
                claim["started"] += [((message_id, stage), t) for message_id in ids.split(",")]
        elif match := RENEWED.match(line):
            t, claim = float(match["t"]), open_claims.pop(match["lease"])
            if t < claim["until"]:
                claim["until"] = epoch(match["new"])
                open_claims[match["new"]] = claim
            else:
                close(claim, claim["until"])   # renewed after it ran out: count no further
        elif match := RELEASING.match(line):
            close(open_claims.pop(match["lease"]), float(match["t"]))
    for claim in open_claims.values():         # never released (a sweep that failed): held until it ran out
        close(claim, claim["until"])
    return holds


def overlaps(holds: dict[tuple[str, str], list[Hold]]) -> list[str]:
    found = []
    for (message_id, stage), spans in holds.items():
        for i, a in enumerate(spans):
            for b in spans[i + 1:]:
                if a.worker != b.worker and a.start < b.end and b.start < a.end:
                    found.append(f"{message_id} ({stage}): worker {a.worker} {a.start:.3f}..{a.end:.3f}, "
                                 f"worker {b.worker} {b.start:.3f}..{b.end:.3f}")
    return found


def stop(workers: list[subprocess.Popen]) -> list[int | None]:
    """SIGTERM each worker and wait for it; one that does not stop in time is killed (None)."""
    for worker in workers:
        worker.send_signal(signal.SIGTERM)
    codes = []
    for worker in workers:
        try:
            codes.append(worker.wait(timeout=20))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            codes.append(None)
    return codes


def all_settled():
    return (Message.select().count() == MESSAGES
            and Message.select().where(Message.stage.not_in(["done", "given_up"])).count() == 0)


def test_three_worker_processes_share_a_mailing_and_never_hold_a_message_together(
        settings, twin, live_app, tmp_path):
    # Deliveries spread over a few seconds and slow statistics pages: sweeps of the three
    # workers run side by side while due messages keep coming.
    twin.configure(final_after=(0.2, 4.0), result_after=(0.2, 2.0), slow_rate=1.0, slow_seconds=0.05,
                   page_cap=50)
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = settings_env(settings)
    # Small batches, so that the mailing is shared out in many claims; a lease that outlasts the test.
    env |= {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")])),
            "ENRICH_BATCH_SIZE": "10", "ENRICH_LEASE": "30", "ENRICH_POLL_INTERVAL": "0.05",
            # Sweeps of 10 messages want far more calls than the default ceiling allows; the ceiling
            # with several workers is tested in test_callbudget.py.
            "TWIN24_MAX_CALLS_PER_MINUTE": "0"}
    logs = [tmp_path / f"worker-{n}.log" for n in range(WORKERS)]
    workers = []
    try:
        for path in logs:
            with open(path, "wb") as log:
                workers.append(subprocess.Popen([sys.executable, "-m", "receiver", "worker"], cwd=ROOT,
                                                env=env, stdout=log, stderr=subprocess.STDOUT))
        started = wait_for(lambda: all("enrichment worker started" in p.read_text() for p in logs),
                           timeout=20, interval=0.1)
        assert started, "\n".join(p.read_text()[-2000:] for p in logs)

        began = time.monotonic()
        ids = send_mailing(twin, live_app.url, phones(MESSAGES))
        settled = wait_for(all_settled, timeout=45, interval=0.2)
        took = time.monotonic() - began
    finally:
        exit_codes = stop(workers)
    texts = [path.read_text() for path in logs]

    assert settled, "\n".join(text[-2000:] for text in texts)

    # No message was held by two workers at once, and the work was shared.
    holds: dict[tuple[str, str], list[Hold]] = defaultdict(list)
    claims_per_worker = []
    for n, text in enumerate(texts):
        claims_per_worker.append(sum(1 for line in text.splitlines() if CLAIMED.match(line)))
        for key, spans in holds_from_log(n, text).items():
            holds[key] += spans
    assert sum(1 for count in claims_per_worker if count) >= 2, (
        f"only one worker claimed anything ({claims_per_worker} claims): the test proves nothing")
    clashes = overlaps(holds)
    assert not clashes, (f"{len({c.split()[0] for c in clashes})} messages held by two workers at once, e.g.:\n"
                         + "\n".join(clashes[:10]))

    # Nothing lost, nothing wrong: every message as the simulator says, none left leased.
    assert twin.wait_idle(timeout=10)
    stored = {m.id: m for m in Message.select()}
    assert sorted(stored) == sorted(ids)
    assert_matches_truth(twin, stored, ids)
    assert {m.stage for m in stored.values()} == {"done"}

    # No pass failed: a failed one (a deadlock between two workers' writes, say) strands the batch
    # it had claimed until its lease runs out, and (today) makes the worker exit 1 when stopped.
    failed = [f"worker {n}: {line}" for n, text in enumerate(texts) for line in text.splitlines()
              if re.search(r"enrichment pass failed|^\S*(Error|Exception|Detected)\b|^DETAIL:", line)]
    assert not failed, "a worker's pass failed:\n" + "\n".join(failed[:12])
    assert exit_codes == [0] * WORKERS, "SIGTERM lets each worker finish its sweep and exit cleanly"
    assert Message.select().where(Message.lease_until.is_null(False)).count() == 0
    print(f"\n{MESSAGES} messages settled in {took:.1f} s; claims per worker {claims_per_worker}; "
          f"{sum(map(len, holds.values()))} holds")
