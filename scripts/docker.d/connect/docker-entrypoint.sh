#!/bin/bash
# The Debezium Connect image's documented start-up: BOOTSTRAP_SERVERS, GROUP_ID, CONFIG_STORAGE_TOPIC,
# OFFSET_STORAGE_TOPIC, STATUS_STORAGE_TOPIC, KEY_CONVERTER, VALUE_CONVERTER, OFFSET_FLUSH_INTERVAL_MS,
# OFFSET_FLUSH_TIMEOUT_MS, SHUTDOWN_TIMEOUT, REST_PORT, ADVERTISED_HOST_NAME, ADVERTISED_PORT, HEAP_OPTS and
# LOG_LEVEL, then every CONNECT_* variable as a worker property (CONNECT_ removed, lower case, "_" -> ".").
set -euo pipefail

[ "${1:-start}" = start ] || exec "$@"

: "${CONFIG_STORAGE_TOPIC:?CONFIG_STORAGE_TOPIC is required}"
: "${OFFSET_STORAGE_TOPIC:?OFFSET_STORAGE_TOPIC is required}"
host_name="${HOST_NAME:-$(hostname -i | awk '{print $1}')}"

props=/kafka/config/connect-distributed.properties
{
    # Kafka's own defaults for a distributed worker on a single broker.
    echo "key.converter.schemas.enable=true"
    echo "value.converter.schemas.enable=true"
    echo "config.storage.replication.factor=1"
    echo "offset.storage.replication.factor=1"
    echo "status.storage.replication.factor=1"
    echo "bootstrap.servers=${BOOTSTRAP_SERVERS:-0.0.0.0:9092}"
    echo "group.id=${GROUP_ID:-1}"
    echo "config.storage.topic=$CONFIG_STORAGE_TOPIC"
    echo "offset.storage.topic=$OFFSET_STORAGE_TOPIC"
    [ -n "${STATUS_STORAGE_TOPIC:-}" ] && echo "status.storage.topic=$STATUS_STORAGE_TOPIC"
    echo "key.converter=${KEY_CONVERTER:-org.apache.kafka.connect.json.JsonConverter}"
    echo "value.converter=${VALUE_CONVERTER:-org.apache.kafka.connect.json.JsonConverter}"
    echo "offset.flush.interval.ms=${OFFSET_FLUSH_INTERVAL_MS:-60000}"
    echo "offset.flush.timeout.ms=${OFFSET_FLUSH_TIMEOUT_MS:-5000}"
    echo "task.shutdown.graceful.timeout.ms=${SHUTDOWN_TIMEOUT:-10000}"
    # The REST API answers on every interface of the container (the health check asks localhost).
    echo "listeners=http://0.0.0.0:${REST_PORT:-8083}"
    echo "rest.advertised.host.name=${ADVERTISED_HOST_NAME:-$host_name}"
    echo "rest.advertised.port=${ADVERTISED_PORT:-8083}"
    echo "plugin.path=${KAFKA_CONNECT_PLUGINS_DIR}"
    while IFS='=' read -r name value; do
        case "$name" in CONNECT_*) ;; *) continue ;; esac
        key="${name#CONNECT_}"
        key="${key,,}"
        printf '%s=%s\n' "${key//_/.}" "$value"
    done < <(env)
} >"$props"

sed -i "s/^rootLogger.level = .*/rootLogger.level = ${LOG_LEVEL:-INFO}/" /kafka/log4j2.properties
echo "Using BOOTSTRAP_SERVERS=${BOOTSTRAP_SERVERS:-0.0.0.0:9092}"
echo "Plugins are loaded from $KAFKA_CONNECT_PLUGINS_DIR"
# shellcheck disable=SC2086
exec java ${HEAP_OPTS:--Xms256m -Xmx1G} -XX:+UseSerialGC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile=/kafka/log4j2.properties ${KAFKA_OPTS:-} -cp '/kafka/libs/*' \
    org.apache.kafka.connect.cli.ConnectDistributed "$props"
