//! Unit `reference_seed`: the SKU catalog, policy definitions and global values, pricing plans,
//! platform roles and versions, app catalog and versions.
//!
//! Each section is one table spec. The same SQL text serves the engine (input bound as `$1`)
//! and `seedkeeper export-sql` (input inlined as a literal), so the script and the daemon cannot
//! disagree. Input rows travel as one jsonb array and are unpacked with `jsonb_to_recordset`:
//! one statement per section, whatever the size. Writes only differing rows; never deletes.

use serde_json::{json, Value};
use tokio_postgres::types::Type;
use tokio_postgres::Transaction;

use crate::error::Result;
use crate::reconcile::{Action, FindingKind, Tally, Unit, UnitReport};
use crate::seed::{Ownership, ReferenceSeed};
use crate::store::db_error;

/// One seeded table: key columns, compared columns, and the column types for the recordset.
pub(crate) struct TableSpec {
    pub table: &'static str,
    pub keys: &'static [&'static str],
    pub cols: &'static [&'static str],
    /// `name type` for every key and column, in `jsonb_to_recordset` syntax.
    pub types: &'static str,
    /// Extra condition identifying the seeded rows among others (e.g. global scope).
    pub scope: Option<&'static str>,
    /// Extra columns inserted with constant values.
    pub insert_consts: &'static [(&'static str, &'static str)],
    /// Whether the table has `updated_at`.
    pub has_updated_at: bool,
}

pub(crate) const SKUS: TableSpec = TableSpec {
    table: "sku_catalog",
    keys: &["sku"],
    cols: &["vendor", "display_name", "gpus", "gpu_hourly_price_minor", "resource_profile"],
    types: "sku text, vendor text, display_name text, gpus integer, gpu_hourly_price_minor bigint, resource_profile jsonb",
    scope: None,
    insert_consts: &[],
    has_updated_at: true,
};

pub(crate) const POLICY_DEFINITIONS: TableSpec = TableSpec {
    table: "policy_definitions",
    keys: &["key"],
    cols: &["value_type", "default_value", "min_value", "max_value", "allowed_values", "description"],
    types: "key text, value_type text, default_value jsonb, min_value bigint, max_value bigint, allowed_values jsonb, description text",
    scope: None,
    insert_consts: &[],
    has_updated_at: true,
};

pub(crate) const POLICY_VALUES: TableSpec = TableSpec {
    table: "policy_values",
    keys: &["policy_key"],
    cols: &["value"],
    types: "policy_key text, value jsonb",
    scope: Some("scope_type = 'global'"),
    insert_consts: &[("scope_type", "'global'")],
    has_updated_at: true,
};

pub(crate) const PRICING_PLANS: TableSpec = TableSpec {
    table: "pricing_plans",
    keys: &["id"],
    cols: &[
        "name",
        "display_name",
        "is_default",
        "currency",
        "description",
    ],
    types:
        "id uuid, name text, display_name text, is_default boolean, currency text, description text",
    scope: None,
    insert_consts: &[],
    has_updated_at: true,
};

pub(crate) const PLATFORM_ROLES: TableSpec = TableSpec {
    table: "platform_roles",
    keys: &["name"],
    cols: &["description"],
    types: "name text, description text",
    scope: None,
    insert_consts: &[],
    has_updated_at: true,
};

pub(crate) const PLATFORM_ROLE_VERSIONS: TableSpec = TableSpec {
    table: "platform_role_versions",
    keys: &["role_name", "version"],
    cols: &["is_active"],
    types: "role_name text, version integer, is_active boolean",
    scope: None,
    insert_consts: &[],
    has_updated_at: false,
};

pub(crate) const APPS: TableSpec = TableSpec {
    table: "app_catalog",
    keys: &["slug"],
    cols: &["display_name", "runtime_backend"],
    types: "slug text, display_name text, runtime_backend text",
    scope: None,
    insert_consts: &[],
    has_updated_at: true,
};

pub(crate) const APP_VERSIONS: TableSpec = TableSpec {
    table: "app_catalog_versions",
    keys: &["app_slug", "version"],
    cols: &["is_active"],
    types: "app_slug text, version text, is_active boolean",
    scope: None,
    insert_consts: &[],
    has_updated_at: false,
};

/// A section ready to reconcile: its spec, ownership and input rows.
pub(crate) struct SectionInput {
    pub spec: &'static TableSpec,
    pub ownership: Ownership,
    pub rows: Value,
    /// Versions tables: other active versions of a seeded parent are deactivated first so the
    /// one-active index allows the seeded version to become active.
    pub deactivate_others: Option<(&'static str, &'static str)>,
}

/// The seed as sections, in foreign-key order.
pub(crate) fn sections(seed: &ReferenceSeed) -> Vec<SectionInput> {
    let d = &seed.data;
    vec![
        SectionInput {
            spec: &SKUS,
            ownership: d.sku_catalog.ownership,
            rows: json!(d.sku_catalog.items),
            deactivate_others: None,
        },
        SectionInput {
            spec: &POLICY_DEFINITIONS,
            ownership: d.policy_definitions.ownership,
            rows: json!(d.policy_definitions.items),
            deactivate_others: None,
        },
        SectionInput {
            spec: &POLICY_VALUES,
            ownership: d.policy_values.ownership,
            rows: json!(d
                .policy_values
                .items
                .iter()
                .map(|v| json!({"policy_key": v.policy_key, "value": v.value}))
                .collect::<Vec<_>>()),
            deactivate_others: None,
        },
        SectionInput {
            spec: &PRICING_PLANS,
            ownership: d.pricing_plans.ownership,
            rows: json!(d.pricing_plans.items),
            deactivate_others: None,
        },
        SectionInput {
            spec: &PLATFORM_ROLES,
            ownership: d.platform_roles.ownership,
            rows: json!(d
                .platform_roles
                .items
                .iter()
                .map(|r| json!({"name": r.name, "description": r.description}))
                .collect::<Vec<_>>()),
            deactivate_others: None,
        },
        SectionInput {
            spec: &PLATFORM_ROLE_VERSIONS,
            ownership: d.platform_roles.ownership,
            rows: json!(d
                .platform_roles
                .items
                .iter()
                .map(|r| json!({"role_name": r.name, "version": r.version, "is_active": true}))
                .collect::<Vec<_>>()),
            deactivate_others: Some(("role_name", "version")),
        },
        SectionInput {
            spec: &APPS,
            ownership: d.app_catalog.ownership,
            rows: json!(d
                .app_catalog
                .items
                .iter()
                .map(|a| json!({"slug": a.slug, "display_name": a.display_name, "runtime_backend": a.runtime_backend}))
                .collect::<Vec<_>>()),
            deactivate_others: None,
        },
        SectionInput {
            spec: &APP_VERSIONS,
            ownership: d.app_catalog.ownership,
            rows: json!(d
                .app_catalog
                .items
                .iter()
                .map(|a| json!({"app_slug": a.slug, "version": a.version, "is_active": true}))
                .collect::<Vec<_>>()),
            deactivate_others: Some(("app_slug", "version")),
        },
    ]
}

/// The statements of one section; `input` is `$1::jsonb` or an inlined literal.
pub(crate) struct SectionSql {
    pub diff: String,
    pub extra: String,
    pub deactivate: Option<String>,
    pub insert: String,
    pub update: String,
}

impl TableSpec {
    fn key_text(&self, alias: &str) -> String {
        self.keys
            .iter()
            .map(|k| format!("{alias}.{k}::text"))
            .collect::<Vec<_>>()
            .join(" || '/' || ")
    }

    fn join(&self, a: &str, b: &str) -> String {
        let mut parts: Vec<String> = self
            .keys
            .iter()
            .map(|k| format!("{a}.{k} = {b}.{k}"))
            .collect();
        if let Some(s) = self.scope {
            parts.push(format!("{a}.{s}"));
        }
        parts.join(" AND ")
    }

    fn tuple(&self, alias: &str) -> String {
        format!(
            "({})",
            self.cols
                .iter()
                .map(|c| format!("{alias}.{c}"))
                .collect::<Vec<_>>()
                .join(", ")
        )
    }

    pub(crate) fn sql(&self, input: &str, deactivate_others: Option<(&str, &str)>) -> SectionSql {
        let t = self.table;
        let src = format!("jsonb_to_recordset({input}) AS i({})", self.types);
        let diff = format!(
            "SELECT {key}, CASE WHEN t.{k0} IS NULL THEN 'missing' ELSE 'differs' END \
             FROM {src} LEFT JOIN {t} t ON {join} \
             WHERE t.{k0} IS NULL OR {tt} IS DISTINCT FROM {it} ORDER BY 1",
            key = self.key_text("i"),
            k0 = self.keys[0],
            join = self.join("t", "i"),
            tt = self.tuple("t"),
            it = self.tuple("i"),
        );
        let extra = format!(
            "SELECT {key} FROM {t} t WHERE {scope} NOT EXISTS (SELECT 1 FROM {src} WHERE {join}) ORDER BY 1",
            key = self.key_text("t"),
            scope = self.scope.map(|s| format!("t.{s} AND")).unwrap_or_default(),
            join = self.join("t", "i"),
        );
        let mut cols: Vec<&str> = self.keys.to_vec();
        cols.extend_from_slice(self.cols);
        let mut insert_cols: Vec<String> = cols.iter().map(|c| c.to_string()).collect();
        let mut insert_vals: Vec<String> = cols.iter().map(|c| format!("i.{c}")).collect();
        for (c, v) in self.insert_consts {
            insert_cols.push(c.to_string());
            insert_vals.push(v.to_string());
        }
        let insert = format!(
            "INSERT INTO {t} ({}) SELECT {} FROM {src} WHERE NOT EXISTS (SELECT 1 FROM {t} t WHERE {join}) \
             ON CONFLICT DO NOTHING RETURNING {key}",
            insert_cols.join(", "),
            insert_vals.join(", "),
            join = self.join("t", "i"),
            key = self.key_text(t),
        );
        let mut sets: Vec<String> = self.cols.iter().map(|c| format!("{c} = i.{c}")).collect();
        if self.has_updated_at {
            sets.push("updated_at = now()".into());
        }
        let update = format!(
            "UPDATE {t} t SET {} FROM {src} WHERE {join} AND {tt} IS DISTINCT FROM {it} RETURNING {key}",
            sets.join(", "),
            join = self.join("t", "i"),
            tt = self.tuple("t"),
            it = self.tuple("i"),
            key = self.key_text("t"),
        );
        let deactivate = deactivate_others.map(|(parent, version)| {
            format!(
                "UPDATE {t} t SET is_active = false FROM {src} \
                 WHERE t.{parent} = i.{parent} AND t.{version} <> i.{version} AND t.is_active AND i.is_active \
                 RETURNING {key}",
                key = self.key_text("t"),
            )
        });
        SectionSql {
            diff,
            extra,
            deactivate,
            insert,
            update,
        }
    }
}

const UNIT: Unit = Unit::ReferenceSeed;

/// Applies the whole reference seed inside `tx`, section by section (a plan's `tx` is rolled
/// back). The seed is small, so every change is listed (`_listed` is for the units whose changes
/// are as many as the users).
pub(crate) async fn reconcile(
    tx: &Transaction<'_>,
    seed: &ReferenceSeed,
    _listed: i64,
) -> Result<UnitReport> {
    let mut report = UnitReport::new(UNIT);
    for section in sections(seed) {
        let sql = section.spec.sql("$1::jsonb", section.deactivate_others);
        let diff = compare(tx, &section, &sql, &mut report).await?;
        apply(tx, &section, &sql, &diff, &mut report).await?;
    }
    Ok(report)
}

/// The keys of a section's seed rows that the table lacks and that differ from it.
struct SectionDiff {
    missing: Vec<String>,
    differs: Vec<String>,
}

impl SectionInput {
    fn total(&self) -> i64 {
        self.rows.as_array().map(Vec::len).unwrap_or(0) as i64
    }

    fn converge(&self) -> bool {
        self.ownership == Ownership::Converge
    }

    /// The evidence entity of one of its rows.
    fn entity(&self, key: &str) -> String {
        format!("{}:{key}", self.spec.table)
    }
}

/// Compares one section with its table: the rows to insert and the drift (reported either way,
/// corrected only where the seed owns the section), and the rows the seed no longer lists
/// (reported, kept).
async fn compare(
    tx: &Transaction<'_>,
    section: &SectionInput,
    sql: &SectionSql,
    report: &mut UnitReport,
) -> Result<SectionDiff> {
    let rows = &section.rows;
    let mut diff = SectionDiff {
        missing: Vec::new(),
        differs: Vec::new(),
    };
    for r in tx
        .query_typed(&sql.diff, &[(rows, Type::JSONB)])
        .await
        .map_err(db_error("comparing the reference seed"))?
    {
        let (key, state): (String, &str) = (r.get(0), r.get(1));
        match state {
            "missing" => diff.missing.push(key),
            _ => diff.differs.push(key),
        }
    }
    for r in tx
        .query_typed(&sql.extra, &[(rows, Type::JSONB)])
        .await
        .map_err(db_error("listing rows not in the seed"))?
    {
        let key: String = r.get(0);
        let detail = "kept; the seed no longer lists it";
        report.find(FindingKind::NotInSeed, section.entity(&key), detail);
        report.bump(Tally::NotInSeed, 1);
    }
    let (kind, detail) = if section.converge() {
        (
            FindingKind::DriftCorrected,
            "differs from the seed; converge: set back to the seed's values",
        )
    } else {
        (
            FindingKind::DriftKept,
            "differs from the seed; insert-missing: left as the admin set it",
        )
    };
    for key in &diff.differs {
        report.find(kind, section.entity(key), detail);
    }
    report.bump(Tally::Drift, diff.differs.len() as i64);
    Ok(diff)
}

/// Apply: superseded versions deactivated and drift corrected where the seed owns the section,
/// missing rows inserted (one that another row's unique value keeps out is reported `blocked`).
async fn apply(
    tx: &Transaction<'_>,
    section: &SectionInput,
    sql: &SectionSql,
    diff: &SectionDiff,
    report: &mut UnitReport,
) -> Result<()> {
    let rows = &section.rows;
    let mut updated = 0i64;
    if let (true, Some(stmt)) = (section.converge(), &sql.deactivate) {
        let deactivated = tx
            .query_typed(stmt, &[(rows, Type::JSONB)])
            .await
            .map_err(db_error("deactivating superseded versions"))?;
        for r in &deactivated {
            let key: String = r.get(0);
            let detail = "deactivated: the seed's version is the active one";
            report.find(FindingKind::DriftCorrected, section.entity(&key), detail);
            report.add_change("update", section.entity(&key));
        }
        report.bump(Tally::Drift, deactivated.len() as i64);
        updated += deactivated.len() as i64;
    }
    let inserted: Vec<String> = tx
        .query_typed(&sql.insert, &[(rows, Type::JSONB)])
        .await
        .map_err(db_error("inserting reference rows"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for key in &inserted {
        report.add_change("insert", section.entity(key));
    }
    for key in diff.missing.iter().filter(|k| !inserted.contains(k)) {
        report.find(
            FindingKind::Blocked,
            section.entity(key),
            "not inserted: another row holds one of its unique values (e.g. a second default plan); resolve by hand",
        );
        report.bump(Tally::Blocked, 1);
    }
    report.bump(Action::Inserted, inserted.len() as i64);
    let mut corrected = 0;
    if section.converge() {
        let n = tx
            .query_typed(&sql.update, &[(rows, Type::JSONB)])
            .await
            .map_err(db_error("correcting reference drift"))?;
        for r in &n {
            let key: String = r.get(0);
            report.add_change("update", section.entity(&key));
        }
        updated += n.len() as i64;
        corrected = diff.differs.len() as i64;
    }
    report.bump(Action::Updated, updated);
    let unchanged = section.total() - inserted.len() as i64 - corrected;
    report.bump(Tally::Unchanged, unchanged);
    Ok(())
}

/// `seedkeeper export-sql`: the same statements with the input inlined, in one transaction.
pub(crate) fn export_sql(seed: &ReferenceSeed) -> String {
    let mut out = String::new();
    out.push_str("-- seedkeeper reference seed, generated by `seedkeeper export-sql`.\n");
    out.push_str(&format!(
        "-- source: {}\n-- digest: {}\n",
        seed.source_name, seed.digest
    ));
    out.push_str(
        "-- Idempotent: inserts what is missing; sections owned by the seed (converge) also\n",
    );
    out.push_str(
        "-- correct differing rows. Nothing is deleted. Apply to a migrated database with\n",
    );
    out.push_str("--   psql -v ON_ERROR_STOP=1 -f seed.sql\n\nBEGIN;\n");
    for section in sections(seed) {
        let json = section.rows.to_string();
        let mut tag = "seed".to_string();
        while json.contains(&format!("${tag}$")) {
            tag.push('x');
        }
        let literal = format!("${tag}${json}${tag}$::jsonb");
        let sql = section.spec.sql(&literal, section.deactivate_others);
        let own = match section.ownership {
            Ownership::Converge => "converge",
            Ownership::InsertMissing => "insert-missing",
        };
        out.push_str(&format!("\n-- {} ({own})\n", section.spec.table));
        if section.ownership == Ownership::Converge {
            if let Some(d) = &sql.deactivate {
                out.push_str(&strip_returning(d));
            }
        }
        out.push_str(&strip_returning(&sql.insert));
        if section.ownership == Ownership::Converge {
            out.push_str(&strip_returning(&sql.update));
        }
    }
    out.push_str("\nCOMMIT;\n");
    out
}

fn strip_returning(stmt: &str) -> String {
    let s = match stmt.rfind(" RETURNING ") {
        Some(i) => &stmt[..i],
        None => stmt,
    };
    format!("{s};\n")
}
