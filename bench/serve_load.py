"""Benchmark: `graft serve` under load from 1, 4 and 16 concurrent clients on 127.0.0.1 only.
Prints requests/s, p50/p99 latency, failures, the /health answers during each load (p99 and the
slowest, probed from a process of its own every 0.2 s), and
the server's resident memory before and after. Bounded: each level runs --seconds, then stops.

    python bench/serve_load.py RUN                 # 1, 4, 16 clients, 20 s each
    python bench/serve_load.py RUN --seconds 60 --clients 16   # the 60-second soak
    python bench/serve_load.py RUN --engine torch  # PyTorch rather than the ONNX export
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


_PROBE = """
import json, sys, time, httpx
url, stop = sys.argv[1], time.perf_counter() + float(sys.argv[2])
out = []
with httpx.Client(timeout=10) as http:
    while time.perf_counter() < stop:
        t = time.perf_counter()
        http.get(url)
        out.append(time.perf_counter() - t)
        time.sleep(0.2)
print(json.dumps(out))
"""


def load(base: str, image: bytes, clients: int, seconds: float) -> dict:
    stop = time.perf_counter() + seconds
    latencies: list[float] = []
    failures = [0]
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=60) as http:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                try:
                    r = http.post(f"{base}/predict", files=[("files", ("x.png", image))])
                    ok = r.status_code == 200 and r.json()[0]["error"] is None
                except httpx.HTTPError:
                    ok = False
                with lock:
                    latencies.append(time.perf_counter() - t) if ok else None
                    failures[0] += not ok

    # /health is probed from a process of its own: in this one, 16 client threads share one GIL
    # and would add their own waiting to what the server takes
    prober = subprocess.Popen(
        [sys.executable, "-c", _PROBE, f"{base}/health", str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    health = sorted(json.loads(prober.communicate(timeout=60)[0]))
    lat = sorted(latencies)
    return {
        "clients": clients,
        "requests": len(lat),
        "failed": failures[0],
        "rps": len(lat) / wall,
        "p50": 1000 * statistics.median(lat),
        "p99": 1000 * lat[int(0.99 * (len(lat) - 1))],
        "health_max": 1000 * health[-1],
        "health_p99": 1000 * health[int(0.99 * (len(health) - 1))],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", help="run folder to serve")
    ap.add_argument("--image", help="image to send (default: the run's first val image)")
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--engine", help="graft serve --engine (auto, torch, onnxruntime)")
    args = ap.parse_args()
    if args.image:
        image = Path(args.image).read_bytes()
    else:
        first = (Path(args.run) / "split" / "val.txt").read_text().splitlines()[0]
        root = json.loads((Path(args.run) / "split" / "source.json").read_text())["root"]
        image = (Path(root) / first.split("\t", 1)[1]).read_bytes()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "graft",
            "serve",
            args.run,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *(["--engine", args.engine] if args.engine else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        httpx.post(f"{base}/predict", files=[("files", ("x.png", image))], timeout=60)  # warm
        before = rss_mb(server.pid)
        rows = []
        for c in args.clients.split(","):
            rows.append({**load(base, image, int(c), args.seconds), "rss": rss_mb(server.pid)})
        after = rss_mb(server.pid)
        alive = httpx.get(f"{base}/health", timeout=5).status_code == 200
    finally:
        server.terminate()
        server.wait(30)
    print(
        f"server RSS {before:.0f} MB before, {after:.0f} MB after; /health after load: "
        f"{'ok' if alive else 'FAILED'}; {args.seconds:.0f} s per level"
    )
    print(
        "\n| clients | requests | failed | req/s | p50 ms | p99 ms | /health p99 ms "
        "| slowest /health ms "
        "| RSS after, MB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['clients']} | {r['requests']} | {r['failed']} | {r['rps']:.1f} | "
            f"{r['p50']:.0f} | {r['p99']:.0f} | {r['health_p99']:.0f} | {r['health_max']:.0f} "
            f"| {r['rss']:.0f} |"
        )


if __name__ == "__main__":
    main()
