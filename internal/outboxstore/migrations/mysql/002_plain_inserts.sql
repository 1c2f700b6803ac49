-- A plain INSERT INTO <outbox> (topic, msg_key, payload) VALUES (...) is a
-- complete outbox write: id, created_at and key_hash are filled by a
-- trigger the way Go writers fill them. The defaults are markers the
-- trigger replaces ('' for the id, -1 for key_hash, 0 for created_at: none
-- is a value a writer stores); rows and writers that set the columns are
-- unaffected.
ALTER TABLE {{.Table}}
    ALTER COLUMN id SET DEFAULT '',
    ALTER COLUMN key_hash SET DEFAULT -1,
    ALTER COLUMN created_at SET DEFAULT 0
-- statement
DROP FUNCTION IF EXISTS {{.KeyHashFunc}}
-- statement
CREATE FUNCTION {{.KeyHashFunc}}(k VARBINARY(1024)) RETURNS INT DETERMINISTIC NO SQL
    COMMENT 'outboxstore.KeyHash: FNV-1a (32 bits) of the UTF-8 bytes, as a non-negative int32'
BEGIN
    DECLARE h BIGINT UNSIGNED DEFAULT 2166136261;
    DECLARE i INT DEFAULT 1;
    DECLARE n INT DEFAULT LENGTH(k);
    WHILE i <= n DO
        SET h = ((h ^ ORD(SUBSTRING(k, i, 1))) * 16777619) & 4294967295;
        SET i = i + 1;
    END WHILE;
    RETURN h & 2147483647;
END
-- statement
DROP TRIGGER IF EXISTS {{.FillTrigger}}
-- statement
CREATE TRIGGER {{.FillTrigger}} BEFORE INSERT ON {{.Table}} FOR EACH ROW
BEGIN
    DECLARE r CHAR(20);
    DECLARE ts CHAR(12);
    IF NEW.id IS NULL OR LENGTH(NEW.id) = 0 THEN
        -- A UUIDv7 as exactly.NewID makes: Unix milliseconds, random bits.
        SET ts = LPAD(LOWER(HEX(TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6)) DIV 1000)), 12, '0');
        SET r = LOWER(HEX(RANDOM_BYTES(10)));
        SET NEW.id = CONCAT(SUBSTRING(ts, 1, 8), '-', SUBSTRING(ts, 9, 4), '-7', SUBSTRING(r, 1, 3), '-',
            LOWER(HEX(8 + (CONV(SUBSTRING(r, 4, 1), 16, 10) & 3))), SUBSTRING(r, 5, 3), '-', SUBSTRING(r, 8, 12));
    END IF;
    IF NEW.created_at IS NULL OR NEW.created_at = 0 THEN
        SET NEW.created_at = TIMESTAMPDIFF(MICROSECOND, '1970-01-01 00:00:00', UTC_TIMESTAMP(6));
    END IF;
    IF NEW.key_hash IS NULL OR NEW.key_hash < 0 THEN
        SET NEW.key_hash = {{.KeyHashFunc}}(CAST(CONVERT(IF(LENGTH(NEW.msg_key) > 0, NEW.msg_key, NEW.id) USING utf8mb4) AS BINARY));
    END IF;
END
