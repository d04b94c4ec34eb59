//! The daemon's configuration file (TOML): where to listen, where its key lives, which
//! modules it serves and who may read or write each of them, and which block volumes it
//! hosts (`[[volume]]`, exported over NBD; see docs/volumes.md).
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
//! A volume names its backing (a file or block device), its metadata file (default
//! `state_dir/NAME.meta`) and where it is exported (default `unix:state_dir/NAME.sock`):
//!
//! ```toml
//! [[volume]]
//! name = "db"
//! backing = "/dev/vg0/db"
//! meta = "/var/lib/cutover/db.meta"
//! export = "unix:/run/cutover/db.sock"   # or "tcp:127.0.0.1:10809" (loopback only)
//! ```
//!
//! A config needs at least one module or volume. Every module needs at least one `allow` entry: the daemon does not serve anonymously.
//! Tokens are read from a file (mode 0600 or stricter) or an environment variable, never
//! from the command line, and are at least 16 bytes long.

use net::tls::Fingerprint;
use serde::Deserialize;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

mod notify;
mod peer;
pub use notify::{NotifyEvent, VolumeNotify};
pub use peer::*;

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
    /// Where `GET /metrics` answers in the Prometheus text format (`IP:PORT`); none when
    /// absent. Plain HTTP only on loopback (see `metrics.rs`).
    pub metrics_listen: Option<String>,
    /// Serve the metrics over HTTPS with the daemon's certificate.
    #[serde(default)]
    pub metrics_tls: bool,
    #[serde(default, rename = "module")]
    pub modules: Vec<Module>,
    #[serde(default, rename = "volume")]
    pub volumes: Vec<Volume>,
    /// The `[[volume_notify]]` tables as written; checked into `volume_notify`.
    #[serde(default, rename = "volume_notify")]
    notify_specs: Vec<notify::NotifySpec>,
    /// Hooks run when a volume's state changes (`config/notify.rs`).
    #[serde(skip)]
    pub volume_notify: Vec<VolumeNotify>,
}

/// A `[[volume]]`: a block volume this node hosts and exports over NBD.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Volume {
    /// Also the NBD export name (`nbd+unix:///NAME?socket=…`).
    pub name: String,
    /// The file or block device holding the data.
    pub backing: PathBuf,
    /// The metadata file; `None` for `state_dir/NAME.meta` (see [`Config::volume_meta`]).
    pub meta: Option<PathBuf>,
    /// Where the NBD export listens; `None` for `unix:state_dir/NAME.sock`.
    #[serde(default, deserialize_with = "export_addr")]
    pub export: Option<ExportAddr>,
    /// The `[[volume.peer]]` tables as written; checked into `peers` by [`Config::parse`].
    #[serde(default, rename = "peer")]
    peer_specs: Vec<peer::PeerSpec>,
    /// The daemons this volume is replicated to.
    #[serde(skip)]
    pub peers: Vec<Peer>,
}

/// Where a volume's NBD export listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportAddr {
    /// A Unix socket (mode 0600), the default: only local root-owned clients attach.
    Unix(PathBuf),
    /// TCP on a loopback address: NBD has no authentication of its own here, so anything
    /// wider would hand the volume to the network.
    Tcp(std::net::SocketAddr),
}

impl std::fmt::Display for ExportAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExportAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            ExportAddr::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl ExportAddr {
    /// Parse `unix:/abs/path` or `tcp:127.0.0.1:PORT`; the error says what is wrong.
    pub fn parse(text: &str) -> Result<ExportAddr, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if !path.is_absolute() {
                return Err(format!(
                    "export = {text:?}: the socket path must be absolute"
                ));
            }
            return Ok(ExportAddr::Unix(path));
        }
        if let Some(addr) = text.strip_prefix("tcp:") {
            let addr: std::net::SocketAddr = addr.parse().map_err(|_| {
                format!("export = {text:?}: give tcp:IP:PORT, e.g. tcp:127.0.0.1:10809")
            })?;
            if !addr.ip().is_loopback() {
                return Err(format!(
                    "export = {text:?}: NBD exports listen on loopback only (127.0.0.1 or [::1]); use a unix: socket or a loopback address"
                ));
            }
            return Ok(ExportAddr::Tcp(addr));
        }
        Err(format!(
            "export = {text:?}: give unix:/PATH or tcp:127.0.0.1:PORT"
        ))
    }
}

fn export_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<ExportAddr>, D::Error> {
    let text = String::deserialize(d)?;
    ExportAddr::parse(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}

/// A volume name: it becomes a file name (`NAME.meta`, `NAME.sock`) and an NBD export name
/// in URIs, so keep it to characters that need no quoting anywhere.
fn valid_volume_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
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
        crate::metrics::check_config(config.metrics_listen.as_deref(), config.metrics_tls)
            .map_err(invalid)?;
        if config.modules.is_empty() && config.volumes.is_empty() {
            return Err(invalid(
                "no [[module]] or [[volume]] defined; add a module (name, path) or a volume (name, backing)".into(),
            ));
        }
        for (i, v) in config.volumes.iter().enumerate() {
            if !valid_volume_name(&v.name) {
                return Err(invalid(format!(
                    "volume #{}: name {:?} must be 1-64 letters, digits, '-', '_' or '.', not starting with '.'",
                    i + 1,
                    v.name
                )));
            }
            if !v.backing.is_absolute() {
                return Err(invalid(format!(
                    "volume {:?}: backing {} must be absolute",
                    v.name,
                    v.backing.display()
                )));
            }
            if let Some(m) = v.meta.as_ref().filter(|m| !m.is_absolute()) {
                return Err(invalid(format!(
                    "volume {:?}: meta {} must be absolute",
                    v.name,
                    m.display()
                )));
            }
            if config.volumes[..i].iter().any(|o| o.name == v.name) {
                return Err(invalid(format!("volume {:?} is defined twice", v.name)));
            }
        }
        for v in &mut config.volumes {
            v.peers = peer::load_peers(v).map_err(invalid)?;
        }
        config.volume_notify =
            notify::load_notify(&config.notify_specs, &config.volumes).map_err(invalid)?;
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
        default_state_dir()
    }
}

/// The state directory of a config without `state_dir`: `$XDG_STATE_HOME/cutover`, else
/// `~/.local/state/cutover` (`cutover volume` finds the control socket there without
/// `--config`).
pub fn default_state_dir() -> Option<PathBuf> {
    {
        if let Some(x) = std::env::var_os("XDG_STATE_HOME").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(x).join("cutover"));
        }
        std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .map(|h| PathBuf::from(h).join(".local/state/cutover"))
    }
}

impl Config {
    /// The volume called `name`, or an error listing the ones defined.
    pub fn volume(&self, name: &str) -> Result<&Volume, String> {
        self.volumes.iter().find(|v| v.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.volumes.iter().map(|v| v.name.as_str()).collect();
            if names.is_empty() {
                format!("no volume {name:?}: the config defines no [[volume]]")
            } else {
                format!(
                    "no volume {name:?} in the config (it defines: {})",
                    names.join(", ")
                )
            }
        })
    }

    /// A volume's metadata file: its `meta`, else `state_dir/NAME.meta`.
    pub fn volume_meta(&self, v: &Volume) -> Option<PathBuf> {
        v.meta
            .clone()
            .or_else(|| Some(self.state_dir()?.join(format!("{}.meta", v.name))))
    }

    /// A volume's export: its `export`, else `unix:state_dir/NAME.sock`.
    pub fn volume_export(&self, v: &Volume) -> Option<ExportAddr> {
        v.export.clone().or_else(|| {
            Some(ExportAddr::Unix(
                self.state_dir()?.join(format!("{}.sock", v.name)),
            ))
        })
    }

    /// The control socket `cutover volume` talks to: `state_dir/control.sock`.
    pub fn control_socket(&self) -> Option<PathBuf> {
        Some(self.state_dir()?.join(CONTROL_SOCKET))
    }
}

/// The control socket's file name in the state directory.
pub const CONTROL_SOCKET: &str = "control.sock";

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

    #[test]
    fn volumes_alone_are_a_config_and_are_checked() {
        let c = Config::parse(
            "state_dir = \"/s\"\n[[volume]]\nname = \"db\"\nbacking = \"/dev/x\"\n",
            "x.toml",
        )
        .unwrap();
        let v = c.volume("db").unwrap();
        assert_eq!(c.volume_meta(v), Some(PathBuf::from("/s/db.meta")));
        assert_eq!(
            c.volume_export(v),
            Some(ExportAddr::Unix(PathBuf::from("/s/db.sock")))
        );
        let vol = |extra: &str| {
            Config::parse(
                &format!("[[volume]]\nname = \"db\"\nbacking = \"/x\"\n{extra}"),
                "x.toml",
            )
        };
        let e = vol("bogus = 1\n").unwrap_err().to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = vol("export = \"tcp:0.0.0.0:10809\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("export") && e.contains("loopback"), "{e}");
        let c = vol("export = \"tcp:127.0.0.1:10809\"\n").unwrap();
        assert!(matches!(c.volumes[0].export, Some(ExportAddr::Tcp(_))));
        let e = vol("export = \"unix:rel.sock\"\n").unwrap_err().to_string();
        assert!(e.contains("absolute"), "{e}");
        let e = Config::parse("[[volume]]\nname = \"a/b\"\nbacking = \"/x\"\n", "x.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("name"), "{e}");
        let e = Config::parse("", "x.toml").unwrap_err().to_string();
        assert!(e.contains("[[volume]]"), "{e}");
    }
}
