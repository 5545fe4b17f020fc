//! Unit `role_bindings`: platform role bindings derived from the users table (DESIGN rule 3).
//!
//! Desired bindings: `platform_superadmin` for every users row with `role = 'admin'` (synced or
//! not, as seed 000 does), and `identity.role_map` applied to the realm roles recorded on each
//! row. A missing one is granted with `granted_by = 'seedkeeper'` and its basis; a seedkeeper
//! binding whose basis is gone is revoked (kept, status `revoked`, `revoked_at` set). Bindings
//! granted by anyone else are never touched, and an active one of theirs counts as present.
//! Reads `identity.role_map`.

use tokio_postgres::Transaction;

use crate::config::IdentitySettings;
use crate::error::Result;
use crate::reconcile::{Finding, Mode, UnitReport};
use crate::store::ctx;

const UNIT: &str = "role_bindings";
pub const GRANTOR: &str = "seedkeeper";

/// `$1` realm roles and `$2` platform roles of the role map (parallel arrays).
const DESIRED: &str = "SELECT u.id AS user_id, 'platform_superadmin'::text AS role_name, 'users.role=admin'::text AS basis
        FROM users u WHERE u.role = 'admin'
    UNION ALL
    SELECT u.id, m.platform_role, 'realm-role:' || m.realm_role
        FROM users u JOIN unnest($1::text[], $2::text[]) AS m(realm_role, platform_role) ON m.realm_role = ANY (u.realm_roles)";

pub async fn reconcile(
    tx: &Transaction<'_>,
    identity: &IdentitySettings,
    mode: Mode,
) -> Result<UnitReport> {
    let mut report = UnitReport::new(UNIT);
    let realm_roles: Vec<&str> = identity.role_map.keys().map(String::as_str).collect();
    let platform_roles: Vec<&str> = identity.role_map.values().map(String::as_str).collect();

    let to_grant = format!(
        "SELECT DISTINCT ON (d.user_id, d.role_name) d.user_id, d.role_name, d.basis
         FROM ({DESIRED}) d
         WHERE NOT EXISTS (SELECT 1 FROM platform_role_bindings b
                           WHERE b.user_id = d.user_id AND b.role_name = d.role_name AND b.status = 'active')
         ORDER BY d.user_id, d.role_name, d.basis"
    );
    // Per binding, whether its basis still holds: O(bindings), not O(bindings x users).
    let to_revoke = format!(
        "SELECT b.id FROM platform_role_bindings b JOIN users u ON u.id = b.user_id
         WHERE b.status = 'active' AND b.granted_by = '{GRANTOR}'
           AND NOT ((b.role_name = 'platform_superadmin' AND u.role = 'admin')
                    OR EXISTS (SELECT 1 FROM unnest($1::text[], $2::text[]) AS m(realm_role, platform_role)
                               WHERE m.platform_role = b.role_name AND m.realm_role = ANY (u.realm_roles)))"
    );
    let (granted_rows, revoked_rows) = match mode {
        Mode::Apply => {
            let g = tx
                .query(
                    &format!(
                        "WITH g AS (INSERT INTO platform_role_bindings (user_id, role_name, status, granted_by, basis)
                                    SELECT user_id, role_name, 'active', '{GRANTOR}', basis FROM ({to_grant}) x
                                    ON CONFLICT DO NOTHING RETURNING user_id, role_name, basis)
                         SELECT count(*) OVER (), u.username, g.role_name, g.basis FROM g JOIN users u ON u.id = g.user_id
                         ORDER BY u.username LIMIT 50"
                    ),
                    &[&realm_roles, &platform_roles],
                )
                .await
                .map_err(ctx("granting platform role bindings"))?;
            let r = tx
                .query(
                    &format!(
                        "WITH r AS (UPDATE platform_role_bindings b SET status = 'revoked', revoked_at = now(), revoked_by = '{GRANTOR}'
                                    WHERE b.id IN ({to_revoke}) RETURNING b.user_id, b.role_name, b.basis)
                         SELECT count(*) OVER (), u.username, r.role_name, r.basis FROM r JOIN users u ON u.id = r.user_id
                         ORDER BY u.username LIMIT 50"
                    ),
                    &[&realm_roles, &platform_roles],
                )
                .await
                .map_err(ctx("revoking platform role bindings"))?;
            (g, r)
        }
        Mode::Plan => {
            let g = tx
                .query(
                    &format!("SELECT count(*) OVER (), u.username, x.role_name, x.basis FROM ({to_grant}) x JOIN users u ON u.id = x.user_id ORDER BY u.username LIMIT 50"),
                    &[&realm_roles, &platform_roles],
                )
                .await
                .map_err(ctx("planning platform role bindings"))?;
            let r = tx
                .query(
                    &format!(
                        "SELECT count(*) OVER (), u.username, b.role_name, b.basis FROM platform_role_bindings b JOIN users u ON u.id = b.user_id
                         WHERE b.id IN ({to_revoke}) ORDER BY u.username LIMIT 50"
                    ),
                    &[&realm_roles, &platform_roles],
                )
                .await
                .map_err(ctx("planning revocations"))?;
            (g, r)
        }
    };
    let granted: i64 = granted_rows.first().map(|r| r.get(0)).unwrap_or(0);
    let revoked: i64 = revoked_rows.first().map(|r| r.get(0)).unwrap_or(0);
    for r in &granted_rows {
        let (username, role, basis): (String, String, Option<String>) =
            (r.get(1), r.get(2), r.get(3));
        report.add_finding(Finding::new(
            UNIT,
            "granted",
            format!("user:{username}"),
            format!("{role} (basis {})", basis.unwrap_or_default()),
        ));
        if mode == Mode::Plan {
            report.add_change(format!("grant {role} to {username}"));
        }
    }
    for r in &revoked_rows {
        let (username, role, basis): (String, String, Option<String>) =
            (r.get(1), r.get(2), r.get(3));
        report.add_finding(Finding::new(
            UNIT,
            "revoked",
            format!("user:{username}"),
            format!("{role}: its basis ({}) is gone", basis.unwrap_or_default()),
        ));
        if mode == Mode::Plan {
            report.add_change(format!("revoke {role} from {username}"));
        }
    }
    report.bump("inserted", granted);
    report.bump("revoked", revoked);
    let active: i64 = tx
        .query_one(
            "SELECT count(*) FROM platform_role_bindings WHERE status = 'active'",
            &[],
        )
        .await
        .map_err(ctx("counting bindings"))?
        .get(0);
    let unchanged = if mode == Mode::Apply {
        active - granted
    } else {
        active - revoked
    };
    report.bump("unchanged", unchanged.max(0));
    Ok(report)
}
