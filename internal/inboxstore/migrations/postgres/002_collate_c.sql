-- Compare the key columns byte by byte (COLLATE "C") instead of with the
-- database's collation: every claim compares ids in the primary key and the
-- consumer in both indexes, and a locale's comparison costs several times a
-- memcmp. Equality, the only thing the inbox asks of these columns, is the
-- same under both (deterministic collations break ties byte-wise). The
-- table is not rewritten; its two indexes are rebuilt, under a lock that
-- holds claims back meanwhile.
ALTER TABLE {{.Table}}
    ALTER COLUMN consumer TYPE varchar(128) COLLATE "C",
    ALTER COLUMN id TYPE varchar(128) COLLATE "C"
