//! Tests of the SQLite store: locking, schema versions and migrations, round trips.

use super::schema::{SCHEMA_V1, SCHEMA_V2};
use super::*;

#[test]
fn lock_and_database_are_never_opened_through_a_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious\n").unwrap();
    let path = dir.path().join("state.db");
    std::os::unix::fs::symlink(&victim, dir.path().join("state.lock")).unwrap();
    let e = SqliteStore::open(&path).unwrap_err().to_string();
    assert!(
        e.contains("state.lock: is a symlink, not a regular file"),
        "{e}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious\n");
    std::fs::remove_file(dir.path().join("state.lock")).unwrap();
    std::os::unix::fs::symlink(&victim, &path).unwrap();
    let e = SqliteStore::open(&path).unwrap_err().to_string();
    assert!(
        e.contains("state.db: is a symlink, not a regular file"),
        "{e}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious\n");
}

fn pass(run: RunId, task: &str, outcome: Outcome, files: u64) -> PassRecord {
    PassRecord {
        run,
        task: task.into(),
        kind: "presync".into(),
        started_ms: 1_000,
        ended_ms: 3_500,
        files_changed: files,
        bytes_changed: files * 100,
        bytes_literal: files * 50,
        wire_bytes: 7,
        entries_scanned: 42,
        deleted: 1,
        outcome,
    }
}

#[test]
fn schema_is_versioned_and_wal() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sub/state.db");
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.user_version().unwrap(), SCHEMA_VERSION);
    let mode: String = s
        .conn()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    drop(s);
    // Reopening migrates nothing and keeps the version.
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.user_version().unwrap(), SCHEMA_VERSION);
}

#[test]
fn newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let c = Connection::open(&path).unwrap();
        c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
            .unwrap();
    }
    let e = SqliteStore::open(&path).unwrap_err();
    assert!(matches!(e, StateError::NewerSchema { .. }), "{e}");
    let e = SqliteStore::open_read_only(&path).unwrap_err();
    assert!(e.to_string().contains("newer cutover"), "{e}");
}

#[test]
fn second_writer_is_busy_and_names_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let first = SqliteStore::open(&path).unwrap();
    let e = SqliteStore::open(&path).unwrap_err();
    match &e {
        StateError::Busy { holder, .. } => {
            assert_eq!(holder, &format!("pid {}", std::process::id()))
        }
        other => panic!("expected Busy, got {other}"),
    }
    // A reader is never refused.
    let reader = SqliteStore::open_read_only(&path).unwrap();
    assert!(reader.last_run().unwrap().is_none());
    drop(first);
    SqliteStore::open(&path).unwrap();
}

#[test]
fn passes_stamps_and_errors_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.fingerprint().unwrap(), None);
    let run = s.begin_run("presync", "fp1", &["a", "b"]).unwrap();
    assert_eq!(s.fingerprint().unwrap().as_deref(), Some("fp1"));
    s.set_phase(run, "a", Phase::Running).unwrap();
    s.set_progress(
        "a",
        Progress {
            files_done: 1,
            files_total: 2,
            bytes_done: 10,
            bytes_total: 20,
        },
    )
    .unwrap();
    let reader = SqliteStore::open_read_only(&path).unwrap();
    let a = &reader.tasks().unwrap()[0];
    assert_eq!((a.name.as_str(), a.phase), ("a", Phase::Running));
    assert_eq!(a.progress.bytes_total, 20);
    assert_eq!(a.last_success_ms, None);

    s.record_pass(&pass(run, "a", Outcome::Ok, 3)).unwrap();
    s.record_pass(&pass(run, "b", Outcome::Failed("boom".into()), 0))
        .unwrap();
    let t = reader.tasks().unwrap();
    assert_eq!(t[0].phase, Phase::Done);
    // The stamp is the start of the pass that earned it, not its end.
    assert_eq!(t[0].last_success_ms, Some(1_000));
    assert_eq!(reader.stamp("a").unwrap(), Some(1_000));
    assert_eq!(reader.stamp("b").unwrap(), None);
    assert_eq!(reader.stamp("nope").unwrap(), None);
    assert_eq!(t[0].last_pass.as_ref().unwrap().files_changed, 3);
    assert_eq!(t[1].phase, Phase::Failed);
    assert_eq!(t[1].last_error.as_deref(), Some("boom"));
    assert_eq!(t[1].last_success_ms, None);
    assert_eq!(
        reader.passes("b").unwrap()[0].outcome,
        Outcome::Failed("boom".into())
    );
    assert_eq!(reader.passes("a").unwrap()[0].duration_s(), 2.5);
    s.set_prediction(run, 12.5).unwrap();
    s.end_run(run, "ok").unwrap();
    let r = reader.last_run().unwrap().unwrap();
    assert_eq!(
        (r.mode.as_str(), r.outcome.as_deref(), r.predicted_final_s),
        ("presync", Some("ok"), Some(12.5))
    );
}

#[test]
fn a_failed_insert_writes_no_stamp() {
    // The pass row and the stamp share a transaction: when the pass cannot be written,
    // the task must not look synced.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let s = SqliteStore::open(&path).unwrap();
    let run = s.begin_run("presync", "fp", &["a"]).unwrap();
    s.conn()
        .execute_batch(
            "CREATE TRIGGER no_passes BEFORE INSERT ON passes
             BEGIN SELECT RAISE(ABORT, 'disk full'); END;",
        )
        .unwrap();
    assert!(s.record_pass(&pass(run, "a", Outcome::Ok, 1)).is_err());
    let t = &s.tasks().unwrap()[0];
    assert_eq!(t.last_success_ms, None);
    assert_eq!(t.phase, Phase::Pending);
}

#[test]
fn failed_and_interrupted_passes_keep_the_stamp() {
    let dir = tempfile::tempdir().unwrap();
    let s = SqliteStore::open(&dir.path().join("state.db")).unwrap();
    let run = s.begin_run("presync", "fp", &["a"]).unwrap();
    s.record_pass(&pass(run, "a", Outcome::Ok, 1)).unwrap();
    let mut later = pass(run, "a", Outcome::Failed("pre_pass failed".into()), 0);
    (later.started_ms, later.ended_ms) = (5_000, 6_000);
    s.record_pass(&later).unwrap();
    later.outcome = Outcome::Interrupted;
    s.record_pass(&later).unwrap();
    assert_eq!(s.stamp("a").unwrap(), Some(1_000));
    later.outcome = Outcome::Ok;
    s.record_pass(&later).unwrap();
    assert_eq!(s.stamp("a").unwrap(), Some(5_000));
}

#[test]
fn a_schema_2_store_gets_start_stamps() {
    // Schema 2 stamped the end of the last successful pass; 3 takes its start from the
    // passes table (a failed pass after it does not count).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(SCHEMA_V1).unwrap();
        c.execute_batch(SCHEMA_V2).unwrap();
        c.execute_batch(
            "INSERT INTO runs (mode, fingerprint, pid, started_ms) VALUES ('presync', 'fp', 1, 1);
             INSERT INTO passes (run_id, task, kind, started_ms, ended_ms, files_changed,
                bytes_changed, bytes_literal, wire_bytes, entries_scanned, deleted, outcome)
             VALUES (1, 'a', 'presync', 1000, 2000, 0, 0, 0, 0, 0, 0, 'ok'),
                    (1, 'a', 'presync', 3000, 4000, 0, 0, 0, 0, 0, 0, 'ok'),
                    (1, 'a', 'presync', 5000, 6000, 0, 0, 0, 0, 0, 0, 'failed');
             INSERT INTO tasks (name, phase, updated_ms, last_success_ms)
             VALUES ('a', 'failed', 6000, 4000), ('b', 'pending', 1, NULL);",
        )
        .unwrap();
        c.pragma_update(None, "user_version", 2).unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.user_version().unwrap(), SCHEMA_VERSION);
    assert_eq!(s.stamp("a").unwrap(), Some(3_000));
    assert_eq!(s.stamp("b").unwrap(), None);
}

#[test]
fn a_dead_runner_leaves_interrupted_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let s = SqliteStore::open(&path).unwrap();
        let run = s.begin_run("presync", "fp", &["a"]).unwrap();
        s.set_phase(run, "a", Phase::Running).unwrap();
        // dropped without end_run: the runner died
    }
    let s = SqliteStore::open(&path).unwrap();
    s.begin_run("rerun", "fp", &["a"]).unwrap();
    assert_eq!(s.tasks().unwrap()[0].phase, Phase::Interrupted);
    let c = s.conn();
    let outcome: String = c
        .query_row("SELECT outcome FROM runs WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    assert_eq!(outcome, "interrupted");
}

#[test]
fn a_schema_1_store_gains_the_repeated_mode_of_reruns() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let c = Connection::open(&path).unwrap();
        c.execute_batch(SCHEMA_V1).unwrap();
        c.execute(
            "INSERT INTO runs (mode, fingerprint, pid, started_ms) VALUES ('presync', 'fp', 1, 1)",
            [],
        )
        .unwrap();
        c.pragma_update(None, "user_version", 1).unwrap();
    }
    let s = SqliteStore::open(&path).unwrap();
    assert_eq!(s.user_version().unwrap(), SCHEMA_VERSION);
    let old = s.run(1).unwrap().unwrap();
    assert_eq!((old.mode.as_str(), old.repeats), ("presync", None));
    let rerun = s.begin_run("rerun", "fp", &["a"]).unwrap();
    s.set_repeats(rerun, "presync").unwrap();
    let r = s.run(rerun).unwrap().unwrap();
    assert_eq!(r.repeats.as_deref(), Some("presync"));
    assert_eq!(s.last_run().unwrap(), Some(r));
    assert_eq!(s.run(rerun + 1).unwrap(), None);
}
