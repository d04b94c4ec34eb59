//! The daemon's configuration file (TOML): where to listen, where its key lives, which
//! modules it serves and who may read or write each of them.
//!
//! ```toml
//! listen = "0.0.0.0:8730"
//! state_dir = "/var/lib/cutover"
//! [[module]]
//! name = "data"
//! path = "/srv/data"
//! [[module.allow]]
//! token_file = "/etc/cutover/data.token"
//! access = "read-write"
//! [[module.allow]]
//! client_fingerprint = "sha256:..."
//! access = "read-only"
//! ```
//!
//! Every module needs at least one `allow` entry: the daemon does not serve anonymously.
//! Tokens are read from a file (mode 0600 or stricter) or an environment variable, never
//! from the command line, and are at least 16 bytes long.

use net::tls::Fingerprint;
use serde::Deserialize;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

pub const DEFAULT_PORT: u16 = 8730;
/// Shortest token accepted: shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Where the daemon keeps its key and certificate (made on first start).
    pub state_dir: Option<PathBuf>,
    /// Also accept plaintext connections (for measuring TLS's cost); only allowed when
    /// listening on loopback.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// Seconds a new connection has for its TLS handshake and hello.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_secs: u64,
    /// Seconds an established session may bring nothing, not even a keepalive (peers send one
    /// every second when quiet), before it is closed: a stalled or vanished client.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// Sessions served at once, from all clients.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: usize,
    /// Sessions one client address may have open at once.
    #[serde(default = "default_max_sessions_per_client")]
    pub max_sessions_per_client: usize,
    /// Data connections one session may join (auto mode opens up to 64).
    #[serde(default = "default_max_connections_per_session")]
    pub max_connections_per_session: usize,
    /// Seconds sessions in flight get to finish after SIGTERM before the daemon exits.
    #[serde(default = "default_shutdown_grace")]
    pub shutdown_grace_secs: u64,
    #[serde(default, rename = "module")]
    pub modules: Vec<Module>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Module {
    pub name: String,
    pub path: PathBuf,
    /// Refuse writes whatever the grants say.
    #[serde(default)]
    pub read_only: bool,
    /// Let clients create device nodes and write block devices in this module (only
    /// meaningful when the daemon runs as root). Off by default: a client that may create a
    /// node for any device number could write the host's disks through it.
    #[serde(default)]
    pub allow_devices: bool,
    #[serde(default, rename = "allow")]
    allow_specs: Vec<AllowSpec>,
    /// The `allow` entries with their secrets loaded.
    #[serde(skip)]
    pub grants: Vec<Grant>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct AllowSpec {
    token_file: Option<PathBuf>,
    token_env: Option<String>,
    client_fingerprint: Option<String>,
    access: Access,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// Something a client can show, and what it may then do.
#[derive(Clone)]
pub struct Grant {
    pub credential: Credential,
    pub access: Access,
}

#[derive(Clone)]
pub enum Credential {
    Token(Vec<u8>),
    ClientCert(Fingerprint),
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.credential {
            Credential::Token(_) => write!(f, "token ({:?})", self.access),
            Credential::ClientCert(fp) => write!(f, "client {fp} ({:?})", self.access),
        }
    }
}

fn default_listen() -> String {
    format!("127.0.0.1:{DEFAULT_PORT}")
}

fn default_handshake_timeout() -> u64 {
    30
}

/// Also the ssh (`--stdio`) side's idle timeout.
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 120;

fn default_idle_timeout() -> u64 {
    DEFAULT_IDLE_TIMEOUT_SECS
}

fn default_shutdown_grace() -> u64 {
    30
}

fn default_max_sessions() -> usize {
    64
}

fn default_max_sessions_per_client() -> usize {
    16
}

fn default_max_connections_per_session() -> usize {
    64
}

/// Load one `allow` entry's secret.
fn load_grant(spec: &AllowSpec) -> Result<Grant, String> {
    let credential = match (&spec.token_file, &spec.token_env, &spec.client_fingerprint) {
        (Some(file), None, None) => {
            let meta = std::fs::metadata(file)
                .map_err(|e| format!("token_file {}: {e}", file.display()))?;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                // Refused, not just warned about: anyone who can read it can write to the
                // module, and anyone who can change it can lock its owner out.
                return Err(format!(
                    "token_file {0} has mode {mode:04o}: its group or others can read or change it; run chmod 600 {0}",
                    file.display()
                ));
            }
            let text =
                std::fs::read(file).map_err(|e| format!("token_file {}: {e}", file.display()))?;
            let token = text.trim_ascii().to_vec();
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "token_file {}: the token is shorter than {MIN_TOKEN_LEN} bytes; make one with `openssl rand -hex 32`",
                    file.display()
                ));
            }
            Credential::Token(token)
        }
        (None, Some(var), None) => {
            let value = std::env::var(var)
                .map_err(|_| format!("token_env {var}: the environment variable is not set"))?;
            let token = value.trim().as_bytes().to_vec();
            if token.len() < MIN_TOKEN_LEN {
                return Err(format!(
                    "token_env {var}: the token is shorter than {MIN_TOKEN_LEN} bytes; make one with `openssl rand -hex 32`"
                ));
            }
            Credential::Token(token)
        }
        (None, None, Some(fp)) => Credential::ClientCert(
            Fingerprint::parse(fp).map_err(|e| format!("client_fingerprint {e}"))?,
        ),
        _ => return Err("give exactly one of token_file, token_env or client_fingerprint".into()),
    };
    Ok(Grant {
        credential,
        access: spec.access,
    })
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
        let mut config: Config =
            toml::from_str(text).map_err(|e| invalid(e.to_string().trim().replace('\n', " ")))?;
        let min_idle = engine::MIN_IDLE_TIMEOUT.as_secs();
        if config.idle_timeout_secs < min_idle {
            return Err(invalid(format!(
                "idle_timeout_secs = {}: must be at least {min_idle} (peers send a keepalive every second)",
                config.idle_timeout_secs
            )));
        }
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
        for m in &mut config.modules {
            if m.allow_specs.is_empty() {
                return Err(invalid(format!(
                    "module {:?} has no [[module.allow]] entry; the daemon does not serve without authentication: add one with token_file, token_env or client_fingerprint and access",
                    m.name
                )));
            }
            for (j, spec) in m.allow_specs.iter().enumerate() {
                let grant = load_grant(spec).map_err(|why| {
                    invalid(format!("module {:?}, allow #{}: {why}", m.name, j + 1))
                })?;
                m.grants.push(grant);
            }
        }
        Ok(config)
    }

    /// Where the key and certificate live: `state_dir`, else `$XDG_STATE_HOME/cutover`, else
    /// `~/.local/state/cutover`.
    pub fn state_dir(&self) -> Option<PathBuf> {
        if let Some(d) = &self.state_dir {
            return Some(d.clone());
        }
        if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(x).join("cutover"));
        }
        std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .map(|h| PathBuf::from(h).join(".local/state/cutover"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    fn module(extra: &str) -> String {
        format!("[[module]]\nname = \"a\"\npath = \"/srv\"\n{extra}")
    }

    #[test]
    fn parses_and_rejects_clearly() {
        let allow =
            format!("[[module.allow]]\nclient_fingerprint = \"{FP}\"\naccess = \"read-only\"\n");
        let c = Config::parse(&module(&allow), "x.toml").unwrap();
        assert_eq!(c.listen, "127.0.0.1:8730");
        assert!(!c.modules[0].read_only);
        assert_eq!(c.modules[0].grants[0].access, Access::ReadOnly);
        let e = Config::parse(&module(&format!("bogus = 1\n{allow}")), "x.toml").unwrap_err();
        assert!(e.to_string().contains("bogus"), "{e}");
        let e = Config::parse(
            &format!("[[module]]\nname = \"a\"\npath = \"rel\"\n{allow}"),
            "x.toml",
        )
        .unwrap_err();
        assert!(e.to_string().contains("absolute"), "{e}");
        assert!(Config::parse("", "x.toml").is_err());
    }

    #[test]
    fn refuses_modules_without_sound_authentication() {
        let e = Config::parse(&module(""), "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no [[module.allow]]"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("t");
        std::fs::write(&token, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o644)).unwrap();
        let spec = |access: &str| {
            module(&format!(
                "[[module.allow]]\ntoken_file = \"{}\"\naccess = \"{access}\"\n",
                token.display()
            ))
        };
        let e = Config::parse(&spec("read-write"), "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Config::parse(&spec("read-write"), "x.toml").unwrap();
        assert!(
            matches!(&c.modules[0].grants[0].credential, Credential::Token(t) if t == b"0123456789abcdef0123")
        );
        let e = Config::parse(&spec("everything"), "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("everything"), "{e}");
        std::fs::write(&token, "short").unwrap();
        let e = Config::parse(&spec("read-only"), "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("shorter than 16"), "{e}");
        let e = Config::parse(
            &module(&format!("[[module.allow]]\ntoken_env = \"X\"\nclient_fingerprint = \"{FP}\"\naccess = \"read-only\"\n")),
            "x.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("exactly one"), "{e}");
    }
}
