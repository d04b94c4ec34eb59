//! `[[volume.peer]]`: the daemons a volume is replicated to, and how (see docs/volumes.md).
//!
//! ```toml
//! [[volume]]
//! name = "db"
//! backing = "/dev/vg0/db"
//! [[volume.peer]]
//! name = "dr"
//! fingerprint = "sha256:..."        # the peer daemon's certificate
//! address = "10.0.0.2:8730"         # absent: wait for the peer to dial in
//! protocol = "C"                    # "A" (async) or "C" (sync)
//! max_rate = "40M"                  # bytes per second, 0 or absent for no cap
//! csums = false
//! on_congestion = "block"           # or "pull-ahead"
//! max_lag = "64M"
//! connections = 8                  # to start with
//! max_connections = 64              # grown to while each doubling raises the rate
//! after_split_brain = "disconnect"  # or "discard-zero-changes", "discard-least-changes"
//! # with address = "ssh://[USER@]HOST" only:
//! ssh_command = "ssh -p 2222"       # default "ssh"
//! remote_cutover = "cutover"        # the program on the peer's host
//! remote_config = "/etc/cutover/serve.toml"  # the peer daemon's config (for its state_dir)
//! ```
//!
//! The table is read into a [`PeerSpec`] holding the written text of the fields that need
//! parsing; [`load_peers`] turns it into a [`Peer`] during the config's validation pass, where
//! the volume's name is known, so every error names the volume, the peer and the field (the
//! same split as a module's `allow` entries and their grants).

use super::{valid_volume_name, Volume};
use net::tls::Fingerprint;
use serde::Deserialize;

/// Peers one volume may have (DRBD's bound too): a fixed bound lets per-peer state such as
/// out-of-sync bitmaps be sized once, and a config asking for more is refused when it is
/// loaded rather than when replication starts.
pub const MAX_PEERS: usize = 31;
/// `max_lag` when none is given.
pub const DEFAULT_MAX_LAG: u64 = 64 << 20;
/// The smallest `max_lag`: below it an ordinary burst of writes would already count as
/// congestion.
pub const MIN_MAX_LAG: u64 = 1 << 20;
/// `connections` when none is given.
pub const DEFAULT_CONNECTIONS: usize = 8;
/// The most connections one link may have (the same bound as a session's data connections).
pub const MAX_CONNECTIONS: usize = 64;

/// A `[[volume.peer]]`: another daemon this volume is replicated to.
#[derive(Debug, Clone, PartialEq)]
pub struct Peer {
    /// Unique within the volume; same rules as a volume name.
    pub name: String,
    /// The peer daemon's certificate: the link is refused if the other end shows another.
    pub fingerprint: Fingerprint,
    /// Where to dial the peer; `None` when this side waits for the peer to dial in.
    pub address: Option<PeerAddress>,
    pub protocol: Protocol,
    /// Bytes per second the link may use; `None` for no cap.
    pub max_rate: Option<u64>,
    /// Resynchronise by comparing checksums instead of sending every out-of-sync block.
    pub csums: bool,
    pub on_congestion: OnCongestion,
    /// Bytes of writes the peer may be behind before the link counts as congested.
    pub max_lag: u64,
    /// TCP/TLS connections of the link, 1 to [`MAX_CONNECTIONS`].
    pub connections: usize,
    /// The dialling side adds data connections up to this many while they raise the
    /// link's rate (`connections` to [`MAX_CONNECTIONS`]).
    pub max_connections: usize,
    pub after_split_brain: SplitBrainPolicy,
    /// With an ssh address: how each connection reaches the peer daemon.
    pub ssh: SshVia,
}

/// How a link over ssh starts the relay on the peer's host: `SSH_COMMAND [USER@]HOST
/// REMOTE_CUTOVER serve --peer-relay [--config REMOTE_CONFIG]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshVia {
    /// The local command and its arguments, split like a shell would.
    pub command: String,
    pub remote_cutover: String,
    /// The peer daemon's config on its host (for its state_dir); None: its default.
    pub remote_config: Option<String>,
}

impl Default for SshVia {
    fn default() -> SshVia {
        SshVia {
            command: "ssh".into(),
            remote_cutover: "cutover".into(),
            remote_config: None,
        }
    }
}

/// Where a peer is dialled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAddress {
    /// `HOST:PORT` as written (IPv6 as `[ADDR]:PORT`); the host is resolved when dialling,
    /// not here, so a config naming a host that is down still loads.
    Tcp(String),
    /// The part after `ssh://`: `HOST` or `USER@HOST`.
    Ssh(String),
}

impl std::fmt::Display for PeerAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerAddress::Tcp(a) => f.write_str(a),
            PeerAddress::Ssh(h) => write!(f, "ssh://{h}"),
        }
    }
}

impl PeerAddress {
    /// Parse `HOST:PORT`, `[IPV6]:PORT`, `ssh://HOST` or `ssh://USER@HOST`; the error says
    /// what is wrong and what to write.
    pub fn parse(text: &str) -> Result<PeerAddress, String> {
        const FORMS: &str = "give HOST:PORT (IPv6 as [ADDR]:PORT) or ssh://[USER@]HOST";
        if let Some(target) = text.strip_prefix("ssh://") {
            let host = target.rsplit_once('@').map_or(target, |(_, h)| h);
            let user = target.rsplit_once('@').map(|(u, _)| u);
            if host.is_empty() || user == Some("") {
                return Err(format!("address = {text:?}: {FORMS}"));
            }
            // ssh takes no path and its port comes from ssh_config, so a '/' or ':' here is a
            // mistake that would only surface when the link is first dialled.
            if target.contains(['/', ':']) || target.chars().any(char::is_whitespace) {
                return Err(format!(
                    "address = {text:?}: write only ssh://[USER@]HOST (set a port in ~/.ssh/config)"
                ));
            }
            return Ok(PeerAddress::Ssh(target.to_string()));
        }
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err(format!("address = {text:?}: no port; {FORMS}"));
        };
        match port.parse::<u16>() {
            Ok(p) if p != 0 => {}
            _ => {
                return Err(format!(
                    "address = {text:?}: port {port:?} is not 1 to 65535"
                ))
            }
        }
        let bad_host = if let Some(inner) = host.strip_prefix('[') {
            // Brackets are only for IPv6, whose colons would otherwise hide the port.
            inner
                .strip_suffix(']')
                .is_none_or(|ip| ip.parse::<std::net::Ipv6Addr>().is_err())
        } else {
            host.is_empty() || host.contains(':') || host.chars().any(char::is_whitespace)
        };
        if bad_host {
            return Err(format!("address = {text:?}: {FORMS}"));
        }
        Ok(PeerAddress::Tcp(text.to_string()))
    }
}

/// When a write on this side is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum Protocol {
    /// Once it is on the local disk and in the send buffer: fast, but a crash of this node
    /// can lose the newest writes on the peer.
    #[serde(alias = "a")]
    A,
    /// Once it is on both disks: nothing acknowledged is lost with one node.
    #[default]
    #[serde(alias = "c")]
    C,
}

/// What happens when the peer falls `max_lag` behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnCongestion {
    /// Writers wait for the link: the peer stays current, the application slows down.
    #[default]
    Block,
    /// Stop shipping writes and mark them out of sync, to resynchronise later: the
    /// application keeps its speed, the peer falls behind.
    PullAhead,
}

/// What to do when both sides were written independently (a split brain): the link's
/// own type, which both ends compare.
pub use replica::SplitBrainPolicy;

/// A `[[volume.peer]]` table as written; see [`load_peers`].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PeerSpec {
    name: String,
    fingerprint: String,
    address: Option<String>,
    #[serde(default)]
    protocol: Protocol,
    max_rate: Option<Size>,
    #[serde(default)]
    csums: bool,
    #[serde(default)]
    on_congestion: OnCongestion,
    max_lag: Option<Size>,
    #[serde(default = "default_connections")]
    connections: usize,
    max_connections: Option<usize>,
    #[serde(default)]
    after_split_brain: SplitBrainPolicy,
    ssh_command: Option<String>,
    remote_cutover: Option<String>,
    remote_config: Option<String>,
}

fn default_connections() -> usize {
    DEFAULT_CONNECTIONS
}

/// A size as written: a TOML integer (bytes) or a string with a unit.
#[derive(Debug, Clone)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size such as \"64M\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Size, E> {
                Ok(Size::Bytes(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Size, E> {
                u64::try_from(n)
                    .map(Size::Bytes)
                    .map_err(|_| E::custom(format!("{n}: a size cannot be negative")))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Size, E> {
                Ok(Size::Text(s.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Size::Bytes(n) => write!(f, "{n}"),
            Size::Text(t) => write!(f, "{t:?}"),
        }
    }
}

impl Size {
    /// Bytes, by the rules of the cli's `parse_rate` (K, M or G, either case, 1024-based,
    /// fractions allowed) except for a string without a unit: `--bwlimit 500` means KiB/s
    /// there, so a config value copied from a command line would silently mean 1024 times
    /// less here if a bare string were taken as bytes. Such a string is refused instead
    /// (but "0", which means the same either way); a TOML integer is bytes.
    fn bytes(&self) -> Result<u64, String> {
        let t = match self {
            Size::Bytes(n) => return Ok(*n),
            Size::Text(t) => t.trim(),
        };
        let (num, mult) = match t.chars().last() {
            Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
            Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
            Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
            _ if t == "0" => return Ok(0),
            _ => return Err(
                "give a unit, K, M or G (1024-based), e.g. \"64M\", or bytes as an unquoted number"
                    .into(),
            ),
        };
        match num.parse::<f64>() {
            // `as` saturates, so a huge value becomes u64::MAX rather than wrapping.
            Ok(n) if n.is_finite() && n >= 0.0 => Ok((n * mult as f64) as u64),
            _ => Err("give a number with K, M or G (1024-based), e.g. \"64M\"".into()),
        }
    }
}

/// Check a volume's `[[volume.peer]]` tables and build its peers. Errors are one line that
/// names the volume, the peer and the field.
pub(super) fn load_peers(volume: &Volume) -> Result<Vec<Peer>, String> {
    let (vol, specs) = (&volume.name, &volume.peer_specs);
    if specs.len() > MAX_PEERS {
        return Err(format!(
            "volume {vol:?}: {} [[volume.peer]] tables: a volume has at most {MAX_PEERS} peers; remove some",
            specs.len()
        ));
    }
    let mut peers: Vec<Peer> = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        if !valid_volume_name(&spec.name) {
            return Err(format!(
                "volume {vol:?}: peer #{}: name {:?} must be 1-64 letters, digits, '-', '_' or '.', not starting with '.'",
                i + 1,
                spec.name
            ));
        }
        let at = format!("volume {vol:?}: peer {:?}", spec.name);
        if peers.iter().any(|p| p.name == spec.name) {
            return Err(format!(
                "{at} is defined twice; give each peer its own name"
            ));
        }
        let fingerprint =
            Fingerprint::parse(&spec.fingerprint).map_err(|e| format!("{at}: fingerprint {e}"))?;
        // Two peers with one fingerprint are one daemon listed twice: its link would be
        // claimed by both, and a write would count as replicated twice.
        if let Some(p) = peers.iter().find(|p| p.fingerprint == fingerprint) {
            return Err(format!(
                "{at}: fingerprint is also peer {:?}'s; each peer is another daemon with its own certificate",
                p.name
            ));
        }
        let address = spec
            .address
            .as_deref()
            .map(PeerAddress::parse)
            .transpose()
            .map_err(|e| format!("{at}: {e}"))?;
        let max_rate = match &spec.max_rate {
            None => None,
            Some(s) => match s.bytes() {
                Ok(0) => None,
                // The cli's rule: smaller caps are below what the rate limiter can pace.
                Ok(n) if n < 1024 => {
                    return Err(format!("{at}: max_rate = {s}: the smallest rate is 1K"))
                }
                Ok(n) => Some(n),
                Err(e) => return Err(format!("{at}: max_rate = {s}: {e}; 0 for no cap")),
            },
        };
        let max_lag = match &spec.max_lag {
            None => DEFAULT_MAX_LAG,
            Some(s) => match s.bytes() {
                Ok(n) if n >= MIN_MAX_LAG => n,
                Ok(_) => return Err(format!("{at}: max_lag = {s}: give at least 1M")),
                Err(e) => return Err(format!("{at}: max_lag = {s}: {e}")),
            },
        };
        if !(1..=MAX_CONNECTIONS).contains(&spec.connections) {
            return Err(format!(
                "{at}: connections = {}: give 1 to {MAX_CONNECTIONS}",
                spec.connections
            ));
        }
        let max_connections = spec.max_connections.unwrap_or(MAX_CONNECTIONS);
        if !(spec.connections..=MAX_CONNECTIONS).contains(&max_connections) {
            return Err(format!(
                "{at}: max_connections = {max_connections}: give {} (connections) to {MAX_CONNECTIONS}",
                spec.connections
            ));
        }
        let ssh = ssh_via(spec, address.as_ref()).map_err(|e| format!("{at}: {e}"))?;
        peers.push(Peer {
            ssh,
            name: spec.name.clone(),
            fingerprint,
            address,
            protocol: spec.protocol,
            max_rate,
            csums: spec.csums,
            on_congestion: spec.on_congestion,
            max_lag,
            connections: spec.connections,
            max_connections,
            after_split_brain: spec.after_split_brain,
        });
    }
    Ok(peers)
}

/// The ssh keys of a peer: only with an ssh address, each checked.
fn ssh_via(spec: &PeerSpec, address: Option<&PeerAddress>) -> Result<SshVia, String> {
    let given = [
        ("ssh_command", &spec.ssh_command),
        ("remote_cutover", &spec.remote_cutover),
        ("remote_config", &spec.remote_config),
    ];
    if !matches!(address, Some(PeerAddress::Ssh(_))) {
        if let Some((key, _)) = given.iter().find(|(_, v)| v.is_some()) {
            return Err(format!(
                "{key} is only for a peer dialled over ssh (address = \"ssh://[USER@]HOST\")"
            ));
        }
        return Ok(SshVia::default());
    }
    for (key, v) in given {
        if v.as_deref().is_some_and(|t| t.trim().is_empty()) {
            return Err(format!("{key} is empty; leave it out for the default"));
        }
    }
    let mut via = SshVia::default();
    if let Some(c) = &spec.ssh_command {
        if shlex::split(c).is_none_or(|p| p.is_empty()) {
            return Err(format!(
                "ssh_command = {c:?}: not a command line (unbalanced quotes?)"
            ));
        }
        via.command = c.clone();
    }
    if let Some(r) = &spec.remote_cutover {
        via.remote_cutover = r.clone();
    }
    via.remote_config = spec.remote_config.clone();
    Ok(via)
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    /// A distinct valid fingerprint per `n`.
    fn fp(n: u8) -> String {
        Fingerprint([n; 32]).to_string()
    }

    /// A config with volume "db" and these `[[volume.peer]]` bodies.
    fn parse(peers: &[String]) -> Result<Config, String> {
        let mut text = "[[volume]]\nname = \"db\"\nbacking = \"/x\"\n".to_string();
        for p in peers {
            text.push_str("[[volume.peer]]\n");
            text.push_str(p);
        }
        Config::parse(&text, "x.toml").map_err(|e| e.to_string())
    }

    /// One peer "dr" with these extra lines.
    fn one(extra: &str) -> Result<Config, String> {
        parse(&[format!(
            "name = \"dr\"\nfingerprint = \"{}\"\n{extra}",
            fp(1)
        )])
    }

    fn err(extra: &str) -> String {
        let e = one(extra).unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        e
    }

    #[test]
    fn every_key_parses() {
        let c = one(
            "address = \"10.0.0.2:8730\"\nprotocol = \"A\"\nmax_rate = \"40M\"\ncsums = true\n\
             on_congestion = \"pull-ahead\"\nmax_lag = \"1.5G\"\nconnections = 64\n\
             after_split_brain = \"discard-least-changes\"\n",
        )
        .unwrap();
        assert_eq!(
            c.volumes[0].peers,
            vec![Peer {
                name: "dr".into(),
                fingerprint: Fingerprint([1; 32]),
                address: Some(PeerAddress::Tcp("10.0.0.2:8730".into())),
                protocol: Protocol::A,
                max_rate: Some(40 << 20),
                csums: true,
                on_congestion: OnCongestion::PullAhead,
                max_lag: 3 << 29,
                connections: 64,
                max_connections: 64,
                after_split_brain: SplitBrainPolicy::DiscardLeastChanges,
                ssh: SshVia::default(),
            }]
        );
        let c = one(
            "address = \"ssh://root@dr\"\nssh_command = \"ssh -p 2222 -i 'my key'\"\n\
             remote_cutover = \"/opt/cutover\"\nremote_config = \"/etc/c.toml\"\n",
        )
        .unwrap();
        assert_eq!(
            c.volumes[0].peers[0].ssh,
            SshVia {
                command: "ssh -p 2222 -i 'my key'".into(),
                remote_cutover: "/opt/cutover".into(),
                remote_config: Some("/etc/c.toml".into()),
            }
        );
        let c = one("protocol = \"a\"\nafter_split_brain = \"discard-zero-changes\"\nmax_rate = 2048\nmax_lag = 1048576\n").unwrap();
        let p = &c.volumes[0].peers[0];
        assert_eq!(p.protocol, Protocol::A);
        assert_eq!(p.after_split_brain, SplitBrainPolicy::DiscardZeroChanges);
        assert_eq!((p.max_rate, p.max_lag), (Some(2048), 1 << 20));
    }

    #[test]
    fn defaults_with_only_name_and_fingerprint() {
        let c = one("").unwrap();
        let p = &c.volumes[0].peers[0];
        assert_eq!(p.fingerprint.to_string(), fp(1));
        assert_eq!(p.address, None);
        assert_eq!(p.protocol, Protocol::C);
        assert_eq!(p.max_rate, None);
        assert!(!p.csums);
        assert_eq!(p.on_congestion, OnCongestion::Block);
        assert_eq!(p.max_lag, 64 << 20);
        assert_eq!(p.connections, 8);
        assert_eq!(p.after_split_brain, SplitBrainPolicy::Disconnect);
        assert_eq!(
            one("max_rate = \"0\"\n").unwrap().volumes[0].peers[0].max_rate,
            None
        );
        assert_eq!(
            one("max_rate = 0\n").unwrap().volumes[0].peers[0].max_rate,
            None
        );
        let c = parse(&[]).unwrap();
        assert!(c.volumes[0].peers.is_empty());
    }

    #[test]
    fn addresses() {
        let addr = |a: &str| {
            one(&format!("address = \"{a}\"\n")).map(|c| c.volumes[0].peers[0].address.clone())
        };
        for (text, want) in [
            ("ssh://dr.example", PeerAddress::Ssh("dr.example".into())),
            ("ssh://root@dr", PeerAddress::Ssh("root@dr".into())),
            (
                "dr.example:8730",
                PeerAddress::Tcp("dr.example:8730".into()),
            ),
            ("[::1]:8730", PeerAddress::Tcp("[::1]:8730".into())),
        ] {
            let got = addr(text).unwrap().unwrap();
            assert_eq!(got, want);
            assert_eq!(got.to_string(), text);
        }
        for (text, why) in [
            ("nohost", "no port"),
            ("host:99999", "port \"99999\" is not 1 to 65535"),
            ("host:0", "is not 1 to 65535"),
            (":8730", "HOST:PORT"),
            ("::1:8730", "[ADDR]:PORT"),
            ("[nothex]:8730", "[ADDR]:PORT"),
            ("ssh://", "ssh://[USER@]HOST"),
            ("ssh://@dr", "ssh://[USER@]HOST"),
            ("ssh://dr:22", "~/.ssh/config"),
        ] {
            let e = err(&format!("address = \"{text}\"\n"));
            assert!(
                e.contains(&format!("volume \"db\": peer \"dr\": address = \"{text}\"")),
                "{e}"
            );
            assert!(e.contains(why), "{text}: {e}");
        }
    }

    #[test]
    fn invalid_values_are_named() {
        for (extra, want) in [
            ("protocol = \"B\"\n", &["protocol", "`B`", "`A`", "`C`"][..]),
            (
                "on_congestion = \"x\"\n",
                &["on_congestion", "`x`", "pull-ahead"],
            ),
            ("after_split_brain = \"x\"\n", &["after_split_brain", "`x`"]),
            (
                "connections = 4\nmax_connections = 3\n",
                &["peer \"dr\": max_connections = 3: give 4 (connections) to 64"],
            ),
            (
                "address = \"h:1\"\nssh_command = \"ssh\"\n",
                &["peer \"dr\": ssh_command is only for a peer dialled over ssh"],
            ),
            (
                "remote_config = \"/c\"\n",
                &["remote_config is only for a peer dialled over ssh"],
            ),
            (
                "address = \"ssh://h\"\nssh_command = \"ssh 'x\"\n",
                &["ssh_command = \"ssh 'x\": not a command line"],
            ),
            (
                "address = \"ssh://h\"\nremote_cutover = \" \"\n",
                &["remote_cutover is empty"],
            ),
            (
                "max_lag = \"1K\"\n",
                &["volume \"db\": peer \"dr\": max_lag = \"1K\": give at least 1M"],
            ),
            ("max_lag = \"64\"\n", &["max_lag = \"64\": give a unit"]),
            ("max_lag = -1\n", &["max_lag", "negative"]),
            (
                "max_rate = \"-1K\"\n",
                &["peer \"dr\": max_rate = \"-1K\"", "0 for no cap"],
            ),
            ("max_rate = \"infK\"\n", &["max_rate = \"infK\""]),
            (
                "max_rate = 100\n",
                &["max_rate = 100: the smallest rate is 1K"],
            ),
            (
                "connections = 0\n",
                &["volume \"db\": peer \"dr\": connections = 0: give 1 to 64"],
            ),
            (
                "connections = 65\n",
                &["volume \"db\": peer \"dr\": connections = 65: give 1 to 64"],
            ),
            ("bogus = 1\n", &["bogus", "unknown field"]),
        ] {
            let e = err(extra);
            for w in want {
                assert!(e.contains(w), "{extra}: want {w:?} in {e}");
            }
        }
        let e = parse(&["name = \"dr\"\nfingerprint = \"sha256:00\"\n".into()]).unwrap_err();
        assert!(
            e.contains(
                "volume \"db\": peer \"dr\": fingerprint \"sha256:00\" is not a fingerprint"
            ),
            "{e}"
        );
        let e = parse(&[format!("name = \"a/b\"\nfingerprint = \"{}\"\n", fp(1))]).unwrap_err();
        assert!(e.contains("volume \"db\": peer #1: name \"a/b\""), "{e}");
        let e = parse(&["name = \"dr\"\n".into()]).unwrap_err();
        assert!(e.contains("fingerprint"), "{e}");
    }

    #[test]
    fn peers_are_distinct_and_few() {
        let peer = |name: &str, n: u8| format!("name = \"{name}\"\nfingerprint = \"{}\"\n", fp(n));
        let e = parse(&[peer("dr", 1), peer("dr", 2)]).unwrap_err();
        assert!(
            e.contains("volume \"db\": peer \"dr\" is defined twice"),
            "{e}"
        );
        let e = parse(&[peer("a", 1), peer("b", 1)]).unwrap_err();
        assert!(
            e.contains("volume \"db\": peer \"b\": fingerprint is also peer \"a\"'s"),
            "{e}"
        );
        let many: Vec<String> = (0..32).map(|n| peer(&format!("p{n}"), n)).collect();
        let e = parse(&many).unwrap_err();
        assert!(
            e.contains("volume \"db\": 32 [[volume.peer]] tables: a volume has at most 31 peers"),
            "{e}"
        );
        assert_eq!(parse(&many[..31]).unwrap().volumes[0].peers.len(), 31);
    }
}
