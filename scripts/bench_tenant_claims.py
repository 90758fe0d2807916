"""What a tenant's submit claim costs the worker: the claim check (workers/tenancy.py) per job, one
round trip each vs a batch's claims read in one pipeline, against a real embedded Redis; interleaved
rounds. An untenanted job's check (no Redis) beside them.

    python scripts/bench_tenant_claims.py [--jobs 2000] [--rounds 3] [--batch 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from producers.local_redis import LocalRedis
from shared.jobs import ClassifyJob
from shared.tenant_keys import claim_key, job_digest
from workers.tenancy import claim_refusal, claims_from, queue_claim_lookups


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    server = LocalRedis(Path(tempfile.mkdtemp(prefix="bench-claims-")), record_url=False)
    client = redis.Redis.from_url(server.start())
    jobs = [
        ClassifyJob(id=f"acme:j{i}", texts=["a short text"], labels=["x", "y"]).model_dump(mode="json")
        for i in range(args.jobs)
    ]
    try:
        for rnd in range(args.rounds):
            for job in jobs:
                client.set(claim_key(job["id"]), job_digest(job))
            start = time.perf_counter()
            for job in jobs:
                assert claim_refusal(client, job["id"], job) is None
            alone = (time.perf_counter() - start) / len(jobs) * 1e6
            start = time.perf_counter()
            for b in range(0, len(jobs), args.batch):
                batch = jobs[b : b + args.batch]
                pipe = client.pipeline(transaction=False)
                claims = claims_from(queue_claim_lookups(pipe, [j["id"] for j in batch]), pipe.execute())
                for job in batch:
                    assert claim_refusal(client, job["id"], job, claims) is None
            batched = (time.perf_counter() - start) / len(jobs) * 1e6
            start = time.perf_counter()
            for job in jobs:
                claim_refusal(client, "plain-" + job["id"][5:], job)
            plain = (time.perf_counter() - start) / len(jobs) * 1e6
            print(
                f"round {rnd}: tenant job, own round trip {alone:.1f} us; in a pipeline of {args.batch} "
                f"{batched:.1f} us; untenanted {plain:.2f} us"
            )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
