-- A plain INSERT INTO <outbox> (topic, msg_key, payload) VALUES (...) is a
-- complete outbox write: id, created_at and key_hash are filled the way Go
-- writers fill them. Rows and writers that set them are unaffected.
CREATE OR REPLACE FUNCTION {{.KeyHashFunc}}(msg_key text, id text) RETURNS integer
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
-- outboxstore.KeyHash: FNV-1a (32 bits) of the key's UTF-8 bytes, or of the
-- id's when the key is empty, as a non-negative int32.
DECLARE
    b bytea := convert_to(CASE WHEN msg_key <> '' THEN msg_key ELSE id END, 'UTF8');
    h bigint := 2166136261;
BEGIN
    FOR i IN 0 .. length(b) - 1 LOOP
        h := ((h # get_byte(b, i)) * 16777619) & 4294967295;
    END LOOP;
    RETURN (h & 2147483647)::integer;
END
$$
-- statement
CREATE OR REPLACE FUNCTION {{.UUIDFunc}}() RETURNS varchar
LANGUAGE sql VOLATILE PARALLEL SAFE AS $$
-- A UUIDv7 in its canonical text form, as exactly.NewID makes: the Unix time
-- in milliseconds, then random bits (version 7, variant 10).
SELECT encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid())
    PLACING substring(int8send(floor(extract(epoch FROM clock_timestamp()) * 1000)::bigint) FROM 3)
    FROM 1 FOR 6), 52, 1), 53, 1), 'hex')::uuid::text
$$
-- statement
CREATE OR REPLACE FUNCTION {{.FillFunc}}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.key_hash := {{.KeyHashFunc}}(NEW.msg_key, NEW.id);
    RETURN NEW;
END
$$
-- statement
ALTER TABLE {{.Table}}
    ALTER COLUMN id SET DEFAULT {{.UUIDFunc}}(),
    ALTER COLUMN created_at SET DEFAULT floor(extract(epoch FROM clock_timestamp()) * 1000000)::bigint
-- statement
DROP TRIGGER IF EXISTS {{.FillTrigger}} ON {{.Table}}
-- statement
CREATE TRIGGER {{.FillTrigger}} BEFORE INSERT ON {{.Table}}
    FOR EACH ROW WHEN (NEW.key_hash IS NULL) EXECUTE FUNCTION {{.FillFunc}}()
