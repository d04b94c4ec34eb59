//! Parsing of SRC and DST: a local path, `[user@]host:PATH` (ssh, as rsync and scp read it:
//! a colon before any slash), or `cutover://host[:port]/module/path`.

use std::path::PathBuf;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Local {
        path: PathBuf,
        trailing_slash: bool,
    },
    Daemon {
        addr: String,
        module: String,
        /// Path below the module, as written (trailing slash kept).
        path: String,
    },
    Ssh {
        /// `[user@]host` as ssh takes it.
        dest: String,
        /// Remote path as written (trailing slash kept; empty = the login directory).
        path: String,
    },
}

impl Endpoint {
    pub fn parse(s: &str) -> Result<Endpoint, String> {
        if let Some(rest) = s.strip_prefix("cutover://") {
            let (hostport, tail) = rest
                .split_once('/')
                .ok_or_else(|| format!("{s}: expected cutover://host[:port]/module[/path]"))?;
            if hostport.is_empty() {
                return Err(format!("{s}: missing host"));
            }
            let addr = if hostport.starts_with('[') {
                if hostport.contains("]:") {
                    hostport.to_string()
                } else {
                    format!("{hostport}:{}", daemon::config::DEFAULT_PORT)
                }
            } else if hostport.contains(':') {
                hostport.to_string()
            } else {
                format!("{hostport}:{}", daemon::config::DEFAULT_PORT)
            };
            let (module, path) = match tail.split_once('/') {
                Some((m, p)) => (m, p),
                None => (tail, ""),
            };
            if module.is_empty() {
                return Err(format!("{s}: missing module name"));
            }
            return Ok(Endpoint::Daemon {
                addr,
                module: module.to_string(),
                path: path.to_string(),
            });
        }
        if s.is_empty() {
            return Err("empty path".into());
        }
        if let Some((dest, path)) = split_ssh(s) {
            // ssh takes an IPv6 address without brackets.
            return Ok(Endpoint::Ssh {
                dest: dest.replace(['[', ']'], ""),
                path: path.to_string(),
            });
        }
        Ok(Endpoint::Local {
            path: PathBuf::from(s),
            trailing_slash: s.ends_with('/'),
        })
    }

    pub fn trailing_slash(&self) -> bool {
        match self {
            Endpoint::Local { trailing_slash, .. } => *trailing_slash,
            Endpoint::Daemon { path, .. } | Endpoint::Ssh { path, .. } => {
                path.is_empty() || path.ends_with('/')
            }
        }
    }
}

/// `[user@]host:path` or `[user@][v6addr]:path`; a slash before the first colon makes it a
/// local path (`./a:b`), as in rsync.
fn split_ssh(s: &str) -> Option<(&str, &str)> {
    if let Some(at_bracket) = s.find('[') {
        let close = s.find("]:")?;
        let before = &s[..at_bracket];
        if before.contains('/') || close < at_bracket {
            return None;
        }
        return Some((&s[..close + 1], &s[close + 2..]));
    }
    let colon = s.find(':')?;
    let dest = &s[..colon];
    if dest.is_empty() || dest.contains('/') {
        return None;
    }
    Some((dest, &s[colon + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_endpoints() {
        assert_eq!(
            Endpoint::parse("cutover://127.0.0.1:9/data/a/b/").unwrap(),
            Endpoint::Daemon {
                addr: "127.0.0.1:9".into(),
                module: "data".into(),
                path: "a/b/".into()
            }
        );
        assert_eq!(
            Endpoint::parse("cutover://h/m").unwrap(),
            Endpoint::Daemon {
                addr: "h:8730".into(),
                module: "m".into(),
                path: "".into()
            }
        );
        assert!(Endpoint::parse("cutover://h").is_err());
        assert_eq!(
            Endpoint::parse("root@db1:/srv/data/").unwrap(),
            Endpoint::Ssh {
                dest: "root@db1".into(),
                path: "/srv/data/".into()
            }
        );
        assert_eq!(
            Endpoint::parse("[::1]:x").unwrap(),
            Endpoint::Ssh {
                dest: "::1".into(),
                path: "x".into()
            }
        );
        assert!(Endpoint::parse("h:").unwrap().trailing_slash());
        assert!(matches!(
            Endpoint::parse("./a:b").unwrap(),
            Endpoint::Local { .. }
        ));
        assert!(matches!(
            Endpoint::parse("/x/a:b").unwrap(),
            Endpoint::Local { .. }
        ));
        assert!(Endpoint::parse("cutover:///m").is_err());
        assert!(matches!(
            Endpoint::parse("src/").unwrap(),
            Endpoint::Local {
                trailing_slash: true,
                ..
            }
        ));
    }
}
