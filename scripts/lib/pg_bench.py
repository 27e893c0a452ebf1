#!/usr/bin/env python3
"""scripts/bench pg: ebb against pg_receivewal and pgbackrest on the same workloads.

1. Lag under pgbench: a prober commits a marker every 250 ms and times how long
   until the marker is durable: for `ebb stream pg` and `pg_receivewal
   --synchronous` when the slot's flush position passes it (both confirm only what
   they made durable), for pgbackrest when the archiver has archived its segment.
2. WAL throughput: a bulk load (pgbench -i) made while the shipper was stopped, then
   the time the shipper takes to make the whole backlog durable.
3. Archiving: the same kind of backlog of full segments, archived once
   archive_command is set (`ebb pg archive-push` against `pgbackrest archive-push`,
   async, zstd, encrypted): segments per second.
4. RTO: one cluster shipping its WAL both to ebb (`ebb stream pg`) and to
   pgbackrest (archive-push, async), a base backup with each, then pgbench for
   EBB_BENCH_PG_RTO_SECONDS (default 300); T is the end of the base backups plus
   that. Each tool then restores to T (`ebb pg restore --at T`, `pgbackrest restore
   --type=time`) and PostgreSQL replays up to T and is promoted, timed whole from a
   cold page cache; both must hold exactly the transactions committed by T. A
   third run, the floor, replays the same WAL copied by `cp` from a directory of
   plain segments (the files in place, not timed): no tool's recovery can beat it.

Each run gets a fresh PostgreSQL 15 cluster, run as the postgres user.
"""

import os
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone

import psycopg

EBB, PGBIN, WORK = sys.argv[1], sys.argv[2], sys.argv[3]
SECONDS = int(os.environ.get("EBB_BENCH_SECONDS", "30"))
SCALE = int(os.environ.get("EBB_BENCH_PG_SCALE", "100"))
PARTS = os.environ.get("EBB_BENCH_PG_PARTS", "lag,throughput,archive,rto").split(",")
RTO_SECONDS = int(os.environ.get("EBB_BENCH_PG_RTO_SECONDS", "300"))
PASSWORD = "bench"


def say(*a):
    print("==>", *a, file=sys.stderr, flush=True)


def run(cmd, **kw):
    kw.setdefault("check", True)
    return subprocess.run(cmd, **kw)


def as_pg(cmd, **kw):
    return run(["runuser", "-u", "postgres", "--"] + cmd, **kw)


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Cluster:
    def __init__(self, name, conf=""):
        self.dir = os.path.join(WORK, name)
        os.makedirs(self.dir)
        pw = os.path.join(self.dir, "pw")
        with open(pw, "w") as f:
            f.write(PASSWORD)
        run(["chown", "-R", "postgres:postgres", self.dir])
        os.chmod(self.dir, 0o755)
        self.data = os.path.join(self.dir, "data")
        as_pg([f"{PGBIN}/initdb", "-D", self.data, "-U", "postgres", "--auth=scram-sha-256",
               f"--pwfile={pw}", "-E", "UTF8"], stdout=subprocess.DEVNULL)
        self.port = free_port()
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.dir}'\nmax_wal_size = 4GB\n"
                    f"wal_level = replica\nmax_wal_senders = 10\n{conf}\n")
        self.start()

    def start(self):
        as_pg([f"{PGBIN}/pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w", "start"],
              stdout=subprocess.DEVNULL)

    def stop(self):
        as_pg([f"{PGBIN}/pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def dsn(self):
        return f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres"

    def conn(self):
        return psycopg.connect(self.dsn() + f" password={PASSWORD}", autocommit=True)

    def q(self, sql, *args):
        with self.conn() as c:
            cur = c.execute(sql, args or None)
            return cur.fetchall() if cur.description else []

    def pgbench(self, *args, **kw):
        env = dict(os.environ, PGPASSWORD=PASSWORD)
        return subprocess.Popen([f"{PGBIN}/pgbench", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres",
                                 *args, "postgres"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)


def ebb_env(repo):
    return dict(os.environ, EBB_REPOSITORY=f"file://{repo}", EBB_KEY_FILE=os.path.join(WORK, "ebb.key"),
                PGPASSWORD=PASSWORD, EBB_STATE_DIR=os.path.join(WORK, "state"))


def ebb_repo(name):
    repo = os.path.join(WORK, name)
    env = ebb_env(repo)
    env.pop("EBB_KEY_FILE")
    env["EBB_PASSWORD"] = "bench"
    run([EBB, "init"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    key = os.path.join(WORK, "ebb.key")
    if os.path.exists(key):
        os.remove(key)
    run([EBB, "key", "add", "--new-key-file", key], env=env, stdout=subprocess.DEVNULL)
    run(["chown", "postgres", key])
    run(["chown", "-R", "postgres", repo])
    return repo


def start_ebb(cluster, repo, env=None):
    return subprocess.Popen([EBB, "stream", "pg", "--source", "bench", "--dsn", cluster.dsn(), "--slot", "bench"],
                            env=env or ebb_env(repo), stdout=subprocess.DEVNULL,
                            stderr=open(os.path.join(WORK, "ebb-stream.log"), "a"))


def start_receivewal(cluster, out):
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PGPASSWORD=PASSWORD)
    return subprocess.Popen([f"{PGBIN}/pg_receivewal", "-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres",
                             "-D", out, "--slot", "bench", "--synchronous", "--no-loop"], env=env,
                            stdout=subprocess.DEVNULL, stderr=open(os.path.join(WORK, "receivewal.log"), "a"))


def slot_flush(cluster):
    r = cluster.q("select restart_lsn from pg_replication_slots where slot_name = 'bench'")
    return r[0][0] if r and r[0][0] else None


def lsn_int(lsn):
    hi, lo = lsn.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def wait_slot(cluster, lsn, timeout=300):
    target = lsn_int(lsn)
    deadline = time.time() + timeout
    while time.time() < deadline:
        f = slot_flush(cluster)
        if f and lsn_int(f) >= target:
            return time.time()
        time.sleep(0.002)
    raise SystemExit(f"slot did not reach {lsn} in {timeout} s")


def probe(cluster, durable_lsn, stop, lags):
    """Commits a marker every 250 ms; a watcher records how long until each is durable."""
    pending, lock = [], threading.Lock()

    def watch():
        while not stop.is_set() or pending:
            pos = durable_lsn()
            now = time.time()
            with lock:
                while pending and pos is not None and pos >= pending[0][1]:
                    lags.append(now - pending.pop(0)[0])
            time.sleep(0.002)

    w = threading.Thread(target=watch)
    w.start()
    with cluster.conn() as c:
        c.execute("create table if not exists probe (at timestamptz)")
        while not stop.is_set():
            c.execute("insert into probe values (clock_timestamp())")
            t = time.time()
            lsn = c.execute("select pg_current_wal_flush_lsn()").fetchone()[0]
            with lock:
                pending.append((t, lsn_int(str(lsn))))
            time.sleep(0.25)
    w.join()


def lag_run(tool):
    conf = ""
    pgbr = None
    if tool == "pgbackrest":
        pgbr = os.path.join(WORK, "pgbr")
        conf = f"archive_mode = on\narchive_timeout = 60s\narchive_command = 'pgbackrest --config={pgbr}/conf --stanza=bench archive-push %p'\n"
    cluster = Cluster(f"lag-{tool}", conf)
    try:
        say(f"{tool}: pgbench -i -s 5")
        cluster.pgbench("-i", "-s", "5", "-q").wait()
        child = None
        def slot_pos():
            f = slot_flush(cluster)
            return lsn_int(str(f)) if f else None

        if tool == "ebb":
            child = start_ebb(cluster, ebb_repo("ebb-lag"))
            durable = slot_pos
        elif tool == "pg_receivewal":
            cluster.q("select pg_create_physical_replication_slot('bench', true)")
            child = start_receivewal(cluster, os.path.join(WORK, "receivewal-lag"))
            durable = slot_pos
        else:
            setup_pgbackrest(cluster, pgbr)

            def durable():
                # Everything before the end of the last archived segment is durable.
                last = cluster.q("select last_archived_wal from pg_stat_archiver")[0][0]
                if not last:
                    return None
                seg = (int(last[8:16], 16) << 32 | int(last[16:24], 16) << 24) + (1 << 24)
                return seg
        time.sleep(2)
        say(f"{tool}: pgbench -c 2 -T {SECONDS} -R 400 with a prober")
        load = cluster.pgbench("-c", "2", "-j", "2", "-T", str(SECONDS), "-R", "400", "-N")
        stop, lags = threading.Event(), []
        t = threading.Thread(target=probe, args=(cluster, durable, stop, lags))
        t.start()
        load.wait()
        stop.set()
        t.join()
        if child:
            child.terminate()
            child.wait()
        return lags
    finally:
        cluster.stop()


def setup_pgbackrest(cluster, pgbr):
    os.makedirs(pgbr, exist_ok=True)
    for d in ("repo", "spool", "log", "lock"):
        os.makedirs(os.path.join(pgbr, d), exist_ok=True)
    with open(os.path.join(pgbr, "conf"), "w") as f:
        # repo1-retention-full: without it, every backup warns that the repository may fill up.
        f.write(f"[global]\nrepo1-path={pgbr}/repo\nrepo1-retention-full=2\n"
                f"repo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass=bench\n"
                f"compress-type=zst\narchive-async=y\nspool-path={pgbr}/spool\nprocess-max=2\n"
                f"log-path={pgbr}/log\nlock-path={pgbr}/lock\nlog-level-console=warn\nlog-level-file=off\n"
                f"[bench]\npg1-path={cluster.data}\npg1-port={cluster.port}\npg1-socket-path={cluster.dir}\n")
    run(["chown", "-R", "postgres:postgres", pgbr])
    as_pg(["env", f"PGPASSWORD={PASSWORD}", "pgbackrest", f"--config={pgbr}/conf", "--stanza=bench", "stanza-create"],
          stdout=subprocess.DEVNULL)


def backlog(cluster):
    """A bulk load; returns the WAL range it wrote."""
    start = cluster.q("select pg_current_wal_lsn()")[0][0]
    say(f"pgbench -i -s {SCALE}")
    cluster.pgbench("-i", "-s", str(SCALE), "-q").wait()
    end = cluster.q("select pg_current_wal_flush_lsn()")[0][0]
    return start, end


def throughput_run(tool):
    cluster = Cluster(f"tp-{tool}")
    try:
        if tool == "ebb":
            repo = ebb_repo("ebb-tp")
            child = start_ebb(cluster, repo)
            wait_slot(cluster, cluster.q("select pg_current_wal_flush_lsn()")[0][0])
            child.terminate()
            child.wait()
        else:
            cluster.q("select pg_create_physical_replication_slot('bench', true)")
        start, end = backlog(cluster)
        # The slot kept the WAL; the shipper starts from where it confirmed.
        start = slot_flush(cluster) or start
        size = lsn_int(end) - lsn_int(start)
        say(f"{tool}: catching up on {size / 1e6:.0f} MB of WAL")
        t0 = time.time()
        child = start_ebb(cluster, repo) if tool == "ebb" else start_receivewal(cluster, os.path.join(WORK, "receivewal-tp"))
        t1 = wait_slot(cluster, end)
        child.terminate()
        child.wait()
        return size, t1 - t0
    finally:
        cluster.stop()


def archive_run(tool):
    cluster = Cluster(f"arch-{tool}", "archive_mode = on\narchive_command = ''\n")
    try:
        if tool == "ebb":
            repo = ebb_repo("ebb-arch")
            os.makedirs(f"{WORK}/ebb-arch-state", exist_ok=True)
            run(["chown", "postgres", f"{WORK}/ebb-arch-state"])
            cmd = (f"{EBB} --repo file://{repo} --key-file {WORK}/ebb.key -q pg archive-push --source bench "
                   f"--state-dir {WORK}/ebb-arch-state %p")
        else:
            pgbr = os.path.join(WORK, "pgbr-arch")
            setup_pgbackrest(cluster, pgbr)
            cmd = f"pgbackrest --config={pgbr}/conf --stanza=bench archive-push %p"
        backlog(cluster)
        last = cluster.q("select pg_walfile_name(pg_current_wal_lsn())")[0][0]
        ready = len([f for f in os.listdir(os.path.join(cluster.data, "pg_wal", "archive_status")) if f.endswith(".ready")])
        say(f"{tool}: archiving {ready} segments")
        t0 = time.time()
        cluster.q(f"alter system set archive_command = '{cmd}'")
        cluster.q("select pg_reload_conf()")
        while True:
            done = cluster.q("select last_archived_wal, failed_count from pg_stat_archiver")[0]
            left = [f for f in os.listdir(os.path.join(cluster.data, "pg_wal", "archive_status")) if f.endswith(".ready")]
            if not left and done[0]:
                break
            if done[1]:
                raise SystemExit(f"{tool}: archive_command failed; see {cluster.dir}/log")
            time.sleep(0.05)
        return ready, time.time() - t0, last
    finally:
        cluster.stop()


def drop_caches():
    """Drops the page cache, as scripts/bench does before every timed run; says if it could not."""
    run(["sync"])
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        say("could not drop the page cache; this run may read from memory")
        return False


def share_with_postgres(repo):
    """The repository readable by the postgres user (restore_command runs as it): group
    postgres, group-readable, directories setgid; ebb keeps what it adds so."""
    run(["chgrp", "-R", "postgres", repo])
    run(["chmod", "-R", "g+rX", repo])
    run(["find", repo, "-type", "d", "-exec", "chmod", "g+s", "{}", "+"])


class Recovered(Cluster):
    """A restored data directory, started on a port of its own and run until promoted."""

    def __init__(self, dir, data):
        self.dir, self.data, self.port = dir, data, free_port()

    def recover(self):
        """Starts PostgreSQL on the data directory and returns once recovery has ended
        (the server promoted); returns (seconds to accepting connections, seconds to promoted)."""
        t0 = time.time()
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = '{self.dir}'\n"
                    f"archive_mode = off\n")
        r = as_pg([f"{PGBIN}/pg_ctl", "-D", self.data, "-l", os.path.join(self.dir, "log"), "-w", "-t", "3600", "start"],
                  stdout=subprocess.DEVNULL, check=False)
        if r.returncode != 0:
            raise SystemExit(f"PostgreSQL did not start on {self.data}; see {self.dir}/log")
        t1 = time.time()
        deadline = t1 + 3600
        while True:
            try:
                if not self.q("select pg_is_in_recovery()")[0][0]:
                    break
            except psycopg.OperationalError:
                pass
            if time.time() > deadline:
                raise SystemExit(f"{self.data}: still in recovery after an hour; see {self.dir}/log")
            time.sleep(0.02)
        return t1 - t0, time.time() - t0

    def stop(self):
        as_pg([f"{PGBIN}/pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop"],
              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


# What a restore must hold: the transactions pgbench committed (each inserts one
# history row with the delta it added to one account, whose balances start at 0).
STATE_SQL = ("select (select count(*) from pgbench_history), (select coalesce(sum(delta), 0) from pgbench_history), "
             "(select sum(abalance) from pgbench_accounts)")


def rto_run():
    pgbr = os.path.join(WORK, "pgbr-rto")
    # Every segment also copied, as it is, into a directory: the floor's WAL.
    walcopy = os.path.join(WORK, "rto-wal")
    os.makedirs(walcopy)
    run(["chown", "postgres:postgres", walcopy])
    conf = (f"archive_mode = on\narchive_command = 'cp %p {walcopy}/%f && "
            f"pgbackrest --config={pgbr}/conf --stanza=bench archive-push %p'\n"
            f"track_commit_timestamp = on\n")
    cluster = Cluster("rto", conf)
    stream = None
    try:
        setup_pgbackrest(cluster, pgbr)
        say(f"rto: pgbench -i -s {SCALE}")
        cluster.pgbench("-i", "-s", str(SCALE), "-q").wait()
        db_bytes = cluster.q("select pg_database_size('postgres')")[0][0]
        repo = ebb_repo("ebb-rto")
        share_with_postgres(repo)
        env = dict(ebb_env(repo), EBB_STATE_DIR=os.path.join(WORK, "rto-state"))
        stream = start_ebb(cluster, repo, env)
        say("rto: ebb pg base-backup")
        t0 = time.time()
        run([EBB, "-q", "pg", "base-backup", "--source", "bench", "--dsn", cluster.dsn()], env=env, stdout=subprocess.DEVNULL)
        ebb_backup = time.time() - t0
        say("rto: pgbackrest backup --type=full")
        t0 = time.time()
        as_pg(["env", f"PGPASSWORD={PASSWORD}", "pgbackrest", f"--config={pgbr}/conf", "--stanza=bench", "--type=full",
               "--start-fast", "backup"], stdout=subprocess.DEVNULL)
        pgbr_backup = time.time() - t0
        # T: the end of the base backups plus the load's duration.
        base = datetime.now(timezone.utc)
        target = base + timedelta(seconds=RTO_SECONDS)
        lsn0 = cluster.q("select pg_current_wal_lsn()")[0][0]
        say(f"rto: pgbench -c 2 -j 2 -T {RTO_SECONDS}; T = {target.isoformat()}")
        cluster.pgbench("-c", "2", "-j", "2", "-T", str(RTO_SECONDS), "-N").wait()
        # A commit after T, so that recovery to T ends on a transaction after it (PostgreSQL
        # refuses to end a recovery whose target it never passed).
        while datetime.now(timezone.utc) <= target:
            time.sleep(0.05)
        cluster.q("create table after_t as select 1 as x")
        lsn1 = cluster.q("select pg_current_wal_lsn()")[0][0]
        n, deltas = cluster.q("select count(*), coalesce(sum(delta), 0) from pgbench_history "
                              "where pg_xact_commit_timestamp(xmin) <= %s", target)[0]
        expected = (n, deltas, deltas)
        total = cluster.q("select count(*) from pgbench_history")[0][0]
        last = cluster.q("select pg_walfile_name(pg_switch_wal())")[0][0]
        flushed = cluster.q("select pg_current_wal_flush_lsn()")[0][0]
        say(f"rto: waiting for both archives to have {last}")
        wait_slot(cluster, flushed, timeout=1800)
        deadline = time.time() + 1800
        while True:
            done = cluster.q("select coalesce(last_archived_wal >= %s, false) from pg_stat_archiver", last)[0][0]
            if done:
                break
            if time.time() > deadline:
                raise SystemExit(f"rto: pgbackrest did not archive {last} in 30 minutes; see {cluster.dir}/log")
            time.sleep(0.1)
        stream.terminate()
        stream.wait()
        stream = None
    finally:
        if stream:
            stream.terminate()
            stream.wait()
        cluster.stop()

    t_ebb = target.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    t_pg = target.strftime("%Y-%m-%d %H:%M:%S.%f+00")
    results = {}
    for tool in ("ebb", "pgbackrest", "floor"):
        dir = os.path.join(WORK, f"rto-{tool}")
        data = os.path.join(dir, "data")
        os.makedirs(data)
        os.chmod(dir, 0o755)
        os.chmod(data, 0o700)
        run(["chown", "-R", "postgres:postgres", dir])
        if tool in ("ebb", "floor"):
            cmd = ["env", f"EBB_REPOSITORY=file://{repo}", EBB, "-q", "--key-file", os.path.join(WORK, "ebb.key"),
                   "pg", "restore", "--at", t_ebb, "--source", "bench", data]
        else:
            cmd = ["pgbackrest", f"--config={pgbr}/conf", "--stanza=bench", f"--pg1-path={data}", "--type=time",
                   f"--target={t_pg}", "--target-action=promote", "restore"]
        cold = drop_caches()
        say(f"rto: {tool}: restore to {t_ebb}, start PostgreSQL, replay, promote")
        t0 = time.time()
        as_pg(cmd, stdout=subprocess.DEVNULL)
        t_files = time.time() - t0
        if tool == "floor":
            # The same recovery with the cheapest WAL source there is: each segment
            # copied from a local directory of plain segments. No tool's replay can
            # be faster; the files' time does not count.
            auto = os.path.join(data, "postgresql.auto.conf")
            with open(auto) as f:
                lines = [ln for ln in f.read().splitlines() if not ln.startswith("restore_command")]
            lines.append(f"restore_command = 'cp {walcopy}/%f %p'")
            with open(auto, "w") as f:
                f.write("\n".join(lines) + "\n")
            drop_caches()
            t_files = 0.0
        server = Recovered(dir, data)
        try:
            t_ready, t_done = server.recover()
            state = server.q(STATE_SQL)[0]
        finally:
            server.stop()
        took = t_files + t_done
        say(f"rto: {tool}: {took:.1f} s (files {t_files:.1f} s, then {t_ready:.1f} s to accepting connections, "
            f"{t_done:.1f} s to promoted)")
        if tuple(state) != tuple(expected):
            raise SystemExit(f"rto: {tool} restored to {t_ebb} holds (transactions, sum of deltas, sum of balances) "
                             f"{tuple(state)}, want {tuple(expected)} (the commits at or before T); see {dir}/log")
        results[tool] = dict(files=t_files, ready=t_files + t_ready, total=took, cold=cold)
        shutil.rmtree(dir)
    return dict(results=results, expected=expected, total=total, target=t_ebb, db_bytes=db_bytes,
                wal_bytes=lsn_int(str(lsn1)) - lsn_int(str(lsn0)), backups=(ebb_backup, pgbr_backup))


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    lags = {t: lag_run(t) for t in ("ebb", "pg_receivewal", "pgbackrest")} if "lag" in PARTS else None
    tps = {t: throughput_run(t) for t in ("ebb", "pg_receivewal")} if "throughput" in PARTS else None
    arch = {t: archive_run(t) for t in ("ebb", "pgbackrest")} if "archive" in PARTS else None
    rto = rto_run() if "rto" in PARTS else None
    cores = os.cpu_count()
    print(f"\nbench pg — {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {cores} cores, PostgreSQL 15")
    if lags:
        print(f"\n1. lag from commit to durable, under pgbench -c 2 -R 400 for {SECONDS} s, a marker every 250 ms, ms")
        print(f"   {'':32} {'p50':>8} {'p99':>8} {'max':>8} {'probes':>7}")
        for t, name in (("ebb", "ebb stream pg (file://)"), ("pg_receivewal", "pg_receivewal --synchronous"),
                        ("pgbackrest", "pgbackrest archive-push async")):
            xs = lags[t]
            print(f"   {name:32} {pct(xs, 50) * 1e3:8.0f} {pct(xs, 99) * 1e3:8.0f} {max(xs) * 1e3:8.0f} {len(xs):7}")
        print(f"   target: ebb p99 at most 1000 ms: {'met' if pct(lags['ebb'], 99) <= 1.0 else 'NOT met'}")
        print(f"   ratio p99 (pgbackrest / ebb): {pct(lags['pgbackrest'], 99) / pct(lags['ebb'], 99):.1f}")
    if tps:
        print(f"\n2. WAL throughput: catching up on the WAL of pgbench -i -s {SCALE}, MB/s")
        for t, name in (("ebb", "ebb stream pg (zstd + AES-256-GCM, file://)"),
                        ("pg_receivewal", "pg_receivewal --synchronous")):
            size, secs = tps[t]
            print(f"   {name:48} {size / secs / 1e6:8.1f}  ({size / 1e6:.0f} MB in {secs:.1f} s)")
        rate = tps["ebb"][0] / tps["ebb"][1] / 1e6
        print(f"   target: ebb at least 100 MB/s: {'met' if rate >= 100 else 'NOT met'} ({rate:.0f} MB/s)")
    if arch:
        print(f"\n3. archive_command on a backlog of full segments (pgbench -i -s {SCALE}), segments per second")
        for t, name in (("ebb", "ebb pg archive-push (zstd + AES-256-GCM)"),
                        ("pgbackrest", "pgbackrest archive-push async (zst, aes-256-cbc, process-max 2)")):
            n, secs, _ = arch[t]
            print(f"   {name:66} {n / secs:8.1f}  ({n} in {secs:.1f} s)")
        ratio = (arch["ebb"][0] / arch["ebb"][1]) / (arch["pgbackrest"][0] / arch["pgbackrest"][1])
        print(f"   ratio (ebb / pgbackrest): {ratio:.2f}; target at least 2: {'met' if ratio >= 2 else 'NOT met'}")
    if rto:
        r, (n, deltas, _) = rto["results"], rto["expected"]
        print(f"\n4. RTO: restore to T and recover, from a cold page cache, s"
              f"{'' if all(x['cold'] for x in r.values()) else ' (page cache NOT dropped: runs may be warm)'}")
        print(f"   data: pgbench -i -s {SCALE} ({rto['db_bytes'] / 1e6:.0f} MB), base backups (ebb {rto['backups'][0]:.1f} s, "
              f"pgbackrest {rto['backups'][1]:.1f} s), then pgbench -N -c 2 for {RTO_SECONDS} s:")
        print(f"   {rto['wal_bytes'] / 1e6:.0f} MB of WAL; T = {rto['target']} (base backups + {RTO_SECONDS} s), "
              f"{n} of {rto['total']} transactions committed by T")
        print(f"   WAL shipped by ebb stream pg (file://) and pgbackrest archive-push (async, zst, aes-256-cbc, process-max 2)")
        print(f"   {'':44} {'files':>8} {'accepting':>10} {'promoted':>9}")
        for t, name in (("ebb", "ebb pg restore --at T + recovery"),
                        ("pgbackrest", "pgbackrest restore --type=time + recovery"),
                        ("floor", "floor: recovery alone, restore_command = cp")):
            print(f"   {name:44} {r[t]['files']:8.1f} {r[t]['ready']:10.1f} {r[t]['total']:9.1f}")
        print(f"   (files: the restore command; accepting: PostgreSQL started and consistent; promoted: recovery ended;")
        print(f"   floor: the files in place and not counted, the WAL as plain segments in a local directory,")
        print(f"   copied by cp: the replay no tool can beat, as PostgreSQL replays alone)")
        print(f"   both hold exactly the {n} transactions committed by T (sum of deltas {deltas}, the same in balances)")
        x = r["pgbackrest"]["total"] / r["ebb"]["total"]
        how = f"{x:.1f}× faster" if x >= 1 else f"{x:.1f}× faster, i.e. {1 / x:.1f}× slower"
        print(f"   ebb RTO vs pgbackrest: {how} (target ≥ 2×: {'met' if x >= 2 else 'NOT met'})")
        best = r["pgbackrest"]["total"] / r["floor"]["total"]
        print(f"   the most any tool could gain on pgbackrest here: {best:.2f}× (its time / the floor's); "
              f"ebb is {r['ebb']['total'] - r['floor']['total']:.1f} s above the floor")


if __name__ == "__main__":
    main()
