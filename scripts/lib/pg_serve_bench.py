#!/usr/bin/env python3
"""scripts/bench pg-serve: one point query at a past moment T, answered by `ebb pg
serve --at T` (no restore), by `ebb pg restore --at T` + start, and by `pgbackrest
restore --type=time` + start, on the same database and WAL.

For each pgbench scale (EBB_BENCH_SERVE_SCALES, default "68,340": about 1 GB and
5 GB): a cluster shipping its WAL both to ebb (`ebb stream pg`) and to pgbackrest
(archive-push, async, zstd, aes-256-cbc), a base backup with each, then two moments:
T1 after EBB_BENCH_SERVE_TRANSACTIONS (default 2000) pgbench transactions, the same
number at every scale, so that what differs between the scales is the size of the
database and not the WAL to replay; T2 after EBB_BENCH_SERVE_LOAD_SECONDS (default
60) more of pgbench at full speed, where replaying the WAL since the base backup
takes most of the time of every tool. At each T, each from a cold page cache, the
time from the command to the first answer of
`select abalance from pgbench_accounts where aid = K`, K the account the last
transaction at or before T changed (checked against its balance at T, from the
primary's commit timestamps), and for ebb pg serve the WAL its plan
replays and the bytes of the base backup it fetched from the repository for
recovery and the query (and, apart, the WAL its plan read to find where T ends);
the median of EBB_BENCH_SERVE_RUNS (default 3) runs of each. Targets (issue 19):
the first answer within 10 s at both sizes, flat in size, at least 10x faster than
pgbackrest at 5 GB, and under 5 % of the database fetched. T1 holds the WAL to
replay the same at both sizes; at T2 replaying it takes most of every tool's time.
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
TRANSACTIONS = int(os.environ.get("EBB_BENCH_SERVE_TRANSACTIONS", "2000"))
LOAD_SECONDS = int(os.environ.get("EBB_BENCH_SERVE_LOAD_SECONDS", "60"))
RUNS = int(os.environ.get("EBB_BENCH_SERVE_RUNS", "3"))
QUERY = "select abalance from pgbench_accounts where aid = {aid}"


def psql(host, port, sql, password=None):
    env = dict(os.environ, PGPASSWORD=password) if password else None
    return subprocess.run([f"{PGBIN}/psql", "-h", host, "-p", str(port), "-U", "postgres", "-d", "postgres",
                           "-qAt", "-c", sql], env=env, capture_output=True, text=True)


def first_answer(host, port, aid, deadline, password=None):
    """Polls the point query until it answers; returns the answer."""
    while True:
        r = psql(host, port, QUERY.format(aid=aid), password)
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
        moments = []
        for load in (["-t", str(TRANSACTIONS // 2)], ["-T", str(LOAD_SECONDS)]):
            say(f"pg-serve: pgbench -N -c 2 -j 2 {' '.join(load)}")
            cluster.pgbench("-c", "2", "-j", "2", *load, "-N").wait()
            target = datetime.now(timezone.utc)
            while datetime.now(timezone.utc) <= target + timedelta(milliseconds=10):
                time.sleep(0.01)
            # A transaction after T, so that recovery to T ends on one.
            cluster.q(f"create table after_t{len(moments)} as select 1 as x")
            # The account the last transaction at or before T changed: its balance at T
            # needs the WAL replayed to T.
            aid = cluster.q("select aid from pgbench_history where pg_xact_commit_timestamp(xmin) <= %s "
                            "order by pg_xact_commit_timestamp(xmin) desc limit 1", target)[0][0]
            want = cluster.q("select coalesce(sum(delta), 0) from pgbench_history where aid = %s "
                             "and pg_xact_commit_timestamp(xmin) <= %s", aid, target)[0][0]
            moments.append((target, aid, want))
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
    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(repo, "packs")) for f in fs)
    return dict(repo=repo, pgbr=pgbr, moments=moments, db_bytes=db_bytes, stored=stored)


def size(m):
    """Bytes of a size ebb printed: a regex match of (number, unit)."""
    return float(m.group(1)) * {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[m.group(2)] if m else -1


def ebb_serve(p, target, aid):
    """`ebb pg serve --at T` until the point query answers; (seconds, answer, bytes of the base backup fetched
    in all, of them by the end of recovery, WAL replayed, WAL the plan read)."""
    scratch = os.path.join(WORK, "serve-scratch")
    env = dict(os.environ, EBB_REPOSITORY=f"file://{p['repo']}", EBB_KEY_FILE=os.path.join(WORK, "ebb.key"))
    at = target.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    err = os.path.join(WORK, "serve.err")
    drop_caches()
    t0 = time.time()
    proc = subprocess.Popen([EBB, "pg", "serve", "--source", "bench", "--at", at, "--scratch", scratch,
                             "--listen", ""], env=env, stdout=subprocess.PIPE, stderr=open(err, "w"), text=True)
    port, replay = None, -1
    for line in proc.stdout:
        replay = size(re.search(r"replaying WAL \S+ to \S+ \(([\d.]+) (\w+)", line)) if replay < 0 else replay
        m = re.search(r" port=(\d+)", line)
        if m:
            port = int(m.group(1))
            break
    if port is None:
        raise SystemExit(f"ebb pg serve did not answer: {open(err).read()}")
    answer = first_answer(os.path.join(scratch, "run"), port, aid, t0 + 3600)
    took = time.time() - t0
    proc.terminate()
    proc.wait()
    text = open(err).read()
    # By the time it says it answers (recovery), and in all: recovery, the point
    # query, the stop.
    ready = size(re.search(r"answering at T after fetching ([\d.]+) (\w+) of the base backup", text))
    plan = size(re.search(r"\(([\d.]+) (\w+) for the plan", text))
    fetched = size(re.search(r"fetched ([\d.]+) (\w+) of the base backup from the repository in all", text))
    return took, answer, fetched, ready, replay, plan


def restored(p, target, aid, tool):
    """A restore to T (ebb or pgbackrest), PostgreSQL started on it until the point query answers."""
    dir = os.path.join(WORK, f"restored-{tool}")
    data = os.path.join(dir, "data")
    os.makedirs(data)
    os.chmod(dir, 0o755)
    os.chmod(data, 0o700)
    run(["chown", "-R", "postgres:postgres", dir])
    if tool == "ebb":
        cmd = ["env", f"EBB_REPOSITORY=file://{p['repo']}", EBB, "-q", "--key-file", os.path.join(WORK, "ebb.key"),
               "pg", "restore", "--at", target.strftime("%Y-%m-%dT%H:%M:%S.%fZ"), "--source", "bench", data]
    else:
        cmd = ["pgbackrest", f"--config={p['pgbr']}/conf", "--stanza=bench", f"--pg1-path={data}", "--type=time",
               f"--target={target.strftime('%Y-%m-%d %H:%M:%S.%f+00')}", "--target-action=promote", "restore"]
    drop_caches()
    t0 = time.time()
    as_pg(cmd, stdout=subprocess.DEVNULL)
    server = pb.Recovered(dir, data)
    try:
        server.recover()
        answer = first_answer("127.0.0.1", server.port, aid, t0 + 3600, PASSWORD)
        took = time.time() - t0
    finally:
        server.stop()
    subprocess.run(["rm", "-rf", dir])
    return took, answer


def main():
    rows = []
    for scale in SCALES:
        p = prepare(scale)
        for moment, (target, aid, want) in enumerate(p["moments"], 1):
            runs = {"serve": [], "ebb": [], "pgbackrest": []}
            for run_no in range(1, RUNS + 1):
                say(f"pg-serve: scale {scale}, T{moment}, run {run_no}: ebb pg serve")
                runs["serve"].append(ebb_serve(p, target, aid))
                say(f"pg-serve: scale {scale}, T{moment}, run {run_no}: ebb pg restore + start")
                runs["ebb"].append(restored(p, target, aid, "ebb"))
                say(f"pg-serve: scale {scale}, T{moment}, run {run_no}: pgbackrest restore + start")
                runs["pgbackrest"].append(restored(p, target, aid, "pgbackrest"))
            for name, rs in runs.items():
                for r in rs:
                    if r[1] != want:
                        raise SystemExit(f"{name} at scale {scale}, T{moment} answered {r[1]}, want {want} "
                                         "(the balance at T)")
            # The median run of each, by time.
            serve, restore, pgbr = (sorted(runs[k])[len(runs[k]) // 2] for k in ("serve", "ebb", "pgbackrest"))
            rows.append((scale, moment, p["db_bytes"], serve, restore, pgbr, p["stored"]))
        subprocess.run(["rm", "-rf", p["repo"], p["pgbr"]])

    print(f"\nbench pg-serve — {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {os.cpu_count()} cores, "
          "PostgreSQL 15; after the base backups, pgbench -N -c 2:")
    print(f"T1 after {TRANSACTIONS} transactions, T2 after {LOAD_SECONDS} s more at full speed. One point query at T")
    print(f"({QUERY.format(aid='K')}, K the account the last transaction at or before T changed), from a cold page")
    print(f"cache, seconds from the command to its answer, the median of {RUNS} runs:")
    print(f"{'database':>10} {'T':>2} {'WAL replayed':>13} {'ebb pg serve':>13} {'fetched':>11} {'ebb restore':>12} "
          f"{'pgbackrest':>11} {'pgbackrest / serve':>19}")
    for scale, moment, db, serve, restore, pgbr, stored in rows:
        print(f"{db / 1e9:7.2f} GB T{moment} {serve[4] / 1e6:10.1f} MB {serve[0]:13.2f} {serve[2] / 1e6:8.1f} MB "
              f"{restore[0]:12.2f} {pgbr[0]:11.2f} {pgbr[0] / serve[0]:18.1f}x")
    for scale, moment, db, serve, restore, pgbr, stored in rows:
        share = 100 * serve[2] / db
        print(f"scale {scale}, T{moment}: fetched of the base backup for recovery and the point query "
              f"{serve[2] / 1e6:.1f} MB = {share:.2f} % of the database, {100 * serve[2] / stored:.1f} % of the "
              f"{stored / 1e6:.0f} MB it takes in the repository (compressed); {serve[3] / 1e6:.1f} MB of it by the "
              f"end of recovery; and {serve[5] / 1e6:.1f} MB of WAL read by the plan")
    print("targets (issue 19): within 10 s and flat in size, at least 10x pgbackrest at 5 GB, under 5 % fetched")
    for scale, moment, db, serve, restore, pgbr, stored in rows:
        share = 100 * serve[2] / db
        print(f"  {db / 1e9:.1f} GB, T{moment}: first answer {serve[0]:.2f} s (within 10 s: "
              f"{'met' if serve[0] <= 10 else 'NOT met'}); fetched {share:.2f} % (under 5 %: "
              f"{'met' if share < 5 else 'NOT met'})")
    for moment in sorted({r[1] for r in rows}):
        at = [r for r in rows if r[1] == moment]
        small, big = at[0], at[-1]
        if len(at) > 1:
            print(f"  T{moment}: {big[3][0]:.2f} s at {big[2] / 1e9:.1f} GB against {small[3][0]:.2f} s at "
                  f"{small[2] / 1e9:.1f} GB ({big[3][0] / small[3][0]:.2f}x for {big[2] / small[2]:.1f}x the data, "
                  f"{big[3][4] / small[3][4]:.2f}x the WAL)")
        x = big[5][0] / big[3][0]
        print(f"  T{moment}, at {big[2] / 1e9:.1f} GB: pgbackrest / ebb pg serve = {x:.1f}x (at least 10x: "
              f"{'met' if x >= 10 else 'NOT met'})")


if __name__ == "__main__":
    main()
