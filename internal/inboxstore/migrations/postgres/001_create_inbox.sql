CREATE TABLE IF NOT EXISTS {{.Table}} (
    consumer     varchar(128) NOT NULL,
    id           varchar(128) NOT NULL,
    processed_at bigint NOT NULL,
    PRIMARY KEY (consumer, id)
) WITH (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.05)
-- statement
CREATE INDEX IF NOT EXISTS {{.IdxProcessed}} ON {{.Table}} (consumer, processed_at)
