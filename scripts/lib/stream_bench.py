#!/usr/bin/env python3
"""The workload and the measurements of `scripts/bench stream`.

usage: stream_bench.py ebb|restic WORK SECONDS RATE_MBPS

A steady workload changes WORK/src for SECONDS: four logs get lines every 50 ms
(a fifth of RATE), and new 1 MiB files of incompressible data appear (the rest of
RATE), the oldest deleted once 32 exist. With every batch, logs/probe.log gets a
marker line naming when it was written.

ebb: `ebb stream dir` ships WORK/src (started here, stopped at the end). A prober
restores logs/probe.log `--at latest` back to back; a marker's lag is the start of
the first restore that has it minus when it was written.

restic: `restic backup` runs back to back over the same workload; a marker's lag is
the end of the first backup that started after it was written.

Prints one JSON object: lags (s), CPU seconds and peak RSS of the shipper.
"""

import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

mode, work, seconds, rate = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
ebb = os.environ.get("EBB_BIN", "ebb")
src = os.path.join(work, "src")
logs = os.path.join(src, "logs")
data = os.path.join(src, "data")
os.makedirs(logs, exist_ok=True)
os.makedirs(data, exist_ok=True)
# The logs exist before the stream starts, as a service's logs do.
for name in ["app0.log", "app1.log", "app2.log", "app3.log", "probe.log"]:
    open(os.path.join(logs, name), "ab").close()

TICK = 0.05
log_bytes = rate * 1e6 / 5 * TICK / 4  # per log per tick
file_every = (1 << 20) / (rate * 1e6 * 4 / 5)  # seconds between new files
markers = []  # (seq, time written)
stop = threading.Event()
written = [0]


def workload():
    rng = random.Random(7)
    files = []
    seq = 0
    next_file = time.time()
    start = time.time()
    tick = 0
    while time.time() - start < seconds:
        now = time.time()
        for i in range(4):
            line = f"{now:.6f} app{i} request {seq} " + "x" * 80 + "\n"
            batch = line * max(1, int(log_bytes / len(line)))
            with open(os.path.join(logs, f"app{i}.log"), "a") as f:
                f.write(batch)
            written[0] += len(batch)
        with open(os.path.join(logs, "probe.log"), "a") as f:
            f.write(f"MARK {seq} {now:.6f}\n")
        markers.append((seq, now))
        seq += 1
        while now >= next_file:
            name = os.path.join(data, f"f{len(files):06d}")
            with open(name, "wb") as f:
                f.write(rng.randbytes(1 << 20))
            written[0] += 1 << 20
            files.append(name)
            if len(files) > 32:
                os.remove(files[-33])
            next_file += file_every
        tick += 1
        time.sleep(max(0, start + tick * TICK - time.time()))
    stop.set()


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def hwm_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def pct(xs, p):
    xs = sorted(xs)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


result = {"mode": mode, "seconds": seconds}
if mode == "ebb":
    state = os.path.join(work, "state")
    stream = subprocess.Popen(
        [ebb, "stream", "dir", "--source", "bench", "--rpo", "1m", "--state-dir", state, src],
        stdout=subprocess.DEVNULL,
        stderr=open(os.path.join(work, "stream.log"), "w"),
    )
    # Up once the first point is made.
    deadline = time.time() + 60
    while time.time() < deadline:
        r = subprocess.run([ebb, "points", "--source", "bench", "--json"], capture_output=True)
        if r.returncode == 0 and json.loads(r.stdout or "[]"):
            break
        time.sleep(0.2)
    cpu0 = cpu_seconds(stream.pid)
    t0 = time.time()
    w = threading.Thread(target=workload)
    w.start()
    seen = {}
    out = tempfile.mkdtemp(dir=work)
    n = 0
    while not stop.is_set() or len(seen) < len(markers) and time.time() < t0 + seconds + 30:
        probe = time.time()
        target = os.path.join(out, str(n))
        n += 1
        r = subprocess.run(
            [ebb, "restore", "-q", "--source", "bench", "--at", "latest", "--path", "logs/probe.log", target],
            capture_output=True,
        )
        if r.returncode == 0:
            with open(os.path.join(target, "probe.log"), "rb") as f:
                for line in f:
                    if line.startswith(b"MARK "):
                        s = int(line.split()[1])
                        seen.setdefault(s, probe)
        subprocess.run(["rm", "-rf", target])
    w.join()
    cpu1 = cpu_seconds(stream.pid)
    elapsed = time.time() - t0
    result["cpu_seconds"] = cpu1 - cpu0
    result["wall_seconds"] = elapsed
    result["rss_kib"] = hwm_kib(stream.pid)
    stream.terminate()
    stream.wait()
    lags = [max(0.0, seen[s] - t) for s, t in markers if s in seen]
    result["missing"] = len(markers) - len(lags)
    result["probes"] = n
else:
    t0 = time.time()
    w = threading.Thread(target=workload)
    w.start()
    runs = []
    cpu = 0.0
    while not stop.is_set() or not runs or runs[-1][0] <= markers[-1][1]:
        s = time.time()
        r = subprocess.run(["restic", "backup", "-q", src], capture_output=True)
        if r.returncode != 0:
            sys.exit(f"restic backup failed: {r.stderr.decode()}")
        e = time.time()
        runs.append((s, e))
        ru = os.times()
        cpu = ru.children_user + ru.children_system
    w.join()
    result["cpu_seconds"] = cpu
    result["wall_seconds"] = time.time() - t0
    result["backups"] = len(runs)
    lags = []
    for _, t in markers:
        after = [e for s, e in runs if s >= t]
        if after:
            lags.append(after[0] - t)
    result["missing"] = len(markers) - len(lags)

result["markers"] = len(markers)
result["written_mb"] = written[0] / 1e6
result["lag_p50"] = pct(lags, 50)
result["lag_p99"] = pct(lags, 99)
result["lag_max"] = max(lags) if lags else None
print(json.dumps(result))
