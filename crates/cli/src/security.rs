//! The client's side of trust: which daemon certificate to accept (a fingerprint given with
//! `--server-fingerprint`, the known-hosts file, or trust on first use), the token to prove
//! (`--token-file` or `CUTOVER_TOKEN`), the client certificate to show, and the messages
//! that tell the user what to fix when any of it does not match.

use crate::print::errln;
use net::client::{ClientError, Security, TlsClient};
use net::known_hosts::{KnownHosts, Lookup};
use net::tls::{Fingerprint, Identity, IDENTITY_FILE};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Environment variable a token may come from (never a command-line argument: those show
/// up in `ps`).
pub const TOKEN_ENV: &str = "CUTOVER_TOKEN";

#[derive(clap::Args, Debug, Clone, Default)]
pub struct SecurityArgs {
    /// Accept only the daemon whose certificate has this fingerprint (sha256:HEX, as `cutover serve` prints it); the known-hosts file is then neither read nor written.
    #[arg(long, value_name = "FP", value_parser = Fingerprint::parse)]
    pub server_fingerprint: Option<Fingerprint>,
    /// Known-hosts file (default: $XDG_CONFIG_HOME/cutover/known_hosts, else ~/.config/cutover/known_hosts).
    #[arg(long, value_name = "FILE")]
    pub known_hosts: Option<PathBuf>,
    /// Read the module's token from FILE (or set CUTOVER_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Client certificate to show (default: identity.pem in the config directory, if `cutover identity` made one).
    #[arg(long, value_name = "FILE")]
    pub identity: Option<PathBuf>,
    /// Talk to the daemon without TLS (loopback daemons with insecure_plaintext only; for measuring TLS's cost).
    #[arg(long)]
    pub insecure_plaintext: bool,
}

/// The client's configuration directory.
pub fn config_dir() -> Option<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CONFIG_HOME").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(x).join("cutover"));
    }
    std::env::var_os("HOME")
        .filter(|v| !v.is_empty())
        .map(|h| PathBuf::from(h).join(".config/cutover"))
}

/// Where the certificate a client trusts came from, so a mismatch can say what to fix.
pub enum Pin {
    Given,
    Known {
        file: KnownHosts,
        line: usize,
    },
    /// Not known yet: record what the daemon shows.
    FirstUse(KnownHosts),
    None,
}

/// Everything `open_session` needs, and what to do after it.
pub struct ClientTrust {
    pub security: Security,
    pub pin: Pin,
}

fn read_token(args: &SecurityArgs) -> Result<Option<Arc<Vec<u8>>>, String> {
    if let Some(path) = &args.token_file {
        let bytes =
            std::fs::read(path).map_err(|e| format!("--token-file {}: {e}", path.display()))?;
        warn_if_readable_by_others(path);
        let token = bytes.trim_ascii().to_vec();
        if token.is_empty() {
            return Err(format!(
                "--token-file {}: the file is empty",
                path.display()
            ));
        }
        return Ok(Some(Arc::new(token)));
    }
    match std::env::var(TOKEN_ENV) {
        Ok(v) if !v.trim().is_empty() => Ok(Some(Arc::new(v.trim().as_bytes().to_vec()))),
        _ => Ok(None),
    }
}

/// Warn (once per file and process: sessions retry) when a token file is readable by its
/// group or by others, as ssh does for a private key.
fn warn_if_readable_by_others(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    static WARNED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.permissions().mode() & 0o044 == 0 {
        return;
    }
    let mut warned = WARNED.lock().unwrap_or_else(|p| p.into_inner());
    if !warned.iter().any(|p| p == path) {
        warned.push(path.to_path_buf());
        errln!(
            "cutover: warning: token file {0} is readable by group or others; run chmod 600 {0}",
            path.display()
        );
    }
}

fn read_identity(args: &SecurityArgs) -> Result<Option<Arc<Identity>>, String> {
    if let Some(path) = &args.identity {
        return Identity::load(path)
            .map(|i| Some(Arc::new(i)))
            .map_err(|e| format!("--identity: {e}"));
    }
    let Some(path) = config_dir().map(|d| d.join(IDENTITY_FILE)) else {
        return Ok(None);
    };
    if !path.exists() {
        return Ok(None);
    }
    Identity::load(&path)
        .map(|i| Some(Arc::new(i)))
        .map_err(|e| e.to_string())
}

/// With `--insecure-plaintext`, refuse a daemon that is not on this machine before dialling
/// it: files and the token proof would cross a real network in clear. `addr` (HOST:PORT) must
/// be a loopback address, or a name whose every address is one.
pub async fn check_plaintext_destination(addr: &str) -> Result<(), String> {
    let refusal = |what: String| {
        format!(
            "--insecure-plaintext only talks to loopback daemons (127.0.0.0/8, ::1); {what}: drop --insecure-plaintext"
        )
    };
    if let Ok(sa) = addr.parse::<std::net::SocketAddr>() {
        return match is_loopback(sa.ip()) {
            true => Ok(()),
            false => Err(refusal(format!("{addr} is not one"))),
        };
    }
    let resolved: Vec<std::net::SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .collect();
    match resolved.iter().find(|sa| !is_loopback(sa.ip())) {
        Some(other) => Err(refusal(format!(
            "{addr} resolves to {}, which is not one",
            other.ip()
        ))),
        None if resolved.is_empty() => Err(format!("cannot resolve {addr}: no addresses")),
        None => Ok(()),
    }
}

/// 127.0.0.0/8 and ::1, also written as IPv4-mapped IPv6 (`::ffff:127.0.0.1`).
fn is_loopback(ip: std::net::IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Decide how to trust the daemon at `addr` (HOST:PORT).
pub fn client_trust(args: &SecurityArgs, addr: &str) -> Result<ClientTrust, String> {
    let token = read_token(args)?;
    if args.insecure_plaintext {
        return Ok(ClientTrust {
            security: Security { tls: None, token },
            pin: Pin::None,
        });
    }
    let identity = read_identity(args)?;
    let (expected, pin) = match args.server_fingerprint {
        Some(fp) => (Some(fp), Pin::Given),
        None => {
            let path = match &args.known_hosts {
                Some(p) => p.clone(),
                None => config_dir()
                    .map(|d| d.join("known_hosts"))
                    .ok_or("cannot find a home for known_hosts: set HOME, or pass --known-hosts FILE or --server-fingerprint")?,
            };
            let file = KnownHosts::new(path);
            match file.lookup(addr).map_err(|e| e.to_string())? {
                Lookup::Pinned { line, fingerprint } => {
                    (Some(fingerprint), Pin::Known { file, line })
                }
                Lookup::Unknown => {
                    // Trust on first use will write the file: refuse now, before connecting.
                    file.check_writable().map_err(|e| e.to_string())?;
                    (None, Pin::FirstUse(file))
                }
            }
        }
    };
    Ok(ClientTrust {
        security: Security {
            tls: Some(TlsClient { expected, identity }),
            token,
        },
        pin,
    })
}

impl ClientTrust {
    /// After the session opened: pin a first-seen certificate and tell the user.
    pub fn remember(&self, addr: &str, seen: Option<Fingerprint>) -> Result<(), String> {
        if let (Pin::FirstUse(file), Some(fp)) = (&self.pin, seen) {
            file.record(addr, fp).map_err(|e| e.to_string())?;
            errln!(
                "cutover: trusting the daemon at {addr} with certificate {fp} (first use; recorded in {})",
                file.path().display()
            );
        }
        Ok(())
    }

    /// The user-facing message for a failed `open_session`.
    pub fn explain(&self, err: &ClientError) -> String {
        let ClientError::FingerprintMismatch {
            addr,
            seen,
            expected,
        } = err
        else {
            return err.to_string();
        };
        match &self.pin {
            Pin::Known { file, line } => format!(
                "the daemon at {addr} presented certificate {seen}, but {}:{line} pins {expected}; if its key was replaced on purpose, delete line {line} of {} (someone may also be intercepting the connection)",
                file.path().display(),
                file.path().display()
            ),
            _ => format!(
                "the daemon at {addr} presented certificate {seen}, but --server-fingerprint says {expected}"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(addr: &str) -> Result<(), String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(check_plaintext_destination(addr))
    }

    #[test]
    fn plaintext_goes_to_loopback_addresses_only() {
        for ok in [
            "127.0.0.1:7000",
            "127.9.8.7:1",
            "[::1]:7000",
            "[::ffff:127.0.0.1]:7000",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
        for (bad, shown) in [
            ("10.0.0.5:7000", "10.0.0.5:7000 is not one"),
            ("0.0.0.0:7000", "0.0.0.0:7000 is not one"),
            ("[fd00::2]:7000", "[fd00::2]:7000 is not one"),
            (
                "[::ffff:10.0.0.5]:7000",
                "[::ffff:10.0.0.5]:7000 is not one",
            ),
        ] {
            let e = check(bad).unwrap_err();
            assert!(
                e.contains(shown) && e.contains("drop --insecure-plaintext"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn localhost_resolves_to_loopback() {
        // /etc/hosts names localhost on every system the tests run on (no DNS query).
        assert_eq!(check("localhost:7000"), Ok(()));
    }
}
