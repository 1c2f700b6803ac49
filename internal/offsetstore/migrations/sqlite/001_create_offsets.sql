CREATE TABLE IF NOT EXISTS {{.Table}} (
    consumer_group TEXT NOT NULL,
    topic          TEXT NOT NULL,
    part           INTEGER NOT NULL,
    next_offset    INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    PRIMARY KEY (consumer_group, topic, part)
)
