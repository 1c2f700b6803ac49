CREATE TABLE IF NOT EXISTS {{.Table}} (
    seq             bigserial PRIMARY KEY,
    id              varchar(128) NOT NULL,
    topic           varchar(255) NOT NULL,
    msg_key         varchar(255) NOT NULL DEFAULT '',
    key_hash        integer NOT NULL,
    payload         bytea NOT NULL,
    headers         text,
    created_at      bigint NOT NULL,
    status          smallint NOT NULL DEFAULT 0,
    attempts        integer NOT NULL DEFAULT 0,
    next_attempt_at bigint NOT NULL DEFAULT 0,
    last_error      text,
    done_at         bigint
) WITH (autovacuum_vacuum_scale_factor = 0.01, autovacuum_vacuum_threshold = 1000,
        autovacuum_analyze_scale_factor = 0.05)
-- statement
CREATE INDEX IF NOT EXISTS {{.IdxPending}} ON {{.Table}} (seq) WHERE status = 0
-- statement
CREATE INDEX IF NOT EXISTS {{.IdxSent}} ON {{.Table}} (done_at) WHERE status = 1
-- statement
CREATE INDEX IF NOT EXISTS {{.IdxDead}} ON {{.Table}} (seq) WHERE status = 2
-- statement
CREATE TABLE IF NOT EXISTS {{.Leases}} (
    part       integer PRIMARY KEY,
    owner      varchar(128),
    expires_at bigint NOT NULL DEFAULT 0
)
-- statement
CREATE TABLE IF NOT EXISTS {{.Relays}} (
    owner        varchar(128) PRIMARY KEY,
    heartbeat_at bigint NOT NULL
)
-- statement
CREATE OR REPLACE FUNCTION {{.NotifyFunc}}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify({{.Channel}}, '');
    RETURN NULL;
END
$$
-- statement
DROP TRIGGER IF EXISTS {{.Trigger}} ON {{.Table}}
-- statement
CREATE TRIGGER {{.Trigger}} AFTER INSERT ON {{.Table}}
    FOR EACH STATEMENT EXECUTE FUNCTION {{.NotifyFunc}}()
