-- Sample database for the docker compose demo.
--
-- The postgres image runs this once, when its data volume is empty, as the
-- superuser "app" connected to the database "app". To run it again, remove
-- the volume: docker compose -f deploy/docker-compose.yml down -v
--
-- Privilege model: ferry connects as its own least-privileged role. It needs
--   * LOGIN and REPLICATION, to create its slot and stream from it;
--   * SELECT on every table an index reads (backfill copies rows, and rows
--     whose large values were not in the stream are read again);
--   * a publication covering those tables.
-- Creating or extending a publication FOR TABLE requires owning the tables
-- (and CREATE on the database), which we do not want to hand to ferry. So
-- this script creates the publication itself and config/demo.toml sets
-- source.manage_publication = false: ferry then only checks the publication
-- and, if a table is missing, stops with the ALTER PUBLICATION to run.

\set ON_ERROR_STOP on

CREATE ROLE ferry WITH LOGIN REPLICATION PASSWORD 'ferry';

CREATE TABLE users (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email      text        NOT NULL UNIQUE,
    name       text        NOT NULL,
    country    text        NOT NULL,
    active     boolean     NOT NULL DEFAULT true,
    tags       text[]      NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE orders (
    id        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    user_id   bigint        NOT NULL REFERENCES users (id),
    status    text          NOT NULL,
    total     numeric(10,2) NOT NULL,
    note      text,
    placed_at timestamptz   NOT NULL DEFAULT now()
);

-- 300 users: user1@example.com … user300@example.com.
INSERT INTO users (email, name, country, active, tags, created_at)
SELECT 'user' || g || '@example.com',
       (ARRAY['Ada', 'Grace', 'Alan', 'Edsger', 'Barbara', 'Donald', 'Frances', 'Ken'])[1 + g % 8]
           || ' ' ||
       (ARRAY['Lovelace', 'Hopper', 'Turing', 'Dijkstra', 'Liskov', 'Knuth', 'Allen'])[1 + g % 7],
       (ARRAY['FR', 'DE', 'US', 'JP', 'BR', 'IN'])[1 + g % 6],
       g % 10 <> 0,
       CASE WHEN g % 3 = 0 THEN ARRAY['beta', 'newsletter'] ELSE ARRAY['newsletter'] END,
       now() - g * interval '1 day'
FROM generate_series(1, 300) AS g;

-- 600 orders, two per user on average.
INSERT INTO orders (user_id, status, total, note, placed_at)
SELECT 1 + (g * 7) % 300,
       (ARRAY['pending', 'paid', 'shipped', 'delivered', 'cancelled'])[1 + g % 5],
       round((5 + (g * 37) % 500 + (g % 100) / 100.0)::numeric, 2),
       CASE WHEN g % 4 = 0 THEN 'gift wrap please' END,
       now() - g * interval '3 hours'
FROM generate_series(1, 600) AS g;

GRANT SELECT ON users, orders TO ferry;

-- The publication ferry streams from (source.publication in config/demo.toml).
CREATE PUBLICATION ferry_app FOR TABLE users, orders;

-- Only needed if you switch source.manage_publication to true, and then
-- ferry must also own the tables (ALTER TABLE … OWNER TO ferry):
-- GRANT CREATE ON DATABASE app TO ferry;
