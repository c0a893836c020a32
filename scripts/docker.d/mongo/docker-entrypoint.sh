#!/bin/bash
# `mongod [--port N] [--dbpath DIR] ...` starts the MongoDB-wire server (a standalone, as mongod runs by default) as the
# mongodb user, on every interface (as the official image does), and says when it accepts connections as mongod
# does; anything else is run as given.
set -euo pipefail

[ "${1:0:1}" = "-" ] && set -- mongod "$@"
[ "$1" = mongod ] || exec "$@"
shift
port=27017
dbpath=/data/db
while [ $# -gt 0 ]; do
    case "$1" in
        --port) port="$2"; shift ;;
        --port=*) port="${1#--port=}" ;;
        --dbpath) dbpath="$2"; shift ;;
        --dbpath=*) dbpath="${1#--dbpath=}" ;;
        *) echo "mongod option $1 is not supported by this server; ignored" >&2 ;;
    esac
    shift
done
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$dbpath"
    chown -R mongodb "$dbpath"
    HOME="$dbpath" exec setpriv --reuid=mongodb --regid=mongodb --init-groups "$0" mongod --port "$port" --dbpath "$dbpath"
fi
secantusd-rs --host 0.0.0.0 --port "$port" --storage-path "$dbpath" --log-level WARNING --standalone \
    --cache-size 512M &
server=$!
trap 'kill -TERM "$server" 2>/dev/null' TERM INT
until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    kill -0 "$server" 2>/dev/null || { wait "$server"; exit $?; }
    sleep 0.2
done
# mongod's own readiness line (JSON log, id 23016), which tools that start the image wait for.
printf '{"t":{"$date":"%s"},"s":"I","c":"NETWORK","id":23016,"ctx":"listener","msg":"Waiting for connections","attr":{"port":%d,"ssl":"off"}}\n' \
    "$(date -u +%Y-%m-%dT%H:%M:%S.000+00:00)" "$port"
wait "$server"
