-- The application's transactional outbox, as Debezium reads it.
-- Used by docker-compose.yml (docker-entrypoint-initdb.d) and by scripts/stack.
CREATE SCHEMA IF NOT EXISTS activity;

CREATE TABLE IF NOT EXISTS activity.event_outbox (
    event_id       uuid PRIMARY KEY,
    aggregate_id   uuid        NOT NULL,
    aggregate_type text        NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL,
    status         text        NOT NULL DEFAULT 'pending',
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- Debezium's signal table (the layout its documentation prescribes: id, type, data). A row of type
-- `execute-snapshot` asks the connector for an incremental snapshot: it emits the outbox rows again, as `op: r`
-- records, while streaming goes on. `event-processor snapshot-outbox` writes that row; the connector also writes
-- its snapshot window markers here, so the table must be captured (table.include.list, the publication).
CREATE TABLE IF NOT EXISTS activity.debezium_signal (
    id   varchar(42) PRIMARY KEY,
    type varchar(32) NOT NULL,
    data varchar(2048)
);

-- pgoutput streams only tables in a publication; the connector uses this one.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'debezium_publication') THEN
        CREATE PUBLICATION debezium_publication FOR TABLE activity.event_outbox, activity.debezium_signal;
    ELSIF NOT EXISTS (SELECT 1 FROM pg_publication_tables
                      WHERE pubname = 'debezium_publication' AND tablename = 'debezium_signal') THEN
        ALTER PUBLICATION debezium_publication ADD TABLE activity.debezium_signal;
    END IF;
END
$$;
