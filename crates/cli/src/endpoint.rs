//! Parsing of SRC and DST: a local path, or `cutover://host[:port]/module/path`.

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
        Ok(Endpoint::Local {
            path: PathBuf::from(s),
            trailing_slash: s.ends_with('/'),
        })
    }

    pub fn trailing_slash(&self) -> bool {
        match self {
            Endpoint::Local { trailing_slash, .. } => *trailing_slash,
            Endpoint::Daemon { path, .. } => path.is_empty() || path.ends_with('/'),
        }
    }
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
