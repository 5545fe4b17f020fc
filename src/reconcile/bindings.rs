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

use tokio_postgres::types::ToSql;
use tokio_postgres::{Row, Transaction};

use crate::config::IdentitySettings;
use crate::error::Result;
use crate::reconcile::{
    Action, FindingKind, Mode, Scope, Tally, Unit, UnitReport, FINDINGS_PER_KIND,
};
use crate::store::ctx;

const UNIT: Unit = Unit::RoleBindings;

/// Grants and revocations listed by name, like findings; the counts stay exact.
const SAMPLE: usize = FINDINGS_PER_KIND;
pub const GRANTOR: &str = "seedkeeper";

/// The bindings the users rows in `scope` should have. `$1` realm roles and `$2` platform roles
/// of the role map (parallel arrays), `$3` the scope's ids.
fn desired(scope: &Scope) -> String {
    let only = scope.and("u.id", 3);
    format!(
        "SELECT u.id AS user_id, 'platform_superadmin'::text AS role_name, 'users.role=admin'::text AS basis
            FROM users u WHERE u.role = 'admin' AND u.is_active{only}
        UNION ALL
        SELECT u.id, m.platform_role, 'realm-role:' || m.realm_role
            FROM users u JOIN unnest($1::text[], $2::text[]) AS m(realm_role, platform_role)
                ON m.realm_role = ANY (u.realm_roles) AND u.is_active{only}"
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

/// Grants the missing bindings and revokes the seedkeeper bindings whose basis is gone (plan:
/// counts and lists them).
pub async fn reconcile(
    tx: &Transaction<'_>,
    identity: &IdentitySettings,
    scope: &Scope,
    mode: Mode,
) -> Result<UnitReport> {
    let mut report = UnitReport::new(UNIT);
    let realm_roles: Vec<&str> = identity.role_map.keys().map(String::as_str).collect();
    let platform_roles: Vec<&str> = identity.role_map.values().map(String::as_str).collect();
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&realm_roles, &platform_roles];
    params.extend(scope.params());
    let grant = grant_sql(mode, scope);
    let granted = change(tx, grant, &params, FindingKind::Granted, mode, &mut report).await?;
    let revoke = revoke_sql(mode, scope);
    let revoked = change(tx, revoke, &params, FindingKind::Revoked, mode, &mut report).await?;
    report.bump(Action::Inserted, granted);
    report.bump(Action::Revoked, revoked);
    let active: i64 = tx
        .query_one(
            &format!(
                "SELECT count(*) FROM platform_role_bindings b WHERE b.status = 'active'{}",
                scope.and("b.user_id", 1)
            ),
            &scope.params(),
        )
        .await
        .map_err(ctx("counting bindings"))?
        .get(0);
    let unchanged = match mode {
        Mode::Apply => active - granted,
        Mode::Plan => active - revoked,
    };
    report.bump(Tally::Unchanged, unchanged.max(0));
    Ok(report)
}

/// Runs a grant or a revocation statement and records its sampled rows. Returns the count.
async fn change(
    tx: &Transaction<'_>,
    (sql, context): (String, &'static str),
    params: &[&(dyn ToSql + Sync)],
    kind: FindingKind,
    mode: Mode,
    report: &mut UnitReport,
) -> Result<i64> {
    let rows = tx.query(&sql, params).await.map_err(ctx(context))?;
    Ok(note(report, &rows, kind, mode))
}

/// The desired bindings no active binding covers: granted (plan: listed), as rows of
/// `(count, username, role, basis)`; and what the statement does, for its errors.
fn grant_sql(mode: Mode, scope: &Scope) -> (String, &'static str) {
    let desired = desired(scope);
    let to_grant = format!(
        "SELECT DISTINCT ON (d.user_id, d.role_name) d.user_id, d.role_name, d.basis
         FROM ({desired}) d
         WHERE NOT EXISTS (SELECT 1 FROM platform_role_bindings b
                           WHERE b.user_id = d.user_id AND b.role_name = d.role_name AND b.status = 'active')
         ORDER BY d.user_id, d.role_name, d.basis"
    );
    match mode {
        Mode::Apply => (
            format!(
                "WITH g AS (INSERT INTO platform_role_bindings (user_id, role_name, status, granted_by, basis)
                            SELECT user_id, role_name, 'active', '{GRANTOR}', basis FROM ({to_grant}) x
                            ON CONFLICT DO NOTHING RETURNING user_id, role_name, basis)
                 SELECT count(*) OVER (), u.username, g.role_name, g.basis FROM g JOIN users u ON u.id = g.user_id
                 ORDER BY u.username LIMIT {SAMPLE}"
            ),
            "granting platform role bindings",
        ),
        Mode::Plan => (
            format!("SELECT count(*) OVER (), u.username, x.role_name, x.basis FROM ({to_grant}) x JOIN users u ON u.id = x.user_id ORDER BY u.username LIMIT {SAMPLE}"),
            "planning platform role bindings",
        ),
    }
}

/// Active seedkeeper bindings no longer owed (basis gone, identity inactive): revoked with
/// their reason, kept as rows (plan: listed), like [`grant_sql`]. Per binding, whether it is
/// still owed: O(bindings), not O(bindings x users).
fn revoke_sql(mode: Mode, scope: &Scope) -> (String, &'static str) {
    let only = scope.and("b.user_id", 3);
    let to_revoke = format!(
        "SELECT * FROM (SELECT b.id, {REVOKE_REASON} AS reason
                        FROM platform_role_bindings b JOIN users u ON u.id = b.user_id
                        WHERE b.status = 'active' AND b.granted_by = '{GRANTOR}'{only}) x
         WHERE x.reason IS NOT NULL"
    );
    match mode {
        Mode::Apply => (
            format!(
                "WITH r AS (UPDATE platform_role_bindings b SET status = 'revoked', revoked_at = now(), revoked_by = '{GRANTOR}',
                                   revoked_reason = x.reason
                            FROM ({to_revoke}) x WHERE b.id = x.id RETURNING b.user_id, b.role_name, b.basis, x.reason)
                 SELECT count(*) OVER (), u.username, r.role_name, r.basis, r.reason FROM r JOIN users u ON u.id = r.user_id
                 ORDER BY u.username LIMIT {SAMPLE}"
            ),
            "revoking platform role bindings",
        ),
        Mode::Plan => (
            format!(
                "SELECT count(*) OVER (), u.username, b.role_name, b.basis, x.reason
                 FROM ({to_revoke}) x JOIN platform_role_bindings b ON b.id = x.id JOIN users u ON u.id = b.user_id
                 ORDER BY u.username LIMIT {SAMPLE}"
            ),
            "planning revocations",
        ),
    }
}

/// Records the sampled grants or revocations, rows of `(count, username, role, basis)` and,
/// for revocations, the reason, as findings (and, in a plan, as changes). Returns the count.
fn note(report: &mut UnitReport, rows: &[Row], kind: FindingKind, mode: Mode) -> i64 {
    for r in rows {
        let (username, role, basis): (String, String, Option<String>) =
            (r.get(1), r.get(2), r.get(3));
        let basis = basis.unwrap_or_default();
        let (detail, change) = if kind == FindingKind::Granted {
            (
                format!("{role} (basis {basis})"),
                format!("grant {role} to {username}"),
            )
        } else {
            let reason: Option<String> = r.get(4);
            let why = match reason.as_deref() {
                Some("identity-offboarded") => {
                    "the user is gone from the realm (offboarded)".to_string()
                }
                Some("identity-disabled") => "the user is disabled in Keycloak".to_string(),
                _ => format!("its basis ({basis}) is gone"),
            };
            (
                format!("{role}: {why}"),
                format!("revoke {role} from {username}"),
            )
        };
        report.find(kind, format!("user:{username}"), detail);
        if mode == Mode::Plan {
            report.add_change(change);
        }
    }
    rows.first().map(|r| r.get(0)).unwrap_or(0)
}
