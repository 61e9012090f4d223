"""Load benchmark of the triage API: 50 concurrent clients on the incident list and get
endpoints with 10,000 incidents in the failure book.

Real Redis (``driftline.localstack.start_stack(services=("redis",))``), the app under uvicorn
on a free port in a child process, clients as asyncio tasks in this process, each with its own
keep-alive connection. Each client
loops: list a page (50 newest, or a filtered page every fourth call), then get one incident
picked at random. Prints p50/p99 latency per endpoint and requests/s, and writes
``benchmarks/results/api_load.md``.

    .venv/bin/python benchmarks/api_load.py [--incidents 10000] [--clients 50] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from driftline.localstack import free_port, start_stack  # noqa: E402
from tests.unit.service.populate import bulk_incidents  # noqa: E402

TOKEN = "bench-viewer-token-0123456789"  # noqa: S105 - a throwaway token for this run
RESULTS = ROOT / "benchmarks" / "results" / "api_load.md"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_api(redis_url: str, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "DRIFTLINE_REDIS_URL": redis_url, "DRIFTLINE_API_PORT": str(port),
           "DRIFTLINE_API_TOKENS": f"bench:viewer:{TOKEN}", "DRIFTLINE_LOG_LEVEL": "WARNING"}
    code = ("from driftline.config import load_settings\n"
            "from driftline.service.app import serve\n"
            "serve(load_settings())\n")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the API did not become ready in 30 s")


class Connection:
    """A minimal keep-alive HTTP/1.1 client on asyncio streams. httpx spends about twice the
    API's CPU per request; on two shared cores that would measure the client, not the API."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, target: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write((f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                           f"Authorization: Bearer {TOKEN}\r\n\r\n").encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        code = int(lines[0].split()[1])
        length = next(int(v) for k, _, v in (h.partition(":") for h in lines[1:])
                      if k.lower() == "content-length")
        return code, await self.reader.readexactly(length)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def client(port: int, ids: list[str], stop: float, seed: int,
                 lat: dict[str, list[float]], errors: list[str]) -> None:
    rng = random.Random(seed)
    conn = Connection(port)
    n = 0
    try:
        while time.monotonic() < stop:
            n += 1
            listing = ("list?status=open", "/api/v1/incidents?status=open&limit=50") \
                if n % 4 == 0 else ("list", "/api/v1/incidents?limit=50")
            for kind, target in (listing, ("get", f"/api/v1/incidents/{rng.choice(ids)}")):
                t = time.perf_counter()
                code, _ = await conn.get(target)
                lat[kind].append(time.perf_counter() - t)
                if code != 200:
                    errors.append(f"{kind} {code}")
    finally:
        conn.close()


async def run_load(port: int, ids: list[str], clients: int,
                   seconds: float) -> tuple[dict[str, list[float]], list[str], float]:
    lat: dict[str, list[float]] = {"list": [], "list?status=open": [], "get": []}
    errors: list[str] = []
    warm = Connection(port)
    await warm.get("/api/v1/incidents")
    warm.close()
    start = time.monotonic()
    await asyncio.gather(*(client(port, ids, start + seconds, k, lat, errors)
                           for k in range(clients)))
    return lat, errors, time.monotonic() - start


def ms(x: float) -> str:
    return f"{1000 * x:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--incidents", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--no-write", action="store_true", help="do not write the results file")
    args = ap.parse_args()
    with start_stack(services=("redis",)) as stack:
        url = stack.redis_url
        r = redis.Redis.from_url(url)
        r.flushdb()
        t = time.monotonic()
        ids = bulk_incidents(r, args.incidents)
        fill_s = time.monotonic() - t
        print(f"{len(ids)} incidents in the book ({fill_s:.1f} s)", flush=True)
        port = free_port()
        api = start_api(url, port)
        load_before = os.getloadavg()[0]
        cpu0, client0 = cpu_seconds(api.pid), time.process_time()
        try:
            lat, errors, elapsed = asyncio.run(run_load(port, ids, args.clients, args.seconds))
            server_cpu = cpu_seconds(api.pid) - cpu0
            client_cpu = time.process_time() - client0
            load_after = os.getloadavg()[0]
        finally:
            api.terminate()
            api.wait(15)
        r.close()
    total = sum(len(v) for v in lat.values())
    rows = []
    for kind, xs in lat.items():
        a = np.asarray(xs)
        rows.append(f"| `{kind}` | {len(a)} | {ms(float(np.percentile(a, 50)))} | "
                    f"{ms(float(np.percentile(a, 99)))} | {len(a) / elapsed:.0f} |")
    every = np.asarray([x for xs in lat.values() for x in xs])
    rows.append(f"| all | {total} | {ms(float(np.percentile(every, 50)))} | "
                f"{ms(float(np.percentile(every, 99)))} | {total / elapsed:.0f} |")
    table = "\n".join(["| endpoint | requests | p50 ms | p99 ms | requests/s |",
                       "|---|---|---|---|---|", *rows])
    per_req = f"{1000 * server_cpu / total:.1f}"
    cpu_line = (f"API process CPU: {server_cpu:.1f} s = {per_req} ms per request "
                f"(ceiling on one core: {total / server_cpu:.0f} requests/s); clients' CPU "
                f"{client_cpu:.1f} s; load average {load_before:.1f} before, {load_after:.1f} "
                "after")
    print(table)
    print(cpu_line)
    print(f"errors: {len(errors)} {sorted(set(errors))[:5]}")
    if args.no_write:
        return
    cpu = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in
                     Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = cpu
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(f"""# Triage API load: incident list and get

{args.clients} concurrent clients (asyncio, keep-alive HTTP/1.1) for {elapsed:.0f} s against the
API under uvicorn (one worker process) with {len(ids):,} incidents in the failure book (90 %
resolved), real Redis {stack.redis_version or ''} started by `driftline.localstack`. Each client
loops: list the 50 newest incidents (every fourth list is filtered to `status=open`), then get
one incident at random. Errors (non-200): {len(errors)}.

{table}

{cpu_line}.

- machine: {os.cpu_count()} cores ({model}), {platform.system()} {platform.release()},
  Python {platform.python_version()}; the clients, the API and Redis share these cores
- date: {datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
- command: `.venv/bin/python benchmarks/api_load.py --incidents {args.incidents} \\
  --clients {args.clients} --seconds {args.seconds:g}`
""")
    print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
