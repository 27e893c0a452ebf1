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
4. Recovery: one cluster archives to both ebb and pgbackrest, each takes a base
   backup, pgbench runs for EBB_BENCH_PG_RECOVERY_SECONDS (default 300); then the
   time from `ebb pg restore --at T` (or `pgbackrest restore --type=time`) to the
   restored server having replayed to T, the end of the load, and promoted.
   EBB_BENCH_PG_BASELINE_EBB names another ebb build to time on the same data.

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

import psycopg

EBB, PGBIN, WORK = sys.argv[1], sys.argv[2], sys.argv[3]
SECONDS = int(os.environ.get("EBB_BENCH_SECONDS", "30"))
SCALE = int(os.environ.get("EBB_BENCH_PG_SCALE", "100"))
PARTS = os.environ.get("EBB_BENCH_PG_PARTS", "lag,throughput,archive,recovery").split(",")
RECOVERY_SECONDS = int(os.environ.get("EBB_BENCH_PG_RECOVERY_SECONDS", "300"))
BASELINE = os.environ.get("EBB_BENCH_PG_BASELINE_EBB")
PASSWORD = "bench"


def say(*a):
    print("==>", *a, file=sys.stderr, flush=True)


def run(cmd, **kw):
    return subprocess.run(cmd, check=True, **kw)


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


def start_ebb(cluster, repo):
    return subprocess.Popen([EBB, "stream", "pg", "--source", "bench", "--dsn", cluster.dsn(), "--slot", "bench"],
                            env=ebb_env(repo), stdout=subprocess.DEVNULL,
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
        f.write(f"[global]\nrepo1-path={pgbr}/repo\nrepo1-cipher-type=aes-256-cbc\nrepo1-cipher-pass=bench\n"
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


def recovery_run():
    """Returns {tool: (seconds from the restore command to the server promoted at T, rows)}."""
    pgbr = os.path.join(WORK, "pgbr-rec")
    repo = ebb_repo("ebb-rec")
    state = os.path.join(WORK, "ebb-rec-state")
    os.makedirs(state, exist_ok=True)
    run(["chown", "postgres", state])
    cluster = Cluster("rec", "archive_mode = on\narchive_command = ''\n")
    try:
        setup_pgbackrest(cluster, pgbr)
        push = (f"{EBB} --repo file://{repo} --key-file {WORK}/ebb.key -q pg archive-push --source bench "
                f"--state-dir {state} %p && pgbackrest --config={pgbr}/conf --stanza=bench archive-push %p")
        cluster.q(f"alter system set archive_command = '{push}'")
        cluster.q("select pg_reload_conf()")
        say("recovery: pgbench -i -s 20, base backups")
        cluster.pgbench("-i", "-s", "20", "-q").wait()
        run([EBB, "pg", "base-backup", "--source", "bench", "--dsn", cluster.dsn()], env=ebb_env(repo),
            stdout=subprocess.DEVNULL)
        as_pg(["env", f"PGPASSWORD={PASSWORD}", "pgbackrest", f"--config={pgbr}/conf", "--stanza=bench",
               "--type=full", "backup"], stdout=subprocess.DEVNULL)
        say(f"recovery: pgbench -c 2 -R 500 for {RECOVERY_SECONDS} s")
        cluster.pgbench("-c", "2", "-j", "2", "-T", str(RECOVERY_SECONDS), "-R", "500", "-N").wait()
        at = cluster.q("select to_char(now() at time zone 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')")[0][0]
        rows = cluster.q("select count(*) from pgbench_history")[0][0]
        # A transaction after T: pgbackrest, unlike ebb, sets a target recovery must pass.
        cluster.q("create table after_t as select 1")
        last = cluster.q("select pg_walfile_name(pg_switch_wal())")[0][0]
        wal = cluster.q("select pg_current_wal_lsn() - '0/0'::pg_lsn")[0][0]
        while (cluster.q("select last_archived_wal from pg_stat_archiver")[0][0] or "") < last:
            time.sleep(0.2)
    finally:
        cluster.stop()
    # The restores run as postgres, as restore_command does.
    run(["chown", "-R", "postgres", repo])
    say(f"recovery: restoring to {at} ({rows} rows in pgbench_history, {int(wal) / 1e6:.0f} MB of WAL in all)")
    out = {}
    tools = [("ebb", EBB)] + ([("baseline", BASELINE)] if BASELINE else []) + [("pgbackrest", None)]
    for tool, exe in tools:
        d = os.path.join(WORK, f"rec-{tool}")
        data = os.path.join(d, "data")
        os.makedirs(data, mode=0o700)
        run(["chown", "-R", "postgres:postgres", d])
        os.chmod(d, 0o755)
        if exe:
            copy = os.path.join(WORK, f"ebb-{tool}")
            shutil.copy(exe, copy)
        t0 = time.time()
        if exe:
            run(["runuser", "-u", "postgres", "--", "env", f"EBB_REPOSITORY=file://{repo}",
                 f"EBB_KEY_FILE={WORK}/ebb.key", copy, "-q", "pg", "restore", "--at", at, "--source", "bench", data],
                stdout=subprocess.DEVNULL)
        else:
            pg_at = at.replace("T", " ").replace("Z", "+00")
            as_pg(["pgbackrest", f"--config={pgbr}/conf", "--stanza=bench", f"--pg1-path={data}", "--type=time",
                   f"--target={pg_at}", "--target-action=promote", "restore"], stdout=subprocess.DEVNULL)
        port = free_port()
        with open(os.path.join(data, "postgresql.conf"), "a") as f:
            f.write(f"\nport = {port}\nunix_socket_directories = '{d}'\narchive_mode = off\n")
        as_pg([f"{PGBIN}/pg_ctl", "-D", data, "-l", os.path.join(d, "log"), "-w", "-t", "3600", "start"],
              stdout=subprocess.DEVNULL)
        dsn = f"host=127.0.0.1 port={port} user=postgres dbname=postgres password={PASSWORD}"
        while True:
            try:
                with psycopg.connect(dsn, autocommit=True) as c:
                    if not c.execute("select pg_is_in_recovery()").fetchone()[0]:
                        got = c.execute("select count(*) from pgbench_history").fetchone()[0]
                        break
            except psycopg.OperationalError:
                alive = subprocess.run(["runuser", "-u", "postgres", "--", f"{PGBIN}/pg_ctl", "-D", data, "status"],
                                       stdout=subprocess.DEVNULL).returncode == 0
                if not alive:
                    raise SystemExit(f"recovery: the server {tool} restored stopped; see {d}/log")
            time.sleep(0.02)
        out[tool] = (time.time() - t0, got)
        say(f"recovery: {tool}: {out[tool][0]:.1f} s, {got} rows")
        as_pg([f"{PGBIN}/pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"], stdout=subprocess.DEVNULL)
        shutil.rmtree(d)
    return out, rows


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    lags = {t: lag_run(t) for t in ("ebb", "pg_receivewal", "pgbackrest")} if "lag" in PARTS else None
    tps = {t: throughput_run(t) for t in ("ebb", "pg_receivewal")} if "throughput" in PARTS else None
    arch = {t: archive_run(t) for t in ("ebb", "pgbackrest")} if "archive" in PARTS else None
    rec = recovery_run() if "recovery" in PARTS else None
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
    if rec:
        times, rows = rec
        print(f"\n4. recovery: restore, start and replay to T = {RECOVERY_SECONDS} s of pgbench -R 500 after the base "
              f"backup, until promoted, s")
        for t, name in (("ebb", "ebb pg restore (archive-get --prefetch 8)"), ("baseline", f"ebb {BASELINE}"),
                        ("pgbackrest", "pgbackrest restore (archive-get async, process-max 2)")):
            if t in times:
                secs, got = times[t]
                print(f"   {name:66} {secs:8.1f}  ({got} rows{'' if got == rows else f', NOT the {rows} at T'})")
        ratio = times["pgbackrest"][0] / times["ebb"][0]
        print(f"   ratio (pgbackrest / ebb): {ratio:.2f}; target at least 2: {'met' if ratio >= 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
