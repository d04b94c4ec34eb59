//! [`SqliteStore`]: the [`Store`] in one SQLite file in WAL mode (readers such as `status`
//! never block the runner), and the lock file that keeps a second runner off the same
//! plan. Its schema, migrations and integrity check are in `sqlite/schema.rs`.

use crate::{
    now_ms, Millis, Outcome, PassRecord, Phase, Progress, RunId, RunInfo, StateError, Store,
    TaskState,
};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, Row};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

mod schema;
pub use schema::SCHEMA_VERSION;

/// The store in SQLite. One connection behind a mutex: the runner's writes are few (phase
/// changes, a progress row a second per task, one row per pass), so a pool would buy nothing.
pub struct SqliteStore {
    conn: Mutex<Connection>,
    path: PathBuf,
    /// Held (flock) for as long as the store is open for writing.
    _lock: Option<std::fs::File>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SqliteStore({})", self.path.display())
    }
}

impl SqliteStore {
    /// Open (creating it and its directory if needed) for a runner: takes the plan's lock,
    /// so a second runner gets [`StateError::Busy`] instead of interleaving its passes.
    pub fn open(path: &Path) -> Result<SqliteStore, StateError> {
        let io = |source| StateError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let lock = take_lock(path)?;
        // SQLite follows symlinks and writes into whatever it opens: the database and its
        // companions must be regular files or absent.
        for suffix in ["", "-wal", "-shm", "-journal"] {
            let mut p = path.as_os_str().to_owned();
            p.push(suffix);
            cofs::safe_write::check(Path::new(&p), cofs::safe_write::Purpose::Write)?;
        }
        let conn = Connection::open(path).map_err(db(path))?;
        let store = SqliteStore::with(conn, path, Some(lock))?;
        {
            let c = store.conn();
            // WAL: `status` reads while the runner writes. FULL: a committed pass record
            // (and its last-success stamp) survives a power cut, not just a crash.
            c.pragma_update(None, "journal_mode", "WAL")
                .map_err(db(path))?;
            c.pragma_update(None, "synchronous", "FULL")
                .map_err(db(path))?;
        }
        store.check()?;
        store.migrate()?;
        Ok(store)
    }

    /// Open an existing store to read it (`status`), without the runner's lock.
    pub fn open_read_only(path: &Path) -> Result<SqliteStore, StateError> {
        if !path.exists() {
            return Err(StateError::NotFound {
                path: path.to_path_buf(),
            });
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(db(path))?;
        let store = SqliteStore::with(conn, path, None)?;
        store.check()?;
        let found = store.user_version()?;
        if found > SCHEMA_VERSION {
            return Err(StateError::NewerSchema {
                path: path.to_path_buf(),
                found,
                known: SCHEMA_VERSION,
            });
        }
        if found == 0 {
            return Err(StateError::NotFound {
                path: path.to_path_buf(),
            });
        }
        Ok(store)
    }

    /// A store that lives in memory only (a dry run records nothing on disk).
    pub fn in_memory() -> Result<SqliteStore, StateError> {
        let path = Path::new(":memory:");
        let conn = Connection::open_in_memory().map_err(db(path))?;
        let store = SqliteStore::with(conn, path, None)?;
        store.migrate()?;
        Ok(store)
    }

    fn with(
        conn: Connection,
        path: &Path,
        lock: Option<std::fs::File>,
    ) -> Result<SqliteStore, StateError> {
        // A reader may meet a checkpoint in progress; wait rather than fail.
        conn.busy_timeout(Duration::from_secs(10))
            .map_err(db(path))?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite half-written (transactions
        // roll back on drop), so a poisoned mutex is still a usable connection.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> StateError + '_ {
        db(&self.path)
    }

    fn run_row(r: &Row<'_>) -> rusqlite::Result<RunInfo> {
        Ok(RunInfo {
            id: r.get(0)?,
            mode: r.get(1)?,
            fingerprint: r.get(2)?,
            pid: r.get(3)?,
            started_ms: r.get(4)?,
            ended_ms: r.get(5)?,
            outcome: r.get(6)?,
            predicted_final_s: r.get(7)?,
            repeats: r.get(8)?,
        })
    }

    fn pass_row(r: &Row<'_>) -> rusqlite::Result<(PassRecord, String, Option<String>)> {
        let outcome: String = r.get(11)?;
        let error: Option<String> = r.get(12)?;
        Ok((
            PassRecord {
                run: r.get(0)?,
                task: r.get(1)?,
                kind: r.get(2)?,
                started_ms: r.get(3)?,
                ended_ms: r.get(4)?,
                files_changed: get_u64(r, 5)?,
                bytes_changed: get_u64(r, 6)?,
                bytes_literal: get_u64(r, 7)?,
                wire_bytes: get_u64(r, 8)?,
                entries_scanned: get_u64(r, 9)?,
                deleted: get_u64(r, 10)?,
                outcome: Outcome::Ok,
            },
            outcome,
            error,
        ))
    }

    fn finish_pass(
        &self,
        (mut p, outcome, error): (PassRecord, String, Option<String>),
    ) -> Result<PassRecord, StateError> {
        p.outcome = match outcome.as_str() {
            "ok" => Outcome::Ok,
            "failed" => Outcome::Failed(error.unwrap_or_default()),
            "interrupted" => Outcome::Interrupted,
            _ => {
                return Err(StateError::Corrupt {
                    path: self.path.clone(),
                    what: "pass outcome",
                    value: outcome,
                })
            }
        };
        Ok(p)
    }
}

const RUN_COLUMNS: &str =
    "id, mode, fingerprint, pid, started_ms, ended_ms, outcome, predicted_final_s, repeats";

const PASS_COLUMNS: &str = "run_id, task, kind, started_ms, ended_ms, files_changed, \
    bytes_changed, bytes_literal, wire_bytes, entries_scanned, deleted, outcome, error";

fn get_u64(r: &Row<'_>, i: usize) -> rusqlite::Result<u64> {
    // SQLite integers are i64; counters never go negative, and a corrupt negative one
    // reads as 0 rather than as an enormous number.
    r.get::<_, i64>(i).map(|v| v.max(0) as u64)
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn db(path: &Path) -> impl Fn(rusqlite::Error) -> StateError + '_ {
    move |source| {
        use rusqlite::ErrorCode::{DatabaseCorrupt, NotADatabase};
        match source.sqlite_error_code() {
            Some(DatabaseCorrupt | NotADatabase) => StateError::Damaged {
                path: path.to_path_buf(),
                reason: source.to_string(),
            },
            _ => StateError::Db {
                path: path.to_path_buf(),
                source,
            },
        }
    }
}

/// `flock` a file beside the database for as long as the runner lives; the kernel drops the
/// lock when the process dies, so a crashed runner never leaves a stale lock behind.
fn take_lock(path: &Path) -> Result<std::fs::File, StateError> {
    let lock_path = path.with_extension("lock");
    let io = |source| StateError::Io {
        path: lock_path.clone(),
        source,
    };
    let mut file = cofs::safe_write::open_lock(&lock_path, 0o644)?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let holder = holder.trim();
        return Err(StateError::Busy {
            path: path.to_path_buf(),
            holder: if holder.is_empty() {
                "unknown process".into()
            } else {
                holder.to_string()
            },
        });
    }
    file.set_len(0).map_err(io)?;
    file.rewind().map_err(io)?;
    writeln!(file, "pid {}", std::process::id()).map_err(io)?;
    Ok(file)
}

impl Store for SqliteStore {
    fn fingerprint(&self) -> Result<Option<String>, StateError> {
        self.conn()
            .query_row(
                "SELECT value FROM meta WHERE key = 'plan_fingerprint'",
                [],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())
    }

    fn begin_run(
        &self,
        mode: &str,
        fingerprint: &str,
        tasks: &[&str],
    ) -> Result<RunId, StateError> {
        let now = now_ms();
        let mut c = self.conn();
        let tx = c.transaction().map_err(db(&self.path))?;
        let e = db(&self.path);
        // We hold the lock: any run without an end belongs to a runner that died.
        tx.execute(
            "UPDATE runs SET ended_ms = ?1, outcome = 'interrupted' WHERE ended_ms IS NULL",
            params![now],
        )
        .map_err(&e)?;
        tx.execute(
            "UPDATE tasks SET phase = 'interrupted', updated_ms = ?1
             WHERE phase IN ('running', 'verifying')",
            params![now],
        )
        .map_err(&e)?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('plan_fingerprint', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            params![fingerprint],
        )
        .map_err(&e)?;
        tx.execute(
            "INSERT INTO runs (mode, fingerprint, pid, started_ms) VALUES (?1, ?2, ?3, ?4)",
            params![mode, fingerprint, std::process::id(), now],
        )
        .map_err(&e)?;
        let run = tx.last_insert_rowid();
        for t in tasks {
            tx.execute(
                "INSERT INTO tasks (name, phase, updated_ms) VALUES (?1, 'pending', ?2)
                 ON CONFLICT(name) DO NOTHING",
                params![t, now],
            )
            .map_err(&e)?;
        }
        tx.commit().map_err(&e)?;
        Ok(run)
    }

    fn end_run(&self, run: RunId, outcome: &str) -> Result<(), StateError> {
        self.conn()
            .execute(
                "UPDATE runs SET ended_ms = ?1, outcome = ?2 WHERE id = ?3",
                params![now_ms(), outcome, run],
            )
            .map(drop)
            .map_err(self.err())
    }

    fn set_prediction(&self, run: RunId, predicted_final_s: f64) -> Result<(), StateError> {
        self.conn()
            .execute(
                "UPDATE runs SET predicted_final_s = ?1 WHERE id = ?2",
                params![predicted_final_s, run],
            )
            .map(drop)
            .map_err(self.err())
    }

    fn set_repeats(&self, run: RunId, mode: &str) -> Result<(), StateError> {
        self.conn()
            .execute(
                "UPDATE runs SET repeats = ?1 WHERE id = ?2",
                params![mode, run],
            )
            .map(drop)
            .map_err(self.err())
    }

    fn set_phase(&self, run: RunId, task: &str, phase: Phase) -> Result<(), StateError> {
        // A new pass starts with fresh progress; other phases keep the last figures.
        let reset = phase == Phase::Running;
        self.conn()
            .execute(
                "INSERT INTO tasks (name, phase, run_id, updated_ms) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(name) DO UPDATE SET phase = excluded.phase,
                    run_id = excluded.run_id, updated_ms = excluded.updated_ms,
                    files_done = CASE WHEN ?5 THEN 0 ELSE files_done END,
                    files_total = CASE WHEN ?5 THEN 0 ELSE files_total END,
                    bytes_done = CASE WHEN ?5 THEN 0 ELSE bytes_done END,
                    bytes_total = CASE WHEN ?5 THEN 0 ELSE bytes_total END",
                params![task, phase.as_str(), run, now_ms(), reset],
            )
            .map(drop)
            .map_err(self.err())
    }

    fn set_progress(&self, task: &str, p: Progress) -> Result<(), StateError> {
        self.conn()
            .execute(
                "UPDATE tasks SET files_done = ?1, files_total = ?2, bytes_done = ?3,
                    bytes_total = ?4, updated_ms = ?5 WHERE name = ?6",
                params![
                    to_i64(p.files_done),
                    to_i64(p.files_total),
                    to_i64(p.bytes_done),
                    to_i64(p.bytes_total),
                    now_ms(),
                    task
                ],
            )
            .map(drop)
            .map_err(self.err())
    }

    fn record_pass(&self, p: &PassRecord) -> Result<i64, StateError> {
        let mut c = self.conn();
        let e = db(&self.path);
        let tx = c.transaction().map_err(&e)?;
        let error = match &p.outcome {
            Outcome::Failed(m) => Some(m.as_str()),
            _ => None,
        };
        tx.execute(
            &format!(
                "INSERT INTO passes ({PASS_COLUMNS})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)"
            ),
            params![
                p.run,
                p.task,
                p.kind,
                p.started_ms,
                p.ended_ms,
                to_i64(p.files_changed),
                to_i64(p.bytes_changed),
                to_i64(p.bytes_literal),
                to_i64(p.wire_bytes),
                to_i64(p.entries_scanned),
                to_i64(p.deleted),
                p.outcome.as_str(),
                error
            ],
        )
        .map_err(&e)?;
        let id = tx.last_insert_rowid();
        let now = now_ms();
        match &p.outcome {
            // The last-success stamp is only ever written here, with the pass that earns it,
            // and it is the pass's start: whatever changed after that moment (even while the
            // pass ran) is newer than the stamp, so the next pass's `paths_from` lists it.
            Outcome::Ok => tx.execute(
                "UPDATE tasks SET phase = 'done', run_id = ?1, updated_ms = ?2,
                    last_success_ms = ?3 WHERE name = ?4",
                params![p.run, now, p.started_ms, p.task],
            ),
            Outcome::Failed(m) => {
                tx.execute(
                    "INSERT INTO errors (run_id, task, at_ms, message) VALUES (?1, ?2, ?3, ?4)",
                    params![p.run, p.task, p.ended_ms, m],
                )
                .map_err(&e)?;
                tx.execute(
                    "UPDATE tasks SET phase = 'failed', run_id = ?1, updated_ms = ?2,
                        last_error = ?3, last_error_ms = ?4 WHERE name = ?5",
                    params![p.run, now, m, p.ended_ms, p.task],
                )
            }
            Outcome::Interrupted => tx.execute(
                "UPDATE tasks SET phase = 'interrupted', run_id = ?1, updated_ms = ?2
                 WHERE name = ?3",
                params![p.run, now, p.task],
            ),
        }
        .map_err(&e)?;
        tx.commit().map_err(&e)?;
        Ok(id)
    }

    fn record_error(&self, run: RunId, task: &str, message: &str) -> Result<(), StateError> {
        let mut c = self.conn();
        let e = db(&self.path);
        let tx = c.transaction().map_err(&e)?;
        let now = now_ms();
        tx.execute(
            "INSERT INTO errors (run_id, task, at_ms, message) VALUES (?1, ?2, ?3, ?4)",
            params![run, task, now, message],
        )
        .map_err(&e)?;
        tx.execute(
            "UPDATE tasks SET last_error = ?1, last_error_ms = ?2 WHERE name = ?3",
            params![message, now, task],
        )
        .map_err(&e)?;
        tx.commit().map_err(&e)
    }

    fn tasks(&self) -> Result<Vec<TaskState>, StateError> {
        let rows: Vec<(TaskState, String)> = {
            let c = self.conn();
            let mut st = c
                .prepare(
                    "SELECT name, phase, run_id, updated_ms, files_done, files_total, bytes_done,
                        bytes_total, last_success_ms, last_error, last_error_ms
                     FROM tasks ORDER BY name",
                )
                .map_err(self.err())?;
            let it = st
                .query_map([], |r| {
                    Ok((
                        TaskState {
                            name: r.get(0)?,
                            phase: Phase::Pending,
                            run: r.get(2)?,
                            updated_ms: r.get(3)?,
                            progress: Progress {
                                files_done: get_u64(r, 4)?,
                                files_total: get_u64(r, 5)?,
                                bytes_done: get_u64(r, 6)?,
                                bytes_total: get_u64(r, 7)?,
                            },
                            last_success_ms: r.get::<_, Option<Millis>>(8)?,
                            last_error: r.get(9)?,
                            last_error_ms: r.get(10)?,
                            last_pass: None,
                        },
                        r.get::<_, String>(1)?,
                    ))
                })
                .map_err(self.err())?;
            it.collect::<Result<_, _>>().map_err(self.err())?
        };
        let mut out = Vec::with_capacity(rows.len());
        for (mut t, phase) in rows {
            t.phase = Phase::parse(&phase).ok_or_else(|| StateError::Corrupt {
                path: self.path.clone(),
                what: "phase",
                value: phase,
            })?;
            let last = self
                .conn()
                .query_row(
                    &format!(
                        "SELECT {PASS_COLUMNS} FROM passes WHERE task = ?1 ORDER BY id DESC LIMIT 1"
                    ),
                    params![t.name],
                    SqliteStore::pass_row,
                )
                .optional()
                .map_err(self.err())?;
            t.last_pass = last.map(|l| self.finish_pass(l)).transpose()?;
            out.push(t);
        }
        Ok(out)
    }

    fn stamp(&self, task: &str) -> Result<Option<Millis>, StateError> {
        self.conn()
            .query_row(
                "SELECT last_success_ms FROM tasks WHERE name = ?1",
                params![task],
                |r| r.get::<_, Option<Millis>>(0),
            )
            .optional()
            .map(Option::flatten)
            .map_err(self.err())
    }

    fn passes(&self, task: &str) -> Result<Vec<PassRecord>, StateError> {
        let rows: Vec<_> = {
            let c = self.conn();
            let mut st = c
                .prepare(&format!(
                    "SELECT {PASS_COLUMNS} FROM passes WHERE task = ?1 ORDER BY id"
                ))
                .map_err(self.err())?;
            let it = st
                .query_map(params![task], SqliteStore::pass_row)
                .map_err(self.err())?;
            it.collect::<Result<_, _>>().map_err(self.err())?
        };
        rows.into_iter().map(|r| self.finish_pass(r)).collect()
    }

    fn last_run(&self) -> Result<Option<RunInfo>, StateError> {
        self.conn()
            .query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs ORDER BY id DESC LIMIT 1"),
                [],
                SqliteStore::run_row,
            )
            .optional()
            .map_err(self.err())
    }

    fn run(&self, id: RunId) -> Result<Option<RunInfo>, StateError> {
        self.conn()
            .query_row(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                params![id],
                SqliteStore::run_row,
            )
            .optional()
            .map_err(self.err())
    }
}

#[cfg(test)]
mod tests;
