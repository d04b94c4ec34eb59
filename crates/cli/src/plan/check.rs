//! `plan check`'s read-only look at the local paths of every task, beyond what the plan
//! file and the runner check.

use super::*;

/// `plan check`'s look at the local paths of every task, read-only (nothing is created): a
/// local source must exist, and a local destination's parent directory must be one (as
/// `cutover sync` needs). A path at or beneath the local destination of a task it depends
/// on (directly or not) is not looked at: that task makes it. Relative paths are taken from
/// the plan's directory, and the errors show where that put them.
pub(super) fn check_local_paths(plan: &Plan) -> Vec<::plan::PlanError> {
    let local = |endpoint: &str| match Endpoint::parse(endpoint) {
        Ok(Endpoint::Local { .. }) => Some(PathBuf::from(resolve(endpoint, &plan.base_dir))),
        _ => None,
    };
    let mut errors = Vec::new();
    for (i, t) in plan.tasks.iter().enumerate() {
        let made: Vec<PathBuf> = all_dependencies(plan, i)
            .into_iter()
            .filter_map(|d| local(&plan.tasks[d].destination))
            .collect();
        let made_before = |p: &Path| made.iter().any(|m| p.starts_with(m));
        let mut problem = |key, message| {
            errors.push(plan.error_at_task_key(i, KeyError { key, message }));
        };
        if let Some(src) = t.source.as_deref().and_then(local) {
            if !made_before(&src) {
                match std::fs::metadata(&src) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        problem("source", format!("{} does not exist", src.display()))
                    }
                    Err(e) => problem("source", format!("{}: {e}", src.display())),
                }
            }
        }
        let Some(dst) = local(&t.destination) else {
            continue;
        };
        let Some(parent) = dst.parent().filter(|p| !made_before(p)) else {
            continue;
        };
        match std::fs::metadata(parent) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => problem(
                "destination",
                format!("{}: {} is not a directory", dst.display(), parent.display()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => problem(
                "destination",
                format!(
                    "{}: its parent directory {} does not exist; create it first",
                    dst.display(),
                    parent.display()
                ),
            ),
            Err(e) => problem(
                "destination",
                format!("{}: {}: {e}", dst.display(), parent.display()),
            ),
        }
    }
    errors
}

/// Every task that task `i` depends on, directly or through others.
fn all_dependencies(plan: &Plan, i: usize) -> Vec<usize> {
    let mut seen = vec![false; plan.tasks.len()];
    let mut todo = ::plan::graph::dependencies(&plan.tasks, i);
    while let Some(d) = todo.pop() {
        if !std::mem::replace(&mut seen[d], true) {
            todo.extend(::plan::graph::dependencies(&plan.tasks, d));
        }
    }
    (0..plan.tasks.len()).filter(|&d| seen[d]).collect()
}
