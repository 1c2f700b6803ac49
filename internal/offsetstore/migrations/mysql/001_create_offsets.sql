CREATE TABLE IF NOT EXISTS {{.Table}} (
    consumer_group VARCHAR(255) NOT NULL,
    topic          VARCHAR(255) NOT NULL,
    part           INT NOT NULL,
    next_offset    BIGINT NOT NULL,
    updated_at     BIGINT NOT NULL,
    PRIMARY KEY (consumer_group, topic, part)
) ENGINE = InnoDB
