-- What a unit left behind when the next run with the same inputs would change nothing: per
-- unit, a digest of what decides its work and of the rows it compares (identities: the realm
-- file's fingerprint and every users row; role_bindings and tenants: their tables and the users
-- rows they derive from). A run whose digests still match the latest recorded ones knows the
-- unit is settled without comparing row by row (docs/seeding.md, "what a settled run skips").
-- Empty for every unit that did not end settled.
ALTER TABLE seed_runs ADD COLUMN unit_states jsonb NOT NULL DEFAULT '{}'::jsonb;
