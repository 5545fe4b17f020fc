-- Where the Keycloak event follower stands, one row per realm. For each of the two event
-- streams (user events, admin events): the time of the last event applied (epoch ms, as Keycloak
-- gives it) and the ids of the events applied at exactly that millisecond, so events sharing it
-- are neither lost nor applied twice. It survives restarts and is shared by replicas, which
-- apply batches under the run lock. `following` and `reason` say whether events are followed
-- and, when not, why (shown by `seedkeeper status`).
CREATE TABLE event_follower (
    realm        text PRIMARY KEY,
    user_time    bigint NOT NULL,
    user_ids     text[] NOT NULL DEFAULT '{}',
    admin_time   bigint NOT NULL,
    admin_ids    text[] NOT NULL DEFAULT '{}',
    following    boolean NOT NULL DEFAULT true,
    reason       text,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
