CREATE TABLE IF NOT EXISTS {{.Table}} (
    consumer_group varchar(255) NOT NULL,
    topic          varchar(255) NOT NULL,
    part           integer NOT NULL,
    next_offset    bigint NOT NULL,
    updated_at     bigint NOT NULL,
    PRIMARY KEY (consumer_group, topic, part)
)
