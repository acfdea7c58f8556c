#!/usr/bin/env bash
# The stores a team's pqsweep workers share across machines: one PostgreSQL cluster (database `optuna` holds the
# studies, database `mlflow` the runs) and an `mlflow server` on it that also stores and serves the artifacts, so a
# worker needs nothing but the two URIs this prints.
#
#   scripts/team-stores.sh start [--dir DIR] [--host HOST] [--pg-port 5432] [--mlflow-port 5000]
#                                [--artifacts PATH_OR_URI] [-- MORE_MLFLOW_SERVER_ARGS...]
#   scripts/team-stores.sh urls --dir DIR     # the two lines again
#   scripts/team-stores.sh stop --dir DIR
#
# `start` prints, on stdout, the overrides every worker passes (HOST as given):
#   hydra.sweeper.storage=postgresql+psycopg://pqsweep:<password>@HOST:5432/optuna
#   tracking.uri=http://HOST:5000
# e.g.  pqsweep -m sweep=<name> "$(sed -n 1p DIR/urls)" "$(sed -n 2p DIR/urls)"  on each machine.
#
# DIR keeps the cluster (DIR/pg), the password (DIR/password), the logs and, unless --artifacts says otherwise, the
# artifacts (DIR/artifacts; an s3://... or a path every machine mounts works too). Without --dir it is a new
# temporary directory; `start` on a DIR used before restarts its cluster with the data it holds.
# HOST is where both servers listen and what the URIs name: 127.0.0.1 (this machine only) by default; for a team,
# this machine's name or address, or 0.0.0.0 (every interface, the URIs then name `hostname -f`). PostgreSQL asks
# every connection for the password, whatever its address.
# As root, PostgreSQL runs as the `postgres` user (it refuses root): DIR's parents must let that user through.
set -euo pipefail

usage() { sed -n '2,/^set -e/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }
say() { echo "team-stores: $*" >&2; }

command=${1:-}; [[ $command =~ ^(start|stop|urls)$ ]] || usage; shift
dir="" host=127.0.0.1 pg_port=5432 mlflow_port=5000 artifacts="" extra=()
while (($#)); do
  case $1 in
    --dir) dir=$2; shift 2 ;;
    --host) host=$2; shift 2 ;;
    --pg-port) pg_port=$2; shift 2 ;;
    --mlflow-port) mlflow_port=$2; shift 2 ;;
    --artifacts) artifacts=$2; shift 2 ;;
    --) shift; extra=("$@"); break ;;
    *) usage ;;
  esac
done
if [[ -z $dir ]]; then
  [[ $command == start ]] || { say "$command needs --dir DIR (the one start used)"; exit 2; }
  dir=$(mktemp -d /tmp/team-stores.XXXXXX)
fi
dir=$(realpath "$dir")

# Debian keeps pg_ctl and initdb out of PATH, under /usr/lib/postgresql/<version>/bin.
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
[[ -n $pg_bin ]] || pg_bin=$(dirname "$(command -v pg_ctl || echo /missing/pg_ctl)")
[[ -x $pg_bin/pg_ctl ]] || { say "PostgreSQL not found: apt-get install postgresql"; exit 1; }
# mlflow from PATH, else from this checkout's virtualenv
mlflow=$(command -v mlflow || echo "$(dirname "$0")/../.venv/bin/mlflow")

as_owner() { if ((EUID == 0)); then runuser -u postgres -- "$@"; else "$@"; fi; }

stop_mlflow() {
  [[ -f $dir/mlflow.pid ]] || return 0
  local pid; pid=$(<"$dir/mlflow.pid")
  if kill -TERM -- "-$pid" 2>/dev/null; then  # its process group: the server and the workers it forked
    for _ in {1..60}; do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$dir/mlflow.pid"
}

stop_postgres() {
  if [[ -f $dir/pg/postmaster.pid ]]; then as_owner "$pg_bin/pg_ctl" stop -D "$dir/pg" -m fast >&2; fi
}

case $command in
  urls) cat "$dir/urls"; exit 0 ;;
  stop) stop_mlflow; stop_postgres; say "stopped (data kept in $dir)"; exit 0 ;;
esac

[[ ! -f $dir/mlflow.pid ]] || { say "already started from $dir (stop it first)"; exit 1; }
trap 'say "start failed; stopping what it started (logs in $dir)"; stop_mlflow; stop_postgres' ERR
advertised=$host local=$host
if [[ $host == 0.0.0.0 ]]; then advertised=$(hostname -f) local=127.0.0.1; fi

if [[ ! -f $dir/pg/PG_VERSION ]]; then
  mkdir -p "$dir/pg"
  (umask 077; od -An -N16 -tx1 /dev/urandom | tr -d ' \n' >"$dir/password")
  if ((EUID == 0)); then chmod o+x "$dir"; chown postgres: "$dir/pg" "$dir/password"; fi
  as_owner "$pg_bin/initdb" -D "$dir/pg" -U pqsweep --pwfile="$dir/password" --auth=scram-sha-256 \
    --no-instructions >"$dir/initdb.log"
  # Any address may try; only the addresses it listens on (HOST) reach it, and only with the password get in.
  printf 'host all pqsweep 0.0.0.0/0 scram-sha-256\nhost all pqsweep ::/0 scram-sha-256\n' |
    as_owner tee -a "$dir/pg/pg_hba.conf" >/dev/null
  created=1
fi
# No Unix socket (its path could exceed the 107 bytes allowed, and /var/run/postgresql may not be ours): TCP only.
as_owner "$pg_bin/pg_ctl" start -w -D "$dir/pg" -l "$dir/pg/server.log" \
  -o "-c listen_addresses=$host -c port=$pg_port -c unix_socket_directories=''" >&2
password=$(<"$dir/password")
if [[ -n ${created:-} ]]; then
  PGPASSWORD=$password "$pg_bin/psql" -q -h "$local" -p "$pg_port" -U pqsweep -d postgres \
    -c 'CREATE DATABASE optuna' -c 'CREATE DATABASE mlflow'
fi
# Optuna's tables, made here once: workers that all find a fresh database create them at the same moment, and all
# but one fail. Tables of an older Optuna stop the start here, with Optuna's command to upgrade them.
"$(dirname "$mlflow")/python" -c 'import sys, optuna; optuna.storages.RDBStorage(sys.argv[1])' \
  "postgresql+psycopg://pqsweep:$password@$local:$pg_port/optuna"

artifacts=${artifacts:-$dir/artifacts}
[[ $artifacts == *://* ]] || { mkdir -p "$artifacts"; artifacts=$(realpath "$artifacts"); }
allowed=()  # MLflow answers only requests naming localhost or a private address unless told the name
[[ $advertised == 127.0.0.1 ]] || allowed=(--allowed-hosts "$advertised,$advertised:*,localhost:*,127.0.0.1:*")
# Its own session (setsid), so that `stop` ends the server and its workers by its process group's id.
setsid "$mlflow" server --backend-store-uri "postgresql+psycopg://pqsweep:$password@$local:$pg_port/mlflow" \
  --serve-artifacts --artifacts-destination "$artifacts" --host "$host" --port "$mlflow_port" \
  "${allowed[@]}" "${extra[@]}" >"$dir/mlflow.log" 2>&1 &
echo $! >"$dir/mlflow.pid"
say "waiting for mlflow server on $local:$mlflow_port (it migrates a new database first)"
for _ in {1..360}; do
  if python3 -c "import urllib.request as u; u.urlopen('http://$local:$mlflow_port/health', timeout=2)" 2>/dev/null
  then break; fi
  kill -0 "$(<"$dir/mlflow.pid")" 2>/dev/null || { tail -n 30 "$dir/mlflow.log" >&2; false; }
  sleep 0.5
done
python3 -c "import urllib.request as u; u.urlopen('http://$local:$mlflow_port/health', timeout=2)"
trap - ERR

(umask 077  # the urls hold the password, like DIR/password
 printf '%s\n' "hydra.sweeper.storage=postgresql+psycopg://pqsweep:$password@$advertised:$pg_port/optuna" \
   "tracking.uri=http://$advertised:$mlflow_port" | tee "$dir/urls")
say "started; stop with: $0 stop --dir $dir"
