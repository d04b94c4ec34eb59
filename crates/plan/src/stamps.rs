//! Stamps: when a task's last successful pass started, as the commands around a pass see it.
//!
//! The store writes a task's stamp in the same transaction as the record of the successful
//! pass that earns it, and the stamp is that pass's *start* (taken before its hooks and its
//! `paths_from` ran). So a pass that fails, is stopped by Ctrl-C or dies with its runner
//! (kill -9) leaves the previous stamp, and whatever changed while a pass ran is newer than
//! its stamp: GitHub's `touch stamp.new; work; mv stamp.new stamp`, built in.
//!
//! Commands get it as `CUTOVER_LAST_SUCCESS` (RFC 3339, UTC) and
//! `CUTOVER_LAST_SUCCESS_EPOCH` (seconds), both rounded *down* to the second so that they
//! name the same instant and a file changed in the stamp's own second is listed again
//! rather than missed; both are empty when the task never had a successful pass.

use state::Millis;

/// The stamp as RFC 3339 in UTC, to the second (rounded down): `2026-03-01T12:00:05Z`.
pub fn rfc3339(ms: Millis) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    t.format(&f).unwrap_or_else(|_| epoch(ms))
}

/// The stamp in whole seconds since the epoch (rounded down, like [`rfc3339`]).
pub fn epoch(ms: Millis) -> String {
    ms.div_euclid(1000).to_string()
}

/// What `CUTOVER_PASS` says for a pass of this kind: `presync` or `final` (a rerun of a
/// presync is a presync pass; a rerun that finishes a cutover is already `final`), or
/// `dry-run`.
pub fn pass_name(kind: &str) -> &'static str {
    match kind {
        "final" => "final",
        "dry-run" => "dry-run",
        _ => "presync",
    }
}

/// The environment of everything that runs for one pass of `task` (its hooks, its
/// `paths_from`, a command task's command): `CUTOVER_TASK`, `CUTOVER_PASS` and the stamp.
pub fn pass_env(task: &str, kind: &str, stamp: Option<Millis>) -> Vec<(String, String)> {
    vec![
        ("CUTOVER_TASK".into(), task.into()),
        ("CUTOVER_PASS".into(), pass_name(kind).into()),
        (
            "CUTOVER_LAST_SUCCESS".into(),
            stamp.map(rfc3339).unwrap_or_default(),
        ),
        (
            "CUTOVER_LAST_SUCCESS_EPOCH".into(),
            stamp.map(epoch).unwrap_or_default(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_forms_name_the_same_second_rounded_down() {
        // 2026-03-01T12:00:05.999Z
        let ms = 1_772_366_405_999;
        assert_eq!(rfc3339(ms), "2026-03-01T12:00:05Z");
        assert_eq!(epoch(ms), "1772366405");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }

    #[test]
    fn the_environment_of_a_pass() {
        let env = pass_env("db", "rerun", Some(1_772_366_405_000));
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("CUTOVER_TASK"), Some("db"));
        assert_eq!(get("CUTOVER_PASS"), Some("presync"));
        assert_eq!(get("CUTOVER_LAST_SUCCESS"), Some("2026-03-01T12:00:05Z"));
        assert_eq!(get("CUTOVER_LAST_SUCCESS_EPOCH"), Some("1772366405"));
        let never = pass_env("db", "final", None);
        assert_eq!(never[1].1, "final");
        assert_eq!((never[2].1.as_str(), never[3].1.as_str()), ("", ""));
    }
}
