//! Unit `role_bindings`: platform role bindings derived from the users table
//! (docs/seeding.md).
//!
//! Desired bindings: `platform_superadmin` for every active users row with `role = 'admin'`
//! (synced or not, as seed 000 does), and `identity.role_map` applied to the realm roles
//! recorded on each active row. A privilege never outlives its identity's standing: an inactive
//! row (disabled in Keycloak, or offboarded) is owed no binding. A missing one is granted with
//! `granted_by = 'seedkeeper'` and its basis; a seedkeeper binding that is no longer owed is
//! revoked (kept, status `revoked`, `revoked_at` set, `revoked_reason` saying why: the basis is
//! gone, the identity is disabled, or it is offboarded). Bindings granted by anyone else are
//! never touched, and an active one of theirs counts as present.
//! An event batch looks at its own users' bindings only ([`Scope`]). Reads `identity.role_map`.

use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Row, Transaction};

use crate::config::IdentitySettings;
use crate::error::Result;
use crate::reconcile::{analyze_if_written, settled_row, Action, FindingKind, Scope, Tally, Unit, UnitReport};
use crate::store::db_error;

const UNIT: Unit = Unit::RoleBindings;

pub(crate) const GRANTOR: &str = "seedkeeper";

/// The bindings the users rows in `scope` should have. `$1` realm roles and `$2` platform roles
/// of the role map (parallel arrays), `$3` the scope's ids; with the owner's username. One scan
/// of the users (0.15 s at a million rows, where the two of a union took twice that): the filter
/// is checked once per row while scanning, and only the rows it keeps (an admin, or a holder of
/// a mapped role: the overlap test `&&`) are joined with their bindings' bases.
fn desired(scope: &Scope) -> String {
    let only = scope.and("u.id", 3);
    format!(
        "SELECT u.id AS user_id, d.role_name, d.basis, u.username
            FROM users u CROSS JOIN LATERAL (
                SELECT 'platform_superadmin'::text AS role_name, 'users.role=admin'::text AS basis WHERE u.role = 'admin'
                UNION ALL
                SELECT m.platform_role, 'realm-role:' || m.realm_role
                    FROM unnest($1::text[], $2::text[]) AS m(realm_role, platform_role)
                    WHERE m.realm_role = ANY (u.realm_roles)) d
            WHERE u.is_active AND (u.role = 'admin' OR u.realm_roles && $1::text[]){only}"
    )
}

/// Why a seedkeeper binding is no longer owed (`platform_role_bindings.revoked_reason`), for
/// the binding `b` of the row `u`; NULL while it still is.
const REVOKE_REASON: &str = "CASE
        WHEN u.offboarded_at IS NOT NULL THEN 'identity-offboarded'
        WHEN NOT u.is_active THEN 'identity-disabled'
        WHEN (b.role_name = 'platform_superadmin' AND u.role = 'admin')
             OR EXISTS (SELECT 1 FROM unnest($1::text[], $2::text[]) AS m(realm_role, platform_role)
                        WHERE m.platform_role = b.role_name AND m.realm_role = ANY (u.realm_roles)) THEN NULL
        ELSE 'basis-gone' END";

/// Every input of the unit in one digest: the role map, then per table its row count and the
/// sum of its rows' 64-bit hashes, over the users columns the desired bindings and the
/// revocation reasons read and every binding (see [`settled_row`]). `$1` and `$2` the role
/// map. 0.2 s at a million users, where granting and revoking take 0.5 s.
const DIGEST: &str = "($1::text[])::text || ($2::text[])::text
    || ' ' || (SELECT count(*)::text || ' ' || coalesce(sum(hash_record_extended((id, role, is_active, realm_roles, offboarded_at IS NULL), 0)), 0) FROM users)
    || ' ' || (SELECT count(*)::text || ' ' || coalesce(sum(hash_record_extended((id, user_id, role_name, status, granted_by), 0)), 0) FROM platform_role_bindings)";

/// Grants the missing bindings and revokes the seedkeeper bindings whose basis is gone, listing
/// up to `listed` of each by key. `record`: an apply's unit records its state when it ends
/// settled (a full run's only: a batch looks at its own users).
pub(crate) async fn reconcile(
    tx: &Transaction<'_>,
    identity: &IdentitySettings,
    scope: &Scope,
    listed: i64,
    record: bool,
) -> Result<UnitReport> {
    let mut report = UnitReport::new(UNIT);
    let realm_roles: Vec<&str> = identity.role_map.keys().map(String::as_str).collect();
    let platform_roles: Vec<&str> = identity.role_map.values().map(String::as_str).collect();
    let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
        (&realm_roles, Type::TEXT_ARRAY),
        (&platform_roles, Type::TEXT_ARRAY),
    ];
    let whole = *scope == Scope::All;
    if whole {
        let sql = format!("SELECT {DIGEST}, (SELECT count(*) FROM platform_role_bindings WHERE status = 'active')");
        let context = "reading the digest of the bindings and users";
        if let Some(row) = settled_row(tx, UNIT, "", (&sql, &params), context).await? {
            // Nothing to grant or revoke: what the statements below would find.
            report.bump(Action::Inserted, 0);
            report.bump(Action::Revoked, 0);
            report.bump(Tally::Unchanged, row.get(1));
            report.state = record.then(|| row.get(0));
            return Ok(report);
        }
    }
    params.extend(scope.typed_params());
    let grant = (grant_sql(scope, listed), "granting platform role bindings");
    let granted = change(tx, grant, &params, FindingKind::Granted, &mut report).await?;
    let revoke = (revoke_sql(scope, listed), "revoking platform role bindings");
    let revoked = change(tx, revoke, &params, FindingKind::Revoked, &mut report).await?;
    report.bump(Action::Inserted, granted);
    report.bump(Action::Revoked, revoked);
    let active: i64 = tx
        .query_typed_one(
            &format!(
                "SELECT count(*) FROM platform_role_bindings b WHERE b.status = 'active'{}",
                scope.and("b.user_id", 1)
            ),
            &scope.typed_params(),
        )
        .await
        .map_err(db_error("counting bindings"))?
        .get(0);
    report.bump(Tally::Unchanged, (active - granted).max(0));
    if record {
        analyze_if_written(
            tx,
            "platform_role_bindings (user_id, role_name, status, basis)",
            granted + revoked,
        )
        .await?;
    }
    if whole && record {
        // Settled when, in one snapshot with the digest, nothing is left to grant or revoke.
        let row = tx
            .query_typed_one(
                &format!(
                    "SELECT (SELECT count(*) FROM ({}) g) + (SELECT count(*) FROM ({}) r), {DIGEST}",
                    to_grant(scope),
                    to_revoke(scope)
                ),
                &params,
            )
            .await
            .map_err(db_error("checking the bindings after writing them"))?;
        if row.get::<_, i64>(0) == 0 {
            report.state = row.get(1);
        }
    }
    Ok(report)
}

/// Runs a grant or a revocation statement and records its listed rows. Returns the count.
async fn change(
    tx: &Transaction<'_>,
    (sql, context): (String, &'static str),
    params: &[(&(dyn ToSql + Sync), Type)],
    kind: FindingKind,
    report: &mut UnitReport,
) -> Result<i64> {
    let rows = tx.query_typed(&sql, params).await.map_err(db_error(context))?;
    Ok(note(report, &rows, kind))
}

/// The desired bindings no active binding covers, granted, as rows of
/// `(count, username, role, basis)`, up to `listed`. The usernames come with the bindings to
/// grant (their scan of the users has them), not from a join of the users again with the rows
/// inserted: at a million users that join hashed the whole table for 0.3 s.
fn grant_sql(scope: &Scope, listed: i64) -> String {
    let to_grant = to_grant(scope);
    format!(
        "WITH x AS MATERIALIZED ({to_grant}),
              g AS (INSERT INTO platform_role_bindings (user_id, role_name, status, granted_by, basis)
                    SELECT user_id, role_name, 'active', '{GRANTOR}', basis FROM x
                    ON CONFLICT DO NOTHING RETURNING user_id, role_name, basis)
         SELECT count(*) OVER (), x.username, g.role_name, g.basis
         FROM g JOIN x ON x.user_id = g.user_id AND x.role_name = g.role_name
         ORDER BY x.username, g.role_name LIMIT {listed}"
    )
}

/// The desired bindings no active binding covers.
fn to_grant(scope: &Scope) -> String {
    let desired = desired(scope);
    format!(
        "SELECT DISTINCT ON (d.user_id, d.role_name) d.user_id, d.role_name, d.basis, d.username
         FROM ({desired}) d
         WHERE NOT EXISTS (SELECT 1 FROM platform_role_bindings b
                           WHERE b.user_id = d.user_id AND b.role_name = d.role_name AND b.status = 'active')
         ORDER BY d.user_id, d.role_name, d.basis"
    )
}

/// Active seedkeeper bindings no longer owed (basis gone, identity inactive), with their reason.
/// Per binding, whether it is still owed: O(bindings), not O(bindings x users).
fn to_revoke(scope: &Scope) -> String {
    let only = scope.and("b.user_id", 3);
    format!(
        "SELECT * FROM (SELECT b.id, {REVOKE_REASON} AS reason
                        FROM platform_role_bindings b JOIN users u ON u.id = b.user_id
                        WHERE b.status = 'active' AND b.granted_by = '{GRANTOR}'{only}) x
         WHERE x.reason IS NOT NULL"
    )
}

/// [`to_revoke`]'s bindings revoked with their reason, kept as rows, listed like [`grant_sql`].
fn revoke_sql(scope: &Scope, listed: i64) -> String {
    let to_revoke = to_revoke(scope);
    format!(
        "WITH r AS (UPDATE platform_role_bindings b SET status = 'revoked', revoked_at = now(), revoked_by = '{GRANTOR}',
                           revoked_reason = x.reason
                    FROM ({to_revoke}) x WHERE b.id = x.id RETURNING b.user_id, b.role_name, b.basis, x.reason)
         SELECT count(*) OVER (), u.username, r.role_name, r.basis, r.reason FROM r JOIN users u ON u.id = r.user_id
         ORDER BY u.username, r.role_name LIMIT {listed}"
    )
}

/// Records the listed grants or revocations, rows of `(count, username, role, basis)` and, for
/// revocations, the reason, as changes and (the first of them) findings. Returns the count.
fn note(report: &mut UnitReport, rows: &[Row], kind: FindingKind) -> i64 {
    let total: i64 = rows.first().map(|r| r.get(0)).unwrap_or(0);
    let mut keys = Vec::with_capacity(rows.len());
    for r in rows {
        let (username, role, basis): (String, String, Option<String>) =
            (r.get(1), r.get(2), r.get(3));
        let basis = basis.unwrap_or_default();
        let detail = if kind == FindingKind::Granted {
            format!("{role} (basis {basis})")
        } else {
            let reason: Option<String> = r.get(4);
            let why = match reason.as_deref() {
                Some("identity-offboarded") => {
                    "the user is gone from the realm (offboarded)".to_string()
                }
                Some("identity-disabled") => "the user is disabled in Keycloak".to_string(),
                _ => format!("its basis ({basis}) is gone"),
            };
            format!("{role}: {why}")
        };
        report.find(kind, format!("user:{username}"), detail);
        keys.push(format!("platform_role_bindings:{username}/{role}"));
    }
    let action = if kind == FindingKind::Granted {
        "grant"
    } else {
        "revoke"
    };
    report.add_changes(action, total, keys);
    total
}
