//! The store's schema and its migrations (`PRAGMA user_version`: every change is a step
//! from the version found to [`SCHEMA_VERSION`], in one transaction), and the integrity
//! check run before a store is used.

use super::{db, SqliteStore};
use crate::StateError;

/// The schema this code writes. Bump it and add a step to `migrate` for every change.
pub const SCHEMA_VERSION: i64 = 3;

pub(super) const SCHEMA_V1: &str = "
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    mode TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER,
    outcome TEXT,
    predicted_final_s REAL
);
CREATE TABLE tasks (
    name TEXT PRIMARY KEY,
    phase TEXT NOT NULL,
    run_id INTEGER,
    updated_ms INTEGER NOT NULL,
    files_done INTEGER NOT NULL DEFAULT 0,
    files_total INTEGER NOT NULL DEFAULT 0,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER NOT NULL DEFAULT 0,
    last_success_ms INTEGER,
    last_error TEXT,
    last_error_ms INTEGER
);
CREATE TABLE passes (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id),
    task TEXT NOT NULL,
    kind TEXT NOT NULL,
    started_ms INTEGER NOT NULL,
    ended_ms INTEGER NOT NULL,
    files_changed INTEGER NOT NULL,
    bytes_changed INTEGER NOT NULL,
    bytes_literal INTEGER NOT NULL,
    wire_bytes INTEGER NOT NULL,
    entries_scanned INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    error TEXT
);
CREATE INDEX passes_task ON passes(task, id);
CREATE TABLE errors (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL,
    task TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    message TEXT NOT NULL
);
";

/// Version 2: a rerun records which mode it repeats (`presync` or `cutover`), so that a
/// rerun of that rerun repeats the same mode.
pub(super) const SCHEMA_V2: &str = "ALTER TABLE runs ADD COLUMN repeats TEXT;";

/// Version 3: a task's last-success stamp is the *start* of its last successful pass (a
/// `paths_from` command lists what changed since then, and a change made while that pass
/// ran must be listed again). Versions 1 and 2 wrote its end; the passes table has every
/// start, so the stamps are taken from there. The version also keeps an older cutover, which
/// would write end times again, off the store.
pub(super) const SCHEMA_V3: &str = "
UPDATE tasks SET last_success_ms = (
    SELECT p.started_ms FROM passes p
    WHERE p.task = tasks.name AND p.outcome = 'ok'
    ORDER BY p.id DESC LIMIT 1
) WHERE last_success_ms IS NOT NULL;
";

impl SqliteStore {
    /// `PRAGMA quick_check` before the store is used: damage in a page that the first
    /// queries do not touch would otherwise surface in the middle of a run (a pass that
    /// cannot be recorded). A plan's store is small, so reading it all costs milliseconds.
    pub(super) fn check(&self) -> Result<(), StateError> {
        let c = self.conn();
        let mut stmt = c.prepare("PRAGMA quick_check").map_err(self.err())?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(self.err())?;
        let mut problems = Vec::new();
        for row in rows {
            let line = row.map_err(self.err())?;
            if line != "ok" {
                problems.push(line);
            }
        }
        match problems.first() {
            None => Ok(()),
            Some(first) => Err(StateError::Damaged {
                path: self.path.clone(),
                reason: format!(
                    "integrity check: {first}{}",
                    if problems.len() > 1 { " …" } else { "" }
                ),
            }),
        }
    }

    pub(super) fn user_version(&self) -> Result<i64, StateError> {
        self.conn()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(self.err())
    }

    pub(super) fn migrate(&self) -> Result<(), StateError> {
        let found = self.user_version()?;
        if found > SCHEMA_VERSION {
            return Err(StateError::NewerSchema {
                path: self.path.clone(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        let mut c = self.conn();
        let tx = c.transaction().map_err(db(&self.path))?;
        if found < 1 {
            tx.execute_batch(SCHEMA_V1).map_err(db(&self.path))?;
        }
        if found < 2 {
            tx.execute_batch(SCHEMA_V2).map_err(db(&self.path))?;
        }
        if found < 3 {
            tx.execute_batch(SCHEMA_V3).map_err(db(&self.path))?;
        }
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(db(&self.path))?;
        tx.commit().map_err(db(&self.path))
    }
}
