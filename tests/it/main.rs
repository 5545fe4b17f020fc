//! One integration test binary: real PostgreSQL (a database per test), the Keycloak emulator
//! for the keycloak source, and the real binary for exit codes and output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

mod bulk_keys;
mod config_faults;
mod conformance;
mod conformance_events;
mod conformance_realms;
mod core;
mod daemon;
mod dashboard;
mod deadlines;
mod emulator;
mod emulator_vs_real;
mod events;
mod evidence;
mod hardening;
mod identities;
mod io_faults;
mod lifecycle;
mod listing;
mod memory;
mod offboard_limit;
mod ops;
mod parsers;
mod pg_tls;
mod plan_exact;
mod pooler;
mod progress;
mod read_only;
mod realm_files;
mod retry;
mod runs;
mod schema_check;
mod settled;
mod sighup;
mod signals;
mod trust;
