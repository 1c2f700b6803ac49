-- A plain INSERT INTO <outbox> (topic, msg_key, payload) VALUES (...) is a
-- complete outbox write: id and created_at get defaults (a UUIDv7 and the
-- Unix time in microseconds, as Go writers fill them), and key_hash, which
-- SQLite cannot compute (it has no stored functions), is left NULL and
-- filled by the relay with outboxstore.KeyHash's value before it fetches the
-- row. SQLite cannot change a column's default or NOT NULL, so the table is
-- rebuilt: every row keeps its seq, and the sequence goes on where it was.
-- A table with columns of its own beyond exactly's would lose them: the
-- migration refuses it.
CREATE TEMP TABLE {{.Guard}} (n INTEGER)
-- statement
CREATE TEMP TRIGGER {{.Guard}} BEFORE INSERT ON {{.Guard}} WHEN NEW.n <> 13
BEGIN
    SELECT RAISE(ABORT, 'the outbox table has columns beyond exactly''s 13; migration 2 rebuilds the table and would drop them: rebuild it by hand (see docs/outbox-format.md)');
END
-- statement
INSERT INTO {{.Guard}} SELECT count(*) FROM pragma_table_info({{.TableLit}})
-- statement
DROP TABLE {{.Guard}}
-- statement
CREATE TABLE {{.Rebuilt}} (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL DEFAULT (lower(printf('%08x-%04x-7%s-%s%s-%s',
                        (CAST(strftime('%s', 'now') AS INTEGER) * 1000 + CAST(substr(strftime('%f', 'now'), 4) AS INTEGER)) >> 16,
                        (CAST(strftime('%s', 'now') AS INTEGER) * 1000 + CAST(substr(strftime('%f', 'now'), 4) AS INTEGER)) & 65535,
                        substr(hex(randomblob(2)), 2), substr('89ab', 1 + (random() & 3), 1),
                        substr(hex(randomblob(2)), 2), hex(randomblob(6))))),
    topic           TEXT NOT NULL,
    msg_key         TEXT NOT NULL DEFAULT '',
    key_hash        INTEGER,
    payload         BLOB NOT NULL,
    headers         TEXT,
    created_at      INTEGER NOT NULL DEFAULT ((CAST(strftime('%s', 'now') AS INTEGER) * 1000 + CAST(substr(strftime('%f', 'now'), 4) AS INTEGER)) * 1000),
    status          INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL DEFAULT 0,
    last_error      TEXT,
    done_at         INTEGER
)
-- statement
INSERT INTO {{.Rebuilt}} (seq, id, topic, msg_key, key_hash, payload, headers, created_at, status, attempts, next_attempt_at, last_error, done_at)
SELECT seq, id, topic, msg_key, key_hash, payload, headers, created_at, status, attempts, next_attempt_at, last_error, done_at FROM {{.Table}}
-- statement
DELETE FROM sqlite_sequence WHERE name = {{.RebuiltLit}}
-- statement
INSERT INTO sqlite_sequence (name, seq) SELECT {{.RebuiltLit}}, seq FROM sqlite_sequence WHERE name = {{.TableLit}}
-- statement
DROP TABLE {{.Table}}
-- statement
ALTER TABLE {{.Rebuilt}} RENAME TO {{.Table}}
-- statement
CREATE INDEX IF NOT EXISTS {{.IdxPending}} ON {{.Table}} (seq) WHERE status = 0
-- statement
CREATE INDEX IF NOT EXISTS {{.IdxSent}} ON {{.Table}} (done_at) WHERE status = 1
-- statement
CREATE INDEX IF NOT EXISTS {{.IdxDead}} ON {{.Table}} (seq) WHERE status = 2
-- statement
CREATE INDEX IF NOT EXISTS {{.IdxNoHash}} ON {{.Table}} (seq) WHERE key_hash IS NULL
