-- deploy/local/ferretdb-pg.sql: what the local stack adds to the PostgreSQL
-- under FerretDB 1.24 so that Parley's queries are answered from indexes.
-- A property of the local stack only: production runs a real MongoDB, whose
-- own indexes (created by the services through libmongoc, as here) serve the
-- same queries. stack.sh runs this file on every start, before FerretDB
-- connects; every statement is idempotent.
--
-- Why it is needed: FerretDB filters a find, and the find that precedes each
-- delete or update, with `_jsonb->$1 @> $2` (JSONB containment, the field
-- name a parameter too). The btree indexes FerretDB makes for a MongoDB
-- index, on `((_jsonb->'field'))`, cannot serve containment, so every such
-- query was a sequential scan of the whole collection.
--
-- What it does:
-- 1. For each btree index FerretDB creates on a collection, a GIN index on
--    the same table over that index's leading field: the field an equality
--    filter on the MongoDB index's prefix names ({user: u}, {_id: k},
--    {gateway: g}). An event trigger does it as the index is created, so a
--    database made later (a test's, a bench run's) gets its indexes at once;
--    the sweep at the end covers tables made before this file first ran.
-- 2. plan_cache_mode = force_custom_plan for the ferretdb database: FerretDB
--    sends prepared statements, and after five runs PostgreSQL may switch to
--    a generic plan, where the field name is still `$1` and no expression
--    index matches. It does so when the generic plan looks no dearer, e.g.
--    while a collection is still small, and keeps it until the table's
--    statistics change; a trial on this machine saw deletes stay slow
--    without this setting. (test_store_mongo_index, whose collections are
--    filled before the burst, passes without it.)
-- FerretDB pushes down equality only: ranges ($gt, $lt), $in and $or are
-- evaluated by FerretDB over what the pushed-down part returns, so the
-- store's queries keep an equality on an indexed field (store_mongo.c).

SET client_min_messages = warning;

ALTER DATABASE ferretdb SET plan_cache_mode = force_custom_plan;

-- The GIN twin of one btree index of a FerretDB collection (no-op for any
-- other index, and when the table has a GIN index on that field already).
CREATE OR REPLACE FUNCTION public.parley_gin_twin(idx oid) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    tbl oid;
    col text;
    twin oid;
BEGIN
    SELECT i.indrelid, pg_get_indexdef(i.indexrelid, 1, false)
      INTO tbl, col
      FROM pg_index i
      JOIN pg_class ic ON ic.oid = i.indexrelid
      JOIN pg_am am ON am.oid = ic.relam
      JOIN pg_class t ON t.oid = i.indrelid
      JOIN pg_namespace n ON n.oid = t.relnamespace
     WHERE i.indexrelid = idx
       AND am.amname = 'btree'
       AND i.indkey[0] = 0 -- an expression, as FerretDB's are
       AND t.relname NOT LIKE '\_ferretdb\_%'
       AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'public')
       AND EXISTS (SELECT 1 FROM pg_attribute a
                    WHERE a.attrelid = t.oid AND a.attname = '_jsonb' AND NOT a.attisdropped);
    -- Parley's {ts: 1} indexes serve the expiry sweeps' ranges ($lt), which
    -- FerretDB never pushes down: a twin would only slow inserts.
    IF tbl IS NULL OR col = '((_jsonb -> ''ts''::text))' THEN
        RETURN;
    END IF;
    -- fastupdate off: with it on, rows inserted since the last vacuum sit
    -- in the index's pending list, which every lookup scans in full, and
    -- with a few thousand fresh rows the planner rightly prefers a
    -- sequential scan (test_store_mongo_index saw 2 on groups on a busy
    -- box, where autovacuum had not yet run). Parley looks up fresh rows
    -- most of all (the inbox), as a real MongoDB's indexes serve them.
    SELECT g.indexrelid INTO twin FROM pg_index g
      JOIN pg_class gc ON gc.oid = g.indexrelid
      JOIN pg_am gam ON gam.oid = gc.relam
     WHERE g.indrelid = tbl AND gam.amname = 'gin'
       AND pg_get_indexdef(g.indexrelid, 1, false) = col
     LIMIT 1;
    IF twin IS NOT NULL THEN
        EXECUTE format('ALTER INDEX %s SET (fastupdate = off)', twin::regclass);
        RETURN;
    END IF;
    EXECUTE format('CREATE INDEX %I ON %s USING gin (%s) WITH (fastupdate = off)',
                   left((SELECT relname FROM pg_class WHERE oid = tbl), 40) || '_'
                       || left(md5(tbl::regclass::text || col), 12) || '_gin',
                   tbl::regclass, col);
END
$$;

CREATE OR REPLACE FUNCTION public.parley_gin_on_create() RETURNS event_trigger
LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT objid FROM pg_event_trigger_ddl_commands()
              WHERE object_type = 'index' LOOP
        PERFORM public.parley_gin_twin(r.objid);
    END LOOP;
END
$$;

DROP EVENT TRIGGER IF EXISTS parley_gin;
CREATE EVENT TRIGGER parley_gin ON ddl_command_end WHEN TAG IN ('CREATE INDEX')
    EXECUTE FUNCTION public.parley_gin_on_create();

DO $$ BEGIN PERFORM public.parley_gin_twin(indexrelid) FROM pg_index; END $$;
