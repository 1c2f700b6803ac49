CREATE TABLE IF NOT EXISTS {{.Table}} (
    seq             BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    id              VARCHAR(128) NOT NULL,
    topic           VARCHAR(255) NOT NULL,
    msg_key         VARCHAR(255) NOT NULL DEFAULT '',
    key_hash        INT NOT NULL,
    payload         LONGBLOB NOT NULL,
    headers         TEXT,
    created_at      BIGINT NOT NULL,
    status          TINYINT NOT NULL DEFAULT 0,
    attempts        INT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL DEFAULT 0,
    last_error      TEXT,
    done_at         BIGINT,
    INDEX {{.IdxPending}} (status, seq),
    INDEX {{.IdxSent}} (status, done_at)
) ENGINE = InnoDB
-- statement
CREATE TABLE IF NOT EXISTS {{.Leases}} (
    part       INT NOT NULL PRIMARY KEY,
    owner      VARCHAR(128),
    expires_at BIGINT NOT NULL DEFAULT 0
) ENGINE = InnoDB
-- statement
CREATE TABLE IF NOT EXISTS {{.Relays}} (
    owner        VARCHAR(128) NOT NULL PRIMARY KEY,
    heartbeat_at BIGINT NOT NULL
) ENGINE = InnoDB
