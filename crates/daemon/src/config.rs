//! The daemon's configuration file (TOML): where to listen and which modules to serve.
//!
//! ```toml
//! listen = "127.0.0.1:8730"
//! [[module]]
//! name = "data"
//! path = "/srv/data"
//! read_only = false
//! ```

use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const DEFAULT_PORT: u16 = 8730;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: String,
    #[serde(default, rename = "module")]
    pub modules: Vec<Module>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Module {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub read_only: bool,
}

fn default_listen() -> String {
    format!("127.0.0.1:{DEFAULT_PORT}")
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: p.clone(),
            source,
        })?;
        Config::parse(&text, &p)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let invalid = |message: String| ConfigError::Invalid {
            path: origin.to_string(),
            message,
        };
        let config: Config =
            toml::from_str(text).map_err(|e| invalid(e.to_string().trim().replace('\n', " ")))?;
        if config.modules.is_empty() {
            return Err(invalid(
                "no [[module]] defined; add one with name and path".into(),
            ));
        }
        for (i, m) in config.modules.iter().enumerate() {
            if m.name.is_empty() || m.name.contains('/') {
                return Err(invalid(format!(
                    "module #{}: name {:?} must be non-empty and contain no '/'",
                    i + 1,
                    m.name
                )));
            }
            if !m.path.is_absolute() {
                return Err(invalid(format!(
                    "module {:?}: path {} must be absolute",
                    m.name,
                    m.path.display()
                )));
            }
            if config.modules[..i].iter().any(|o| o.name == m.name) {
                return Err(invalid(format!("module {:?} is defined twice", m.name)));
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects_clearly() {
        let c = Config::parse("[[module]]\nname = \"a\"\npath = \"/srv\"\n", "x.toml").unwrap();
        assert_eq!(c.listen, "127.0.0.1:8730");
        assert!(!c.modules[0].read_only);
        let e = Config::parse(
            "[[module]]\nname = \"a\"\npath = \"/srv\"\nbogus = 1\n",
            "x.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::parse("[[module]]\nname = \"a\"\npath = \"rel\"\n", "x.toml").unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
        assert!(Config::parse("", "x.toml").is_err());
    }
}
