//! The task graph: cycle detection (with the cycle's path, for the error message) and the
//! dependency levels that `dry-run` prints and the predictor schedules.

use crate::file::TaskSpec;

fn deps(tasks: &[TaskSpec], i: usize) -> impl Iterator<Item = usize> + '_ {
    tasks[i]
        .depends_on
        .iter()
        .filter_map(move |d| tasks.iter().position(|t| &t.name == d))
}

/// A cycle of `depends_on` edges as task indices (`[a, b, c]` means a → b → c → a), or None.
pub fn find_cycle(tasks: &[TaskSpec]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        OnStack,
        Done,
    }
    let mut mark = vec![Mark::New; tasks.len()];
    // Iterative DFS (a plan may be long; no recursion limit to worry about).
    for root in 0..tasks.len() {
        if mark[root] != Mark::New {
            continue;
        }
        let mut stack: Vec<(usize, Vec<usize>)> = vec![(root, deps(tasks, root).collect())];
        mark[root] = Mark::OnStack;
        while let Some((node, pending)) = stack.last_mut() {
            let node = *node;
            match pending.pop() {
                Some(next) => match mark[next] {
                    Mark::New => {
                        mark[next] = Mark::OnStack;
                        stack.push((next, deps(tasks, next).collect()));
                    }
                    Mark::OnStack => {
                        let start = stack.iter().position(|(n, _)| *n == next).unwrap_or(0);
                        return Some(stack[start..].iter().map(|(n, _)| *n).collect());
                    }
                    Mark::Done => {}
                },
                None => {
                    mark[node] = Mark::Done;
                    stack.pop();
                }
            }
        }
    }
    None
}

/// Dependency level of every task: 0 for tasks without dependencies, else one more than
/// the deepest dependency. Tasks of one level never depend on each other. Assumes no cycle.
pub fn levels(tasks: &[TaskSpec]) -> Vec<usize> {
    let mut level = vec![0usize; tasks.len()];
    // Relax |tasks| times: enough for any acyclic graph, and bounded even if one slipped in.
    for _ in 0..tasks.len() {
        let mut changed = false;
        for i in 0..tasks.len() {
            let l = deps(tasks, i).map(|d| level[d] + 1).max().unwrap_or(0);
            if l != level[i] {
                level[i] = l;
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }
    level
}

/// Indices of the tasks `i` depends on directly.
pub fn dependencies(tasks: &[TaskSpec], i: usize) -> Vec<usize> {
    deps(tasks, i).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::Kind;

    fn t(name: &str, deps: &[&str]) -> TaskSpec {
        let text = format!(
            "name = {name:?}\nkind = \"tree\"\nsource = \"s\"\ndestination = \"d\"\ndepends_on = {deps:?}\n"
        );
        let spec: TaskSpec = toml::from_str(&text).unwrap();
        assert_eq!(spec.kind, Kind::Tree);
        spec
    }

    #[test]
    fn levels_follow_dependencies() {
        let tasks = [
            t("a", &[]),
            t("b", &["a"]),
            t("c", &[]),
            t("d", &["b", "c"]),
        ];
        assert_eq!(levels(&tasks), vec![0, 1, 0, 2]);
        assert_eq!(find_cycle(&tasks), None);
    }

    #[test]
    fn finds_self_contained_cycles_only() {
        let tasks = [t("x", &[]), t("a", &["b"]), t("b", &["c"]), t("c", &["a"])];
        let c = find_cycle(&tasks).unwrap();
        assert_eq!(c, vec![1, 2, 3]);
        let tasks = [t("a", &["a2"]), t("a2", &["a"])];
        assert_eq!(find_cycle(&tasks).unwrap().len(), 2);
    }
}
