//! Include/exclude rules with rsync's matching rules, compiled once with globset.
//!
//! A pattern without '/' matches the last component at any depth; a leading '/' anchors it at
//! the transfer root; a trailing '/' matches directories only; `**` crosses directories. The
//! first rule that matches decides; no match means included.

use crate::FsError;
use globset::{GlobBuilder, GlobMatcher};
use proto::FilterRule;

struct Rule {
    include: bool,
    dir_only: bool,
    basename_only: bool,
    glob: GlobMatcher,
}

#[derive(Default)]
pub struct Filter {
    rules: Vec<Rule>,
}

impl Filter {
    pub fn new(rules: &[FilterRule]) -> Result<Self, FsError> {
        let mut out = Vec::with_capacity(rules.len());
        for r in rules {
            let (include, pat) = match r {
                FilterRule::Include(p) => (true, p.as_str()),
                FilterRule::Exclude(p) => (false, p.as_str()),
            };
            let mut p = pat;
            let dir_only = p.ends_with('/') && p.len() > 1;
            if dir_only {
                p = &p[..p.len() - 1];
            }
            let anchored = p.starts_with('/');
            if anchored {
                p = &p[1..];
            }
            let basename_only = !anchored && !p.contains('/');
            let glob = GlobBuilder::new(p)
                .literal_separator(true)
                .backslash_escape(true)
                .build()
                .map_err(|e| FsError::BadPattern {
                    pattern: pat.to_string(),
                    reason: e.kind().to_string(),
                })?
                .compile_matcher();
            out.push(Rule {
                include,
                dir_only,
                basename_only,
                glob,
            });
        }
        Ok(Filter { rules: out })
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether the relative path (as on the wire, '/'-separated) is excluded.
    pub fn excluded(&self, rel: &[u8], is_dir: bool) -> bool {
        if self.rules.is_empty() || rel.is_empty() {
            return false;
        }
        let base = match rel.iter().rposition(|&b| b == b'/') {
            Some(i) => &rel[i + 1..],
            None => rel,
        };
        let rel_os = os(rel);
        let base_os = os(base);
        for r in &self.rules {
            if r.dir_only && !is_dir {
                continue;
            }
            let hit = if r.basename_only {
                r.glob.is_match(base_os)
            } else {
                r.glob.is_match(rel_os)
            };
            if hit {
                return !r.include;
            }
        }
        false
    }
}

fn os(b: &[u8]) -> &std::ffi::OsStr {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::OsStr::from_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(rules: &[(&str, bool)]) -> Filter {
        let r: Vec<FilterRule> = rules
            .iter()
            .map(|(p, inc)| {
                if *inc {
                    FilterRule::Include(p.to_string())
                } else {
                    FilterRule::Exclude(p.to_string())
                }
            })
            .collect();
        Filter::new(&r).unwrap()
    }

    #[test]
    fn rsync_like_matching() {
        let x = f(&[("*.log", false)]);
        assert!(x.excluded(b"a/b/c.log", false));
        assert!(!x.excluded(b"a/b/c.txt", false));
        let x = f(&[("/top", false)]);
        assert!(x.excluded(b"top", true));
        assert!(!x.excluded(b"a/top", true));
        let x = f(&[("cache/", false)]);
        assert!(x.excluded(b"a/cache", true));
        assert!(!x.excluded(b"a/cache", false));
        let x = f(&[("keep.log", true), ("*.log", false)]);
        assert!(!x.excluded(b"d/keep.log", false));
        assert!(x.excluded(b"d/other.log", false));
        let x = f(&[("a/**/z", false)]);
        assert!(x.excluded(b"a/b/c/z", false));
    }

    #[test]
    fn bad_pattern_is_named() {
        let e = Filter::new(&[FilterRule::Exclude("a[".into())])
            .err()
            .unwrap();
        assert!(e.to_string().contains("a["), "{e}");
    }
}
