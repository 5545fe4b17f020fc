//! One integration test binary: real PostgreSQL (a database per test), the Keycloak emulator
//! for the keycloak source, and the real binary for exit codes and output.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

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
mod hardening;
mod identities;
mod lifecycle;
mod listing;
mod ops;
mod parsers;
mod pg_tls;
mod pooler;
mod progress;
mod realm_files;
mod retry;
mod runs;
mod signals;
mod trust;
