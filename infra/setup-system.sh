#!/usr/bin/env bash
# Installs the machine-level prerequisites of the local stack from Debian's packages when they are missing:
# the PostgreSQL server, a Java 17+ runtime and Maven. Python packages go to the project's venv (see Makefile);
# the Java artifacts are resolved by Maven on the first `cdc stack up`.
set -euo pipefail

missing=()
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || missing+=(postgresql)
command -v java >/dev/null 2>&1 || [ -n "${JAVA_HOME:-}" ] || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
command -v runuser >/dev/null 2>&1 || missing+=(util-linux)

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
