-- What an identities unit left behind when the next run with the same input would change
-- nothing: the input's fingerprint (a realm file's digest, with what else decides the listing)
-- and a digest of every users row. A run whose input and users rows both still match the latest
-- such record proves the listing applied and skips staging it (docs/seeding.md, "a no-op that
-- reads and compares"). NULL for every other run, and for every unit of a run but identities.
ALTER TABLE seed_runs ADD COLUMN identities_state text;
