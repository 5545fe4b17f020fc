-- db_schema_v1: the platform schema seedkeeper bootstraps.
-- Append-only: an applied file is checksummed; change the schema with a new V<n>__*.sql file.

CREATE TABLE users (
    id            uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Keycloak subject: opaque text (a UUID for local users, f:<component>:<name> for federated ones).
    keycloak_sub  text UNIQUE CHECK (keycloak_sub <> '' AND char_length(keycloak_sub) <= 255),
    username      text NOT NULL CHECK (username <> '' AND char_length(username) <= 255),
    email         text CHECK (char_length(email) <= 255),
    first_name    text CHECK (char_length(first_name) <= 255),
    last_name     text CHECK (char_length(last_name) <= 255),
    role          text NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    is_active     boolean NOT NULL DEFAULT true,
    -- The realm roles seedkeeper maps (identity.admin_roles and identity.role_map keys), effective
    -- (composites and groups resolved), sorted. Kept so bindings can be derived set-based.
    realm_roles   text[] NOT NULL DEFAULT '{}',
    synced_at     timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- Deferrable so a rename chain inside one realm (a -> b while b -> c) settles at commit.
    CONSTRAINT users_username_key UNIQUE (username) DEFERRABLE INITIALLY IMMEDIATE
);

CREATE TABLE tenants (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    kind           text NOT NULL CHECK (kind IN ('personal', 'organization')),
    owner_user_id  uuid REFERENCES users (id),
    slug           text NOT NULL UNIQUE,
    name           text NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    CHECK (kind <> 'personal' OR owner_user_id IS NOT NULL)
);
CREATE UNIQUE INDEX tenants_one_personal_per_owner ON tenants (owner_user_id) WHERE kind = 'personal';

CREATE TABLE projects (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    is_default  boolean NOT NULL DEFAULT false,
    slug        text NOT NULL,
    name        text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (tenant_id, slug)
);
CREATE UNIQUE INDEX projects_one_default_per_tenant ON projects (tenant_id) WHERE is_default;

CREATE TABLE tenant_memberships (
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    user_id     uuid NOT NULL REFERENCES users (id),
    role        text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    status      text NOT NULL CHECK (status IN ('active', 'invited', 'suspended', 'removed')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, user_id)
);
CREATE INDEX tenant_memberships_user ON tenant_memberships (user_id);

CREATE TABLE project_memberships (
    project_id  uuid NOT NULL REFERENCES projects (id),
    user_id     uuid NOT NULL REFERENCES users (id),
    role        text NOT NULL CHECK (role IN ('owner', 'admin', 'member', 'viewer')),
    status      text NOT NULL CHECK (status IN ('active', 'invited', 'suspended', 'removed')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (project_id, user_id)
);
CREATE INDEX project_memberships_user ON project_memberships (user_id);

CREATE TABLE sku_catalog (
    sku                     text PRIMARY KEY,
    vendor                  text NOT NULL,
    display_name            text NOT NULL,
    gpus                    integer NOT NULL CHECK (gpus > 0),
    gpu_hourly_price_minor  bigint NOT NULL CHECK (gpu_hourly_price_minor >= 0),
    resource_profile        jsonb,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE policy_definitions (
    key             text PRIMARY KEY,
    value_type      text NOT NULL CHECK (value_type IN ('integer', 'boolean', 'string')),
    default_value   jsonb NOT NULL,
    min_value       bigint,
    max_value       bigint,
    allowed_values  jsonb,
    description     text NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CHECK (min_value IS NULL OR max_value IS NULL OR min_value <= max_value)
);

CREATE TABLE policy_values (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    policy_key  text NOT NULL REFERENCES policy_definitions (key),
    scope_type  text NOT NULL CHECK (scope_type IN ('global', 'organization', 'tenant', 'project', 'user')),
    scope_id    uuid,
    value       jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    CHECK ((scope_type = 'global') = (scope_id IS NULL))
);
CREATE UNIQUE INDEX policy_values_one_global_per_key ON policy_values (policy_key) WHERE scope_type = 'global';
CREATE UNIQUE INDEX policy_values_one_per_scope ON policy_values (policy_key, scope_type, scope_id) WHERE scope_id IS NOT NULL;

CREATE TABLE pricing_plans (
    id            uuid PRIMARY KEY,
    name          text NOT NULL UNIQUE,
    display_name  text NOT NULL,
    is_default    boolean NOT NULL DEFAULT false,
    currency      text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    description   text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX pricing_plans_one_default ON pricing_plans (is_default) WHERE is_default;

CREATE TABLE platform_roles (
    name         text PRIMARY KEY,
    description  text NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE platform_role_versions (
    role_name   text NOT NULL REFERENCES platform_roles (name),
    version     integer NOT NULL CHECK (version > 0),
    is_active   boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (role_name, version)
);
CREATE UNIQUE INDEX platform_role_versions_one_active ON platform_role_versions (role_name) WHERE is_active;

CREATE TABLE platform_role_bindings (
    id          uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id     uuid NOT NULL REFERENCES users (id),
    role_name   text NOT NULL REFERENCES platform_roles (name),
    status      text NOT NULL CHECK (status IN ('active', 'revoked')),
    -- Who granted it: 'seedkeeper' for bindings this daemon manages; anything else is never touched by it.
    granted_by  text NOT NULL,
    -- Why seedkeeper granted it, e.g. 'users.role=admin' or 'realm-role:ops'.
    basis       text,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    revoked_by  text,
    CHECK ((status = 'revoked') = (revoked_at IS NOT NULL))
);
CREATE UNIQUE INDEX platform_role_bindings_one_active ON platform_role_bindings (user_id, role_name) WHERE status = 'active';

CREATE TABLE app_catalog (
    slug             text PRIMARY KEY,
    display_name     text NOT NULL,
    runtime_backend  text NOT NULL CHECK (runtime_backend IN ('bare_metal', 'slurm', 'rke2')),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE app_catalog_versions (
    app_slug    text NOT NULL REFERENCES app_catalog (slug),
    version     text NOT NULL,
    is_active   boolean NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (app_slug, version)
);
CREATE UNIQUE INDEX app_catalog_versions_one_active ON app_catalog_versions (app_slug) WHERE is_active;

CREATE TABLE seed_runs (
    id           uuid PRIMARY KEY,
    trigger      text NOT NULL,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz,
    outcome      text NOT NULL CHECK (outcome IN ('running', 'succeeded', 'failed', 'skipped')),
    seed_digest  text,
    counts       jsonb NOT NULL DEFAULT '{}',
    -- Per-entity findings: drift corrected, re-alignments, clashes, revocations, missing users, rejects.
    findings     jsonb NOT NULL DEFAULT '[]',
    error        text,
    host         text
);
CREATE INDEX seed_runs_started_at ON seed_runs (started_at DESC);
