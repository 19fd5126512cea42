#!/usr/bin/env bash
# Installs the machine-level prerequisites of the local stack from Debian's packages when they are missing:
# the PostgreSQL and MariaDB servers, a Java 17+ runtime and Maven. Python packages go to the project's venv (see Makefile);
# the Java artifacts are resolved by Maven on the first `cdc stack up`.
set -euo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing+=(postgresql)
[ -x /usr/sbin/mariadbd ] && command -v mariadb-install-db >/dev/null 2>&1 || missing+=(mariadb-server)
command -v mariadb >/dev/null 2>&1 || missing+=(mariadb-client)
command -v java >/dev/null 2>&1 || [ -n "${JAVA_HOME:-}" ] || missing+=(openjdk-17-jre-headless)
# javac builds the project's one Kafka Connect transform (infra/transforms).
command -v javac >/dev/null 2>&1 || [ -x "${JAVA_HOME:-/nonexistent}/bin/javac" ] || missing+=(openjdk-17-jdk-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
command -v runuser >/dev/null 2>&1 || missing+=(util-linux)
# Headless Chromium renders the `cdc lag serve` page in the tests.
[ -x /usr/bin/chromium ] || missing+=(chromium)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "setup: installing Debian packages: ${missing[*]}"
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
    echo "setup: need root to install ${missing[*]}; install them and run again" >&2; exit 2; fi
else
  SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian's package creates and starts a default cluster on port 5432; the stack runs its own private cluster.
if [[ " ${missing[*]} " == *" postgresql "* ]] && command -v pg_lsclusters >/dev/null 2>&1; then
  pg_lsclusters -h 2>/dev/null | while read -r version name _; do
    $SUDO pg_ctlcluster "$version" "$name" stop 2>/dev/null || true
    $SUDO pg_dropcluster "$version" "$name" 2>/dev/null || true
  done
fi
# Debian's mariadb-server starts a system service on port 3306; the stack runs its own private instance (on 3307
# by default), so the service is stopped and kept from starting at boot, and nothing may be left on 3306.
if [[ " ${missing[*]} " == *" mariadb-server "* ]]; then
  if [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now mariadb >/dev/null 2>&1 || true
  else
    $SUDO service mariadb stop >/dev/null 2>&1 || true
    $SUDO update-rc.d mariadb disable >/dev/null 2>&1 || true
  fi
  for _ in $(seq 30); do
    (exec 3<>/dev/tcp/127.0.0.1/3306) 2>/dev/null || break
    sleep 1
  done
  if (exec 3<>/dev/tcp/127.0.0.1/3306) 2>/dev/null; then
    echo "setup: something still listens on 127.0.0.1:3306 after stopping Debian's MariaDB service" >&2
    exit 1
  fi
fi
