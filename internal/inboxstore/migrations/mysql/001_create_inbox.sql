CREATE TABLE IF NOT EXISTS {{.Table}} (
    consumer     VARBINARY(128) NOT NULL,
    id           VARBINARY(128) NOT NULL,
    processed_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, id),
    INDEX {{.IdxProcessed}} (consumer, processed_at)
) ENGINE = InnoDB
