CREATE TABLE IF NOT EXISTS {{.Table}} (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL,
    topic           TEXT NOT NULL,
    msg_key         TEXT NOT NULL DEFAULT '',
    key_hash        INTEGER NOT NULL,
    payload         BLOB NOT NULL,
    headers         TEXT,
    created_at      INTEGER NOT NULL,
    status          INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    done_at         INTEGER
)
-- statement
CREATE INDEX IF NOT EXISTS {{.IdxPending}} ON {{.Table}} (seq) WHERE status = 0
-- statement
CREATE INDEX IF NOT EXISTS {{.IdxSent}} ON {{.Table}} (done_at) WHERE status = 1
-- statement
CREATE INDEX IF NOT EXISTS {{.IdxDead}} ON {{.Table}} (seq) WHERE status = 2
-- statement
CREATE TABLE IF NOT EXISTS {{.Leases}} (
    part       INTEGER PRIMARY KEY,
    owner      TEXT,
    expires_at INTEGER NOT NULL DEFAULT 0
)
-- statement
CREATE TABLE IF NOT EXISTS {{.Relays}} (
    owner        TEXT PRIMARY KEY,
    heartbeat_at INTEGER NOT NULL
)
