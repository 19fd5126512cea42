"""The local stack launcher: PostgreSQL, MariaDB, Kafka (KRaft), Apicurio Registry and Kafka Connect, run from packages.

Layout of the state directory (`$CDC_HOME`, default `./.cdc`):

    stack.json            ports and artifact directory of the running stack (read by `status` and `down`)
    logs/<component>.log  everything each process prints
    postgres/             the private PostgreSQL cluster (run as the `postgres` system user when we are root)
    mariadb/              the private MariaDB server: data/, its pid file and socket (run as `mysql` when we are root)
    kafka/                server.properties, cluster id and the KRaft log directories
    registry/             Apicurio's working directory (its schemas live in the `registry` database)
    connect/              worker.properties of the Kafka Connect distributed worker
    secrets/<connector>/  one file per connector secret (`cdc connectors apply`), read by Connect's config provider

Everything the launcher writes there is its owner's only (files 0600, directories 0700); the state directory itself
is 0711 when it holds the database servers' directories, whose system users must be able to reach them.

The Java artifacts are laid out by Maven (`infra/pom.xml`) under `infra/target/stack` (or `$CDC_STACK_ARTIFACTS`);
they are not state, and several state directories can share them.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cdc.errors import StackError

INFRA_DIR = Path(__file__).resolve().parent
TEMPLATES = INFRA_DIR / "templates"

# The local stack's database superuser. The stack listens on 127.0.0.1 only; this is a development stack.
PG_USER = "cdc"
PG_PASSWORD = "cdc"
# The second destination dialect's server gets the same kind of account, with every privilege (databases included).
MARIADB_USER = "cdc"
MARIADB_PASSWORD = "cdc"
# The environment variable that gives the schema registry its database password (see _start_registry).
REGISTRY_PASSWORD_ENV = "APICURIO_DATASOURCE_PASSWORD"

DEFAULT_PORTS = {
    "postgres": 5432,
    # 3307, not MariaDB's usual 3306, so that a system MariaDB on the machine is no obstacle.
    "mariadb": 3307,
    "kafka": 9092,
    "kafka_controller": 9093,
    # The SASL_PLAINTEXT + SCRAM-SHA-256 listener the sites' links use (each site a user of its own, ACLs per site).
    "kafka_sasl": 9094,
    "schema_registry": 8081,
    "schema_registry_management": 8091,
    "connect": 8083,
}
PORT_ENV = {name: f"CDC_{name.upper()}_PORT" for name in DEFAULT_PORTS}
COMPONENTS = ("postgres", "mariadb", "kafka", "schema_registry", "connect")
JAVA_COMPONENTS = ("kafka", "schema_registry", "connect")
# Which ports each component binds; all are checked before anything starts.
COMPONENT_PORTS = {
    "postgres": ("postgres",),
    "mariadb": ("mariadb",),
    "kafka": ("kafka", "kafka_controller", "kafka_sasl"),
    "schema_registry": ("schema_registry", "schema_registry_management"),
    "connect": ("connect",),
}
START_TIMEOUT = {"postgres": 60.0, "mariadb": 60.0, "kafka": 90.0, "schema_registry": 120.0, "connect": 150.0}
MIN_FREE_DISK = 1 << 30


def state_home() -> Path:
    return Path(os.environ.get("CDC_HOME") or Path.cwd() / ".cdc").resolve()


def secrets_dir(home: Path | None = None) -> Path:
    """Where `cdc connectors apply` stores connector secrets, one directory per connector, owner-only, for the Kafka
    Connect worker's DirectoryConfigProvider (the only directory the worker lets it read)."""
    return (home or state_home()) / "secrets"


def artifacts_dir() -> Path:
    return Path(os.environ.get("CDC_STACK_ARTIFACTS") or INFRA_DIR / "target" / "stack").resolve()


@dataclass(frozen=True)
class StackLayout:
    """Where a stack keeps its state, where its Java parts are, and which ports it binds."""

    home: Path
    artifacts: Path
    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))

    @classmethod
    def resolve(cls) -> StackLayout:
        """The recorded layout of a stack that was started here, else one built from the environment."""
        home = state_home()
        recorded = home / "stack.json"
        if recorded.exists():
            data = json.loads(recorded.read_text())
            # A component added to the launcher after this stack was started takes its port from the environment.
            added = [name for name in DEFAULT_PORTS if name not in data["ports"]]
            layout = cls(home, Path(data["artifacts"]), {**DEFAULT_PORTS, **_env_ports(added), **data["ports"]})
            if any(component_pid(layout, name) for name in COMPONENTS):
                return layout
        return cls(home, artifacts_dir(), {**DEFAULT_PORTS, **_env_ports(list(DEFAULT_PORTS))})

    def log(self, component: str) -> Path:
        return self.home / "logs" / f"{component}.log"

    def pidfile(self, component: str) -> Path:
        return self.home / "run" / f"{component}.pid"

    @property
    def kafka_bootstrap(self) -> str:
        return f"127.0.0.1:{self.ports['kafka']}"

    @property
    def kafka_sasl_bootstrap(self) -> str:
        """The authenticated listener (SASL_PLAINTEXT, SCRAM-SHA-256): no user of its own, each site has one."""
        return f"127.0.0.1:{self.ports['kafka_sasl']}"

    def urls(self) -> dict[str, str]:
        p = self.ports
        return {
            "postgres": f"postgresql://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{p['postgres']}/postgres",
            "mariadb": self.mariadb_url(),
            "kafka": f"kafka://127.0.0.1:{p['kafka']}",
            "schema_registry": f"http://127.0.0.1:{p['schema_registry']}/apis/ccompat/v7",
            "connect": f"http://127.0.0.1:{p['connect']}",
        }

    def masked_urls(self) -> dict[str, str]:
        """The endpoints for printing: passwords replaced by `***` (as cdc.config.masked_url writes them)."""
        return {name: mask_url(url) for name, url in self.urls().items()}

    def postgres_url(self, database: str = "postgres", driver: str = "") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{PG_USER}:{PG_PASSWORD}@127.0.0.1:{self.ports['postgres']}/{database}"

    def mariadb_url(self, database: str = "") -> str:
        """A SQLAlchemy URL of the stack's MariaDB; without a database, the connection has no default database."""
        return f"mysql+pymysql://{MARIADB_USER}:{MARIADB_PASSWORD}@127.0.0.1:{self.ports['mariadb']}/{database}"


def mask_url(url: str) -> str:
    """A URL with the password of its user part replaced by `***`."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^/]*@", r"\1:***@", url)


def _env_ports(names: list[str]) -> dict[str, int]:
    ports = {}
    for name in names:
        var = PORT_ENV[name]
        if os.environ.get(var):
            try:
                ports[name] = int(os.environ[var])
            except ValueError:
                raise StackError(name, f"{var}={os.environ[var]!r} is not a port number") from None
    return ports


# ---------------------------------------------------------------------------------------------------------------
# process bookkeeping


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours is not running any more.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def component_pid(layout: StackLayout, component: str) -> int | None:
    """The pid of this stack's process for a component, or None; a pid reused by another program is not ours."""
    if component == "postgres":
        pidfile = _pg_data(layout) / "postmaster.pid"
        marker = str(_pg_data(layout))
    elif component == "mariadb":
        # The server's own pid file: the launcher's pid file names the runuser wrapper, which must not be signalled.
        pidfile = _mariadb_root(layout) / "mariadbd.pid"
        marker = str(_mariadb_data(layout))
    else:
        pidfile = layout.pidfile(component)
        marker = str(layout.home)
    try:
        pid = int(pidfile.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    if _alive(pid) and marker in _cmdline(pid):
        return pid
    return None


def _log_tail(path: Path, lines: int = 25) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError:
        return "(no log written)"
    return "\n".join(text.splitlines()[-lines:])


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


# Components `up` restarts when they stay unhealthy while running (their state lives in PostgreSQL or Kafka), and
# how long it gives one to recover by itself first (after its database or broker came back).
RESTARTABLE = ("schema_registry", "connect")
RECOVER_S = 30.0


def _recovers(layout: StackLayout, component: str) -> bool:
    deadline = time.monotonic() + RECOVER_S
    while not HEALTH[component](layout):
        if time.monotonic() > deadline:
            return False
        time.sleep(1)
    return True


def _wait(component: str, layout: StackLayout, check: Callable[[], bool], pid: int | None, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        if pid is not None and not _alive(pid):
            raise StackError(component, "the process exited during start-up", log_tail=_log_tail(layout.log(component)))
        time.sleep(0.5)
    raise StackError(
        component, f"not healthy after {timeout:.0f} s", log_tail=_log_tail(layout.log(component))
    )


def _spawn(layout: StackLayout, component: str, argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> int:
    layout.log(component).parent.mkdir(parents=True, exist_ok=True)
    layout.pidfile(component).parent.mkdir(parents=True, exist_ok=True)
    with open(layout.log(component), "ab") as log:
        log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            env=None if env is None else {**os.environ, **env},
        )
    layout.pidfile(component).write_text(f"{proc.pid}\n")
    return proc.pid


def _stop_pid(pid: int, timeout: float = 30.0) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# prerequisites


def find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    candidate = Path(java_home) / "bin" / "java" if java_home else None
    java = str(candidate) if candidate and candidate.exists() else shutil.which("java")
    if not java:
        raise StackError(
            "kafka",
            "Java was not found (no `java` on PATH and no JAVA_HOME); Kafka, Kafka Connect and the schema "
            "registry need OpenJDK 17 or newer",
            hint="Install it (apt-get install openjdk-17-jre-headless) or put it on PATH.",
        )
    out = subprocess.run([java, "-version"], capture_output=True, text=True).stderr
    try:
        major = int(out.split('"')[1].split(".")[0])
    except (IndexError, ValueError):
        major = 0
    if major < 17:
        raise StackError("kafka", f"{java} is Java {major or 'of unknown version'}; Kafka 4 needs Java 17 or newer")
    return java


def pg_bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl:
        return Path(pg_ctl).resolve().parent
    raise StackError(
        "postgres",
        "the PostgreSQL server is not installed",
        hint="Run `make setup` (it installs Debian's `postgresql` package).",
    )


def ensure_artifacts(layout: StackLayout, echo: Callable[[str], None]) -> None:
    """Lay out the Java parts with Maven unless the same pom files already produced them."""
    poms = sorted(INFRA_DIR.glob("pom.xml")) + sorted(INFRA_DIR.glob("maven/*/pom.xml"))
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in poms)).hexdigest()
    stamp = layout.artifacts / ".built"
    if stamp.exists() and stamp.read_text().strip() == digest:
        return
    mvn = shutil.which("mvn")
    if not mvn:
        raise StackError("artifacts", "Maven (mvn) was not found on PATH; it resolves Kafka, Debezium and Apicurio")
    echo(f"artifacts: resolving Kafka, Debezium and Apicurio with Maven into {layout.artifacts} (first run: minutes)")
    layout.artifacts.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [mvn, "-B", "-q", "-f", str(INFRA_DIR / "pom.xml"), f"-Dstack.dir={layout.artifacts}", "package"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-25:])
        raise StackError("artifacts", "Maven could not resolve the stack's Java artifacts", log_tail=tail)
    stamp.write_text(digest + "\n")


def _transform_sources() -> tuple[list[Path], str]:
    sources = sorted(p for p in (INFRA_DIR / "transforms" / "src").rglob("*") if p.is_file())
    return sources, hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()


def transforms_current(layout: StackLayout) -> bool:
    """Whether the plugin path holds the transforms of this checkout (a running Connect may predate them)."""
    stamp = layout.artifacts / "plugins" / "cdc-transforms" / ".built"
    return stamp.exists() and stamp.read_text().strip() == _transform_sources()[1]


def ensure_transforms(layout: StackLayout, java: str, echo: Callable[[str], None]) -> None:
    """Build the project's own Kafka Connect transforms (infra/transforms) into the plugin path.

    Connect's own transforms all keep a field's optionality; a hierarchy whose member's root-id column is nullable
    needs its key field optional for the root too (producers/debezium.py). Connect loads it when it starts."""
    import zipfile

    if transforms_current(layout):
        return
    sources, digest = _transform_sources()
    target = layout.artifacts / "plugins" / "cdc-transforms"
    stamp = target / ".built"
    javac = next((str(c) for c in (Path(java).resolve().parent / "javac", shutil.which("javac")) if c and
                  Path(c).exists()), None)
    if javac is None:
        raise StackError("connect", "javac (a JDK) is needed to build the project's Kafka Connect transform",
                         hint="Install it (apt-get install openjdk-17-jdk-headless); `make setup` does.")
    echo("artifacts: building the project's Kafka Connect transform")
    classes = layout.home / "transforms-build"
    shutil.rmtree(classes, ignore_errors=True)
    classes.mkdir(parents=True)
    proc = subprocess.run([javac, "--release", "17", "-cp", f"{layout.artifacts / 'kafka' / 'libs'}/*", "-d",
                           str(classes), *(str(p) for p in sources if p.suffix == ".java")],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise StackError("connect", "the project's Kafka Connect transform did not compile",
                         log_tail=proc.stdout + proc.stderr)
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(target / "cdc-transforms.jar", "w") as jar:
        for path in sorted(classes.rglob("*.class")):
            jar.write(path, path.relative_to(classes).as_posix())
        for path in sources:
            if "META-INF" in path.parts:
                jar.write(path, path.relative_to(INFRA_DIR / "transforms" / "src").as_posix())
    shutil.rmtree(classes, ignore_errors=True)
    stamp.write_text(digest + "\n")


# ---------------------------------------------------------------------------------------------------------------
# PostgreSQL


def _as_user(user: str, argv: list[str]) -> list[str]:
    """Database servers refuse to run as root (or should not), so root runs their programs as their system user."""
    if os.geteuid() != 0:
        return argv
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    return [runuser, "-u", user, "--", *argv]


def _server_root(layout: StackLayout, component: str) -> Path:
    """The directory holding a database server's files: inside the state directory when its user can reach it.

    A state directory below a private directory (a home directory with mode 700, say) is out of that user's
    reach; the files then live in /var/tmp, and the state directory keeps a symbolic link to them.
    """
    link = layout.home / component
    if link.is_symlink():
        return link.resolve()
    return link


def _user_can_reach(user: str, path: Path) -> bool:
    if os.geteuid() != 0:
        return True
    return subprocess.run(_as_user(user, ["test", "-w", str(path)]), capture_output=True).returncode == 0


def _prepare_server_root(layout: StackLayout, component: str, user: str) -> Path:
    root = _server_root(layout, component)
    if not root.exists():
        root.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(root, user, user)
            if not _user_can_reach(user, root):
                root.rmdir()
                digest = hashlib.sha1(str(layout.home).encode()).hexdigest()[:12]
                outside = Path("/var/tmp") / f"cdc-{component}-{digest}"
                outside.mkdir(parents=True, exist_ok=True)
                shutil.chown(outside, user, user)
                (layout.home / component).symlink_to(outside)
                root = outside
    return root


def _pg_root(layout: StackLayout) -> Path:
    return _server_root(layout, "postgres")


def _pg_data(layout: StackLayout) -> Path:
    return _pg_root(layout) / "data"


def _prepare_postgres(layout: StackLayout, bindir: Path) -> None:
    root = _prepare_server_root(layout, "postgres", "postgres")
    data = root / "data"
    log = root / "postgres.log"
    layout.log("postgres").parent.mkdir(parents=True, exist_ok=True)
    if not layout.log("postgres").exists() and not layout.log("postgres").is_symlink():
        layout.log("postgres").symlink_to(log)
    if (data / "PG_VERSION").exists():
        return
    pwfile = root / "pwfile"
    _write_private(pwfile, PG_PASSWORD + "\n")  # owner-only from its creation, until initdb has read it
    if os.geteuid() == 0:
        shutil.chown(pwfile, "postgres", "postgres")
    proc = subprocess.run(
        _as_user("postgres", [
            str(bindir / "initdb"), "-D", str(data), "-U", PG_USER, f"--pwfile={pwfile}", "-E", "UTF8",
            "--locale=C", "--auth-host=scram-sha-256", "--auth-local=peer",
        ]),
        capture_output=True,
        text=True,
    )
    pwfile.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise StackError("postgres", "initdb failed", log_tail=proc.stdout + proc.stderr)
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(
            "\n# written by cdc stack up\n"
            "listen_addresses = '127.0.0.1'\n"
            "unix_socket_directories = ''\n"
            "wal_level = logical\n"
            "max_wal_senders = 20\n"
            "max_replication_slots = 20\n"
            "max_connections = 300\n"
            "shared_buffers = 256MB\n"
            "synchronous_commit = on\n"
            "logging_collector = off\n"
        )


def _start_postgres(layout: StackLayout, bindir: Path) -> None:
    _prepare_postgres(layout, bindir)
    data = _pg_data(layout)
    proc = subprocess.run(
        _as_user("postgres", [
            str(bindir / "pg_ctl"), "-D", str(data), "-l", str(_pg_root(layout) / "postgres.log"),
            "-o", f"-p {layout.ports['postgres']}", "-w", "-t", str(int(START_TIMEOUT["postgres"])), "start",
        ]),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise StackError(
            "postgres", "pg_ctl could not start the server", log_tail=_log_tail(_pg_root(layout) / "postgres.log")
        )
    _wait("postgres", layout, lambda: _postgres_healthy(layout), None, START_TIMEOUT["postgres"])
    _ensure_database(layout, "registry")


def _postgres_healthy(layout: StackLayout) -> bool:
    import psycopg

    try:
        with psycopg.connect(layout.postgres_url(), connect_timeout=2) as conn:
            conn.execute("select 1")
        return True
    except psycopg.Error:
        return False


def _ensure_database(layout: StackLayout, name: str) -> None:
    import psycopg

    with psycopg.connect(layout.postgres_url(), autocommit=True) as conn:
        if not conn.execute("select 1 from pg_database where datname = %s", (name,)).fetchone():
            conn.execute(f'create database "{name}"')


def _stop_postgres(layout: StackLayout) -> None:
    data = _pg_data(layout)
    if component_pid(layout, "postgres") is None:
        return
    subprocess.run(
        _as_user("postgres", [str(pg_bindir() / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop"]),
        capture_output=True,
    )


# ---------------------------------------------------------------------------------------------------------------
# MariaDB


def mariadb_programs() -> tuple[str, str]:
    """The server and the data-directory initialiser of Debian's `mariadb-server` package."""
    server = shutil.which("mariadbd") or next(
        (p for p in ("/usr/sbin/mariadbd", "/usr/sbin/mysqld") if os.access(p, os.X_OK)), None)
    install_db = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db") or next(
        (p for p in ("/usr/bin/mariadb-install-db", "/usr/bin/mysql_install_db") if os.access(p, os.X_OK)), None)
    if not server or not install_db:
        raise StackError(
            "mariadb",
            "the MariaDB server is not installed",
            hint="Run `make setup` (it installs Debian's `mariadb-server` package).",
        )
    if os.geteuid() == 0:
        import pwd

        try:
            pwd.getpwnam("mysql")
        except KeyError:
            raise StackError("mariadb", "there is no `mysql` system user to run the server as",
                             hint="Reinstall Debian's `mariadb-server` package; it creates that user.") from None
    return server, install_db


def _mariadb_root(layout: StackLayout) -> Path:
    return _server_root(layout, "mariadb")


def _mariadb_data(layout: StackLayout) -> Path:
    return _mariadb_root(layout) / "data"


def _mariadb_socket(root: Path) -> Path:
    # A Unix socket path may not exceed 107 bytes and mariadbd will not start without one; a deep state
    # directory gets its socket in /tmp instead.
    socket_path = root / "mariadbd.sock"
    if len(str(socket_path)) <= 100:
        return socket_path
    return Path("/tmp") / f"cdc-mariadb-{hashlib.sha1(str(root).encode()).hexdigest()[:12]}.sock"


def _prepare_mariadb(layout: StackLayout, install_db: str) -> Path:
    root = _prepare_server_root(layout, "mariadb", "mysql")
    data = root / "data"
    # Written after mariadb-install-db succeeded: a data directory without it is a half-made one.
    initialised = root / ".initialised"
    if not initialised.exists():
        if data.exists():
            shutil.rmtree(data)
        argv = [install_db, "--no-defaults", f"--datadir={data}", "--auth-root-authentication-method=socket",
                "--skip-test-db"]
        if os.geteuid() == 0:
            argv.insert(2, "--user=mysql")
        proc = subprocess.run(_as_user("mysql", argv), capture_output=True, text=True, cwd=root)
        if proc.returncode != 0:
            raise StackError("mariadb", "mariadb-install-db failed", log_tail=proc.stdout + proc.stderr)
        initialised.write_text("")
    # Run by the server at every start, before it accepts connections; idempotent, so a dropped account comes back.
    init = root / "init.sql"
    account = [f"'{MARIADB_USER}'@'{host}'" for host in ("127.0.0.1", "localhost")]
    init.write_text("".join(
        f"CREATE USER IF NOT EXISTS {a} IDENTIFIED BY '{MARIADB_PASSWORD}';\n"
        f"GRANT ALL PRIVILEGES ON *.* TO {a} WITH GRANT OPTION;\n" for a in account))
    init.chmod(0o600)
    if os.geteuid() == 0:
        shutil.chown(init, "mysql", "mysql")
    return root


def _start_mariadb(layout: StackLayout, programs: tuple[str, str]) -> int:
    server, install_db = programs
    root = _prepare_mariadb(layout, install_db)
    argv = [
        # --no-defaults first: Debian's /etc/mysql configuration belongs to the system service, not to us.
        server, "--no-defaults", f"--datadir={root / 'data'}", f"--socket={_mariadb_socket(root)}",
        f"--pid-file={root / 'mariadbd.pid'}", f"--port={layout.ports['mariadb']}", "--bind-address=127.0.0.1",
        # Accounts are matched on the address 127.0.0.1, never on a name a resolver may or may not give it.
        "--skip-name-resolve",
        # Byte-wise comparison without trailing-space padding, like the stack's PostgreSQL (locale C).
        "--character-set-server=utf8mb4", "--collation-server=utf8mb4_nopad_bin",
        "--default-time-zone=+00:00", "--max-connections=300", f"--init-file={root / 'init.sql'}",
    ]
    return _spawn(layout, "mariadb", _as_user("mysql", argv), root)


def _mariadb_healthy(layout: StackLayout) -> bool:
    import pymysql

    try:
        conn = pymysql.connect(host="127.0.0.1", port=layout.ports["mariadb"], user=MARIADB_USER,
                               password=MARIADB_PASSWORD, connect_timeout=2)
    except (pymysql.MySQLError, OSError):
        return False
    try:
        with conn.cursor() as cursor:
            cursor.execute("select 1")
            return cursor.fetchone() == (1,)
    except (pymysql.MySQLError, OSError):
        return False
    finally:
        conn.close()


def _stop_mariadb(layout: StackLayout, timeout: float = 60.0) -> None:
    pid = component_pid(layout, "mariadb")
    if pid is not None:
        # Only the server itself: runuser, its parent, answers a signal by killing the server two seconds later,
        # which could cut a clean shutdown short. It exits on its own once the server has.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    layout.pidfile("mariadb").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# Kafka, the schema registry and Kafka Connect


def _rendered(template: str, values: dict[str, object]) -> str:
    text = (TEMPLATES / template).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    return text


def _render(template: str, target: Path, values: dict[str, object]) -> None:
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(target, _rendered(template, values))


def _write_private(path: Path, text: str) -> None:
    """Write a state file readable by its owner only (0600 from its creation)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def protect_state(layout: StackLayout) -> None:
    """Make the launcher's own state its owner's only: stack.json and rendered configurations 0600, its directories
    0700. The database servers' directories belong to their system users and are left as they are; the state
    directory stays reachable (0711, not listable) for those users when it holds them."""
    home = layout.home
    servers_inside = any((home / name).exists() and not (home / name).is_symlink() for name in ("postgres", "mariadb"))
    os.chmod(home, 0o711 if servers_inside and os.geteuid() == 0 else 0o700)
    for name in ("connect", "kafka", "registry", "logs", "run", "secrets", "transforms-build"):
        if (home / name).is_dir() and not (home / name).is_symlink():
            os.chmod(home / name, 0o700)
    for path in (home / "stack.json", home / "connect" / "worker.properties", home / "kafka" / "server.properties"):
        if path.is_file():
            os.chmod(path, 0o600)


def _java_opts(heap_mb: int) -> list[str]:
    return [
        f"-Xms{min(heap_mb, 256)}m", f"-Xmx{heap_mb}m", "-XX:+UseG1GC", "-XX:MaxMetaspaceSize=256m",
        "-Djava.awt.headless=true", "-Djava.net.preferIPv4Stack=true",
        f"-Dlog4j2.configurationFile={TEMPLATES / 'log4j2.xml'}",
    ]


def _start_kafka(layout: StackLayout, java: str) -> int:
    home = layout.home / "kafka"
    config = home / "server.properties"
    _render("kafka-server.properties", config, {
        "port": layout.ports["kafka"], "controller_port": layout.ports["kafka_controller"],
        "sasl_port": layout.ports["kafka_sasl"], "data": home / "data",
    })
    libs = f"{layout.artifacts / 'kafka' / 'libs'}/*"
    if not (home / "data" / "meta.properties").exists():
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        proc = subprocess.run(
            # `--cluster-id=ID`, not `-t ID`: one id in 64 starts with "-", which the tool's parser takes for an
            # option ("expected one argument"; seen once in a fresh-clone CI run).
            [java, *_java_opts(256), "-cp", libs, "kafka.tools.StorageTool", "format", f"--cluster-id={cluster_id}",
             "-c", str(config)],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise StackError("kafka", "formatting the KRaft log directory failed", log_tail=proc.stdout + proc.stderr)
    return _spawn(layout, "kafka", [java, *_java_opts(1024), "-cp", libs, "kafka.Kafka", str(config)], home)


def _kafka_healthy(layout: StackLayout) -> bool:
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    if _port_free(layout.ports["kafka"]):
        return False
    admin = AdminClient({"bootstrap.servers": layout.kafka_bootstrap, "log_level": 0})
    try:
        # Metadata of every topic: thousands on a machine that ran the tests, seconds when it is busy.
        metadata = admin.list_topics(timeout=15)
    except KafkaException:
        return False
    return bool(metadata.brokers)


def _start_registry(layout: StackLayout, java: str) -> int:
    home = layout.home / "registry"
    home.mkdir(parents=True, exist_ok=True)
    p = layout.ports
    props = {
        "quarkus.http.host": "127.0.0.1",
        "quarkus.http.port": p["schema_registry"],
        "quarkus.management.host": "127.0.0.1",
        "quarkus.management.port": p["schema_registry_management"],
        "quarkus.http.access-log.enabled": "false",
        "apicurio.storage.kind": "sql",
        "apicurio.storage.sql.kind": "postgresql",
        "apicurio.datasource.url": f"jdbc:postgresql://127.0.0.1:{p['postgres']}/registry",
        "apicurio.datasource.username": PG_USER,
        "apicurio.datasource.jdbc.initial-size": 2,
        "apicurio.datasource.jdbc.min-size": 2,
        "apicurio.datasource.jdbc.max-size": 20,
        "apicurio.storage.snapshot.location": home,
        "apicurio.rest.deletion.artifact.enabled": "true",
        "apicurio.rest.deletion.artifact-version.enabled": "true",
        "apicurio.rest.deletion.group.enabled": "true",
    }
    jars = sorted((layout.artifacts / "registry").glob("*-runner.jar"))
    if not jars:
        raise StackError("schema_registry", f"no Apicurio runner jar under {layout.artifacts / 'registry'}")
    argv = [java, *_java_opts(384), *(f"-D{k}={v}" for k, v in props.items()), "-jar", str(jars[-1])]
    # The password from the environment (Quarkus maps APICURIO_DATASOURCE_PASSWORD to apicurio.datasource.password),
    # not the command line, which every user of the machine can read (`ps`); a process's environment is its owner's.
    return _spawn(layout, "schema_registry", argv, home, env={REGISTRY_PASSWORD_ENV: PG_PASSWORD})


def registry_stale(layout: StackLayout, pid: int) -> bool:
    """Whether a running registry was started with its database password on the command line (by an older launcher)."""
    return "apicurio.datasource.password=" in _cmdline(pid)


def _registry_healthy(layout: StackLayout) -> bool:
    import httpx

    try:
        return httpx.get(layout.urls()["schema_registry"] + "/subjects", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _connect_values(layout: StackLayout) -> dict[str, object]:
    return {"bootstrap": layout.kafka_bootstrap, "port": layout.ports["connect"],
            "plugins": layout.artifacts / "plugins", "home": layout.home / "connect",
            "secrets": secrets_dir(layout.home)}


def connect_config_current(layout: StackLayout) -> bool:
    """Whether the running worker was started with the worker configuration this checkout renders (Connect reads it
    only when it starts: a worker without the secrets config provider could not start a connector)."""
    config = layout.home / "connect" / "worker.properties"
    try:
        return config.read_text() == _rendered("connect-worker.properties", _connect_values(layout))
    except OSError:
        return False


def _start_connect(layout: StackLayout, java: str) -> int:
    home = layout.home / "connect"
    config = home / "worker.properties"
    _render("connect-worker.properties", config, _connect_values(layout))
    # The worker refuses to start when a config provider's allowed path does not exist (Kafka's AllowedPaths).
    secrets = secrets_dir(layout.home)
    secrets.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(secrets, 0o700)
    libs = f"{layout.artifacts / 'kafka' / 'libs'}/*"
    argv = [java, *_java_opts(768), "-cp", libs, "org.apache.kafka.connect.cli.ConnectDistributed", str(config)]
    return _spawn(layout, "connect", argv, home)


def _connect_healthy(layout: StackLayout) -> bool:
    import httpx

    try:
        resp = httpx.get(layout.urls()["connect"] + "/connector-plugins", timeout=2)
    except httpx.HTTPError:
        return False
    return resp.status_code == 200 and any("PostgresConnector" in p.get("class", "") for p in resp.json())


HEALTH: dict[str, Callable[[StackLayout], bool]] = {
    "postgres": _postgres_healthy,
    "mariadb": _mariadb_healthy,
    "kafka": _kafka_healthy,
    "schema_registry": _registry_healthy,
    "connect": _connect_healthy,
}


# ---------------------------------------------------------------------------------------------------------------
# the three commands


@contextlib.contextmanager
def _one_at_a_time(echo: Callable[[str], None]) -> Iterator[None]:
    """One `cdc stack up` or `down` at a time per stack directory. Two at once (two test sessions, a user and a
    script) would each see a component stopped and each start it: the second then finds its port taken, and the
    stack's state names a process that is not the one serving."""
    layout = StackLayout.resolve()
    layout.home.mkdir(parents=True, exist_ok=True)
    with open(layout.home / "stack.lock", "a+") as lock:  # not inherited by the servers started (PEP 446)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            echo(f"stack: another `cdc stack up` or `down` is running under {layout.home}; waiting for it to finish")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def up(echo: Callable[[str], None] = print) -> StackLayout:
    """Start every component that is not already running and wait until all pass their health checks (one caller
    at a time: see _one_at_a_time)."""
    with _one_at_a_time(echo):
        return _up(echo)


def _up(echo: Callable[[str], None]) -> StackLayout:
    """Start every component that is not already running and wait until all pass their health checks.

    Everything that can be checked up front (Java, PostgreSQL, MariaDB, disk, every port) is checked before any
    process starts, so a failed `up` leaves nothing half-started behind it.
    """
    layout = StackLayout.resolve()
    # Not 0700 yet: the database servers' system users must reach their directories inside it (protect_state).
    layout.home.mkdir(parents=True, exist_ok=True)
    running = {name: component_pid(layout, name) for name in COMPONENTS}
    if running["connect"] and (layout.home / "stack.json").exists() and not transforms_current(layout):
        # Connect loads plugins when it starts: one running with older transforms than this checkout's would make
        # `cdc connectors apply` refuse (a transform missing); restart it with the new ones.
        echo("connect: restarting to load the project's updated Kafka Connect transforms")
        _stop_pid(running["connect"])
        layout.pidfile("connect").unlink(missing_ok=True)
        running["connect"] = None
    if running["connect"] and (layout.home / "stack.json").exists() and not connect_config_current(layout):
        # The worker reads its configuration when it starts; one started from an older template (without the config
        # provider that reads connector secrets) could not start a connector `cdc connectors apply` writes now.
        echo("connect: restarting with the updated worker configuration")
        _stop_pid(running["connect"])
        layout.pidfile("connect").unlink(missing_ok=True)
        running["connect"] = None
    if running["schema_registry"] and registry_stale(layout, running["schema_registry"]):
        echo("schema_registry: restarting to take its database password from the environment, not the command line")
        _stop_pid(running["schema_registry"])
        layout.pidfile("schema_registry").unlink(missing_ok=True)
        running["schema_registry"] = None
    for name in RESTARTABLE:
        pid = running[name]
        if pid and not _recovers(layout, name):
            # A registry whose database restarted can keep failing on connections its pool holds; a Connect worker
            # can stay unhealthy after its broker came back. Both keep their state elsewhere (PostgreSQL, Kafka).
            echo(f"{name}: running but unhealthy for {RECOVER_S:.0f} s: restarting it")
            _stop_pid(pid)
            layout.pidfile(name).unlink(missing_ok=True)
            running[name] = None
    if all(running.values()):
        echo(f"stack: already running under {layout.home}")
    to_start = [name for name in COMPONENTS if not running[name]]
    if to_start:
        needs_java = any(name in JAVA_COMPONENTS for name in to_start)
        java = find_java() if needs_java else ""
        bindir = pg_bindir() if "postgres" in to_start else None
        mariadb = mariadb_programs() if "mariadb" in to_start else None
        if shutil.disk_usage(layout.home).free < MIN_FREE_DISK:
            raise StackError("stack", f"less than 1 GiB of free disk under {layout.home}")
        for name in to_start:
            for port_name in COMPONENT_PORTS[name]:
                port = layout.ports[port_name]
                if not _port_free(port):
                    raise StackError(
                        name,
                        f"port {port} on 127.0.0.1 is already in use by another process",
                        log_tail=_log_tail(layout.log(name)) if layout.log(name).exists() else None,
                        hint=f"Stop that process, or choose another port with {PORT_ENV[port_name]}=...",
                    )
        if needs_java:
            ensure_artifacts(layout, echo)
        if "connect" in to_start:
            ensure_transforms(layout, java, echo)
        _write_private(layout.home / "stack.json",
                       json.dumps({"ports": layout.ports, "artifacts": str(layout.artifacts)}, indent=2) + "\n")
        started: dict[str, int | None] = {}
        t0 = time.monotonic()
        # Staged so that independent components boot at the same time: the registry needs PostgreSQL,
        # the Connect worker needs Kafka; MariaDB needs nothing and boots first.
        if "mariadb" in to_start:
            assert mariadb is not None
            started["mariadb"] = _start_mariadb(layout, mariadb)
        if "postgres" in to_start:
            assert bindir is not None
            _start_postgres(layout, bindir)
            echo(f"postgres: started ({time.monotonic() - t0:.1f} s)")
        if "kafka" in to_start:
            started["kafka"] = _start_kafka(layout, java)
        if "schema_registry" in to_start:
            started["schema_registry"] = _start_registry(layout, java)
        if "kafka" in to_start:
            _wait("kafka", layout, lambda: _kafka_healthy(layout), started["kafka"], START_TIMEOUT["kafka"])
            echo(f"kafka: started ({time.monotonic() - t0:.1f} s)")
        if "connect" in to_start:
            started["connect"] = _start_connect(layout, java)
        for name in ("mariadb", "schema_registry", "connect"):
            if name in started:
                _wait(name, layout, functools.partial(HEALTH[name], layout), started[name], START_TIMEOUT[name])
                echo(f"{name}: started ({time.monotonic() - t0:.1f} s)")
    for name in COMPONENTS:
        if running[name]:
            if not HEALTH[name](layout):
                raise StackError(name, "running but failing its health check", log_tail=_log_tail(layout.log(name)))
            echo(f"{name}: already running (pid {running[name]})")
    protect_state(layout)
    return layout


def status() -> dict[str, object]:
    layout = StackLayout.resolve()
    components = {}
    for name in COMPONENTS:
        pid = component_pid(layout, name)
        healthy = bool(pid) and HEALTH[name](layout)
        components[name] = {
            "state": "healthy" if healthy else ("unhealthy" if pid else "stopped"),
            "pid": pid,
            "url": layout.masked_urls()[name],
            "log": str(layout.log(name)),
        }
        if name == "kafka":
            components[name]["sasl_url"] = f"kafka://{layout.kafka_sasl_bootstrap} (SASL_PLAINTEXT, SCRAM-SHA-256)"
    # Masked: this is what `cdc stack status [--json]` prints (the stack's credentials are in infra/stack.py).
    return {
        **layout.masked_urls(),
        "kafka_bootstrap_servers": layout.kafka_bootstrap,
        # The sites' authenticated listener: SCRAM users are per site (`cdc topology apply`), so there is no
        # password here to print or to hide.
        "kafka_sasl": f"kafka://{layout.kafka_sasl_bootstrap}",
        "kafka_sasl_mechanism": "SCRAM-SHA-256",
        "kafka_sasl_security_protocol": "SASL_PLAINTEXT",
        "home": str(layout.home),
        "healthy": all(c["state"] == "healthy" for c in components.values()),
        "components": components,
    }


def down(echo: Callable[[str], None] = print) -> None:
    """Stop the processes this stack started, newest first; anything else on the machine is left alone."""
    with _one_at_a_time(echo):
        _down(echo)


def _down(echo: Callable[[str], None]) -> None:
    layout = StackLayout.resolve()
    # Helpers started beside the stack (the demo's `cdc lag serve`) go first.
    for pidfile in sorted((layout.home / "run").glob("*.pid")):
        if pidfile.stem in COMPONENTS:
            continue
        try:
            pid = int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
        if _alive(pid) and "cdc" in _cmdline(pid):
            _stop_pid(pid, timeout=10)
            echo(f"{pidfile.stem}: stopped")
        pidfile.unlink(missing_ok=True)
    for name in reversed(COMPONENTS):
        component = component_pid(layout, name)
        if component is None:
            echo(f"{name}: not running")
            continue
        if name == "postgres":
            _stop_postgres(layout)
        elif name == "mariadb":
            _stop_mariadb(layout)
        else:
            _stop_pid(component)
            layout.pidfile(name).unlink(missing_ok=True)
        echo(f"{name}: stopped")
