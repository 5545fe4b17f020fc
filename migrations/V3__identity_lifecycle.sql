-- The identity lifecycle: a user gone from the realm is offboarded (row kept, deactivated),
-- and a binding seedkeeper revokes records why.

-- When the user was found gone from the realm (absent from a complete listing, or 404 in an
-- event batch); NULL while the user is in the realm. An offboarded row is never re-aligned to a
-- new sub: a new sub with its username is another person reusing the name.
ALTER TABLE users ADD COLUMN offboarded_at timestamptz;

-- Why seedkeeper revoked a binding: 'basis-gone' (the role that earned it was lost),
-- 'identity-disabled' (the user is disabled in Keycloak), 'identity-offboarded' (the user is
-- gone from the realm). NULL for active bindings and for revocations made by anyone else.
ALTER TABLE platform_role_bindings ADD COLUMN revoked_reason text
    CHECK (revoked_reason IN ('basis-gone', 'identity-disabled', 'identity-offboarded'));
