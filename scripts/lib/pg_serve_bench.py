#!/usr/bin/env python3
"""scripts/bench pg-serve: one point query at a past moment T, answered by `ebb pg
serve --at T` (no restore), by `ebb pg restore --at T` + start, and by `pgbackrest
restore --type=time` + start, on the same database and WAL.

For each pgbench scale (EBB_BENCH_SERVE_SCALES, default "68,340": about 1 GB and
5 GB): a cluster shipping its WAL both to ebb (`ebb stream pg`) and to pgbackrest
(archive-push, async, zstd, aes-256-cbc), a base backup with each, then pgbench for
EBB_BENCH_SERVE_LOAD_SECONDS (default 60); T is the end of the load. Then, each from
a cold page cache, the time from the command to the first answer of
`select abalance from pgbench_accounts where aid = K` (checked against the balance
at T, from the primary's commit timestamps), and for ebb pg serve the bytes it
fetched from the repository by then. Targets (issue 19): the first answer within
10 s at both sizes, at least 10x faster than pgbackrest at 5 GB, and under 5 % of
the database fetched.
"""

import os
import re
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pg_bench as pb  # noqa: E402  (its arguments are this script's: EBB PGBIN WORK)

from pg_bench import EBB, PASSWORD, PGBIN, WORK, as_pg, drop_caches, run, say  # noqa: E402

SCALES = [int(s) for s in os.environ.get("EBB_BENCH_SERVE_SCALES", "68,340").split(",")]
LOAD_SECONDS = int(os.environ.get("EBB_BENCH_SERVE_LOAD_SECONDS", "60"))
AID = 12345
QUERY = f"select abalance from pgbench_accounts where aid = {AID}"


def psql(host, port, sql, password=None):
    env = dict(os.environ, PGPASSWORD=password) if password else None
    return subprocess.run([f"{PGBIN}/psql", "-h", host, "-p", str(port), "-U", "postgres", "-d", "postgres",
                           "-qAt", "-c", sql], env=env, capture_output=True, text=True)


def first_answer(host, port, deadline, password=None):
    """Polls the point query until it answers; returns the answer."""
    while True:
        r = psql(host, port, QUERY, password)
        if r.returncode == 0 and r.stdout.strip():
            return int(r.stdout.strip())
        if time.time() > deadline:
            raise SystemExit(f"no answer on {host}:{port} in time: {r.stderr}")
        time.sleep(0.02)


def prepare(scale):
    """The cluster, its two archives and base backups, the load; returns what the runs need."""
    pgbr = os.path.join(WORK, f"pgbr-{scale}")
    conf = (f"archive_mode = on\narchive_command = 'pgbackrest --config={pgbr}/conf --stanza=bench archive-push %p'\n"
            f"track_commit_timestamp = on\n")
    cluster = pb.Cluster(f"serve-{scale}", conf)
    stream = None
    try:
        pb.setup_pgbackrest(cluster, pgbr)
        say(f"pg-serve: pgbench -i -s {scale}")
        cluster.pgbench("-i", "-s", str(scale), "-q").wait()
        db_bytes = cluster.q("select pg_database_size('postgres')")[0][0]
        repo = pb.ebb_repo(f"ebb-{scale}")
        pb.share_with_postgres(repo)
        env = dict(pb.ebb_env(repo), EBB_STATE_DIR=os.path.join(WORK, f"state-{scale}"))
        stream = pb.start_ebb(cluster, repo, env)
        say("pg-serve: ebb pg base-backup")
        run([EBB, "-q", "pg", "base-backup", "--source", "bench", "--dsn", cluster.dsn()], env=env,
            stdout=subprocess.DEVNULL)
        say("pg-serve: pgbackrest backup --type=full")
        as_pg(["env", f"PGPASSWORD={PASSWORD}", "pgbackrest", f"--config={pgbr}/conf", "--stanza=bench", "--type=full",
               "--start-fast", "backup"], stdout=subprocess.DEVNULL)
        say(f"pg-serve: pgbench -c 2 -j 2 -T {LOAD_SECONDS}")
        cluster.pgbench("-c", "2", "-j", "2", "-T", str(LOAD_SECONDS), "-N").wait()
        target = datetime.now(timezone.utc)
        while datetime.now(timezone.utc) <= target + timedelta(milliseconds=10):
            time.sleep(0.01)
        # A transaction after T, so that recovery to T ends on one.
        cluster.q("create table after_t as select 1 as x")
        want = cluster.q("select coalesce(sum(delta), 0) from pgbench_history where aid = %s "
                         "and pg_xact_commit_timestamp(xmin) <= %s", AID, target)[0][0]
        last = cluster.q("select pg_walfile_name(pg_switch_wal())")[0][0]
        flushed = cluster.q("select pg_current_wal_flush_lsn()")[0][0]
        say(f"pg-serve: waiting for both archives to have {last}")
        pb.wait_slot(cluster, flushed, timeout=1800)
        deadline = time.time() + 1800
        while not cluster.q("select coalesce(last_archived_wal >= %s, false) from pg_stat_archiver", last)[0][0]:
            if time.time() > deadline:
                raise SystemExit(f"pgbackrest did not archive {last} in 30 minutes; see {cluster.dir}/log")
            time.sleep(0.1)
    finally:
        if stream:
            stream.terminate()
            stream.wait()
        cluster.stop()
    return dict(repo=repo, pgbr=pgbr, target=target, want=want, db_bytes=db_bytes)


def ebb_serve(p):
    """`ebb pg serve --at T` until the point query answers; (seconds, answer, bytes fetched)."""
    scratch = os.path.join(WORK, "serve-scratch")
    env = dict(os.environ, EBB_REPOSITORY=f"file://{p['repo']}", EBB_KEY_FILE=os.path.join(WORK, "ebb.key"))
    at = p["target"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    err = os.path.join(WORK, "serve.err")
    drop_caches()
    t0 = time.time()
    proc = subprocess.Popen([EBB, "pg", "serve", "--source", "bench", "--at", at, "--scratch", scratch,
                             "--listen", ""], env=env, stdout=subprocess.PIPE, stderr=open(err, "w"), text=True)
    port = None
    for line in proc.stdout:
        m = re.search(r" port=(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    if port is None:
        raise SystemExit(f"ebb pg serve did not answer: {open(err).read()}")
    answer = first_answer(os.path.join(scratch, "run"), port, t0 + 3600)
    took = time.time() - t0
    proc.terminate()
    proc.wait()
    text = open(err).read()
    m = re.search(r"answering at T after fetching ([\d.]+) (\w+)", text)
    fetched = float(m.group(1)) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)] if m else -1
    m = re.search(r"fetched ([\d.]+) (\w+) from the repository in all", text)
    total = float(m.group(1)) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)] if m else -1
    return took, answer, fetched, total


def restored(p, tool):
    """A restore to T (ebb or pgbackrest), PostgreSQL started on it until the point query answers."""
    dir = os.path.join(WORK, f"restored-{tool}")
    data = os.path.join(dir, "data")
    os.makedirs(data)
    os.chmod(dir, 0o755)
    os.chmod(data, 0o700)
    run(["chown", "-R", "postgres:postgres", dir])
    if tool == "ebb":
        cmd = ["env", f"EBB_REPOSITORY=file://{p['repo']}", EBB, "-q", "--key-file", os.path.join(WORK, "ebb.key"),
               "pg", "restore", "--at", p["target"].strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "--source", "bench", data]
    else:
        cmd = ["pgbackrest", f"--config={p['pgbr']}/conf", "--stanza=bench", f"--pg1-path={data}", "--type=time",
               f"--target={p['target'].strftime('%Y-%m-%d %H:%M:%S.%f+00')}", "--target-action=promote", "restore"]
    drop_caches()
    t0 = time.time()
    as_pg(cmd, stdout=subprocess.DEVNULL)
    server = pb.Recovered(dir, data)
    try:
        server.recover()
        answer = first_answer("127.0.0.1", server.port, t0 + 3600, PASSWORD)
        took = time.time() - t0
    finally:
        server.stop()
    subprocess.run(["rm", "-rf", dir])
    return took, answer


def main():
    rows = []
    for scale in SCALES:
        p = prepare(scale)
        say(f"pg-serve: scale {scale}: ebb pg serve")
        serve = ebb_serve(p)
        say(f"pg-serve: scale {scale}: ebb pg restore + start")
        restore = restored(p, "ebb")
        say(f"pg-serve: scale {scale}: pgbackrest restore + start")
        pgbr = restored(p, "pgbackrest")
        for name, r in (("ebb pg serve", serve), ("ebb pg restore", restore), ("pgbackrest restore", pgbr)):
            if r[1] != p["want"]:
                raise SystemExit(f"{name} at scale {scale} answered {r[1]}, want {p['want']} (the balance at T)")
        rows.append((scale, p["db_bytes"], serve, restore, pgbr))
        subprocess.run(["rm", "-rf", p["repo"], p["pgbr"]])

    print(f"\nbench pg-serve — {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {os.cpu_count()} cores, "
          f"PostgreSQL 15; pgbench -N -c 2 for {LOAD_SECONDS} s after the base backups, T at its end;")
    print(f"one point query at T ({QUERY}), from a cold page cache, seconds from the command to its answer:")
    print(f"{'database':>10} {'ebb pg serve':>13} {'fetched':>12} {'ebb restore':>12} {'pgbackrest':>11} "
          f"{'pgbackrest / serve':>19}")
    for scale, db, serve, restore, pgbr in rows:
        print(f"{db / 1e9:8.2f} GB {serve[0]:13.2f} {serve[2] / 1e6:9.1f} MB {restore[0]:12.2f} {pgbr[0]:11.2f} "
              f"{pgbr[0] / serve[0]:18.1f}x")
    for scale, db, serve, restore, pgbr in rows:
        share = 100 * serve[2] / db
        print(f"scale {scale}: fetched by the answer {serve[2] / 1e6:.1f} MB = {share:.2f} % of the database "
              f"(target under 5 %: {'met' if share < 5 else 'NOT met'}); in all, stop included, {serve[3] / 1e6:.1f} MB; "
              f"first answer {serve[0]:.2f} s (target within 10 s: {'met' if serve[0] <= 10 else 'NOT met'})")
    big = rows[-1]
    x = big[4][0] / big[2][0]
    print(f"at {big[1] / 1e9:.1f} GB: pgbackrest / ebb pg serve = {x:.1f}x (target at least 10x: "
          f"{'met' if x >= 10 else 'NOT met'})")


if __name__ == "__main__":
    main()
