CREATE TABLE IF NOT EXISTS {{.Table}} (
    consumer     TEXT NOT NULL,
    id           TEXT NOT NULL,
    processed_at INTEGER NOT NULL,
    PRIMARY KEY (consumer, id)
) WITHOUT ROWID
-- statement
CREATE INDEX IF NOT EXISTS {{.IdxProcessed}} ON {{.Table}} (consumer, processed_at)
