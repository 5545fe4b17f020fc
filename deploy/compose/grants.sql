-- The grant block of docs/configuration.md ("The database role it needs"), verbatim: scripts/check-deploy.sh
-- fails when the two differ. Applied by deploy/compose/grants.sh after `seedkeeper migrate`.
CREATE ROLE seedkeeper LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
GRANT CONNECT, TEMPORARY ON DATABASE platform TO seedkeeper;
GRANT USAGE ON SCHEMA public TO seedkeeper;
GRANT SELECT, INSERT, UPDATE ON ALL TABLES IN SCHEMA public TO seedkeeper;
GRANT DELETE ON seed_runs TO seedkeeper;
