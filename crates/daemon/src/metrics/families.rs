//! The metric families of one scrape: each volume's status (as `cutover volume status`
//! shows it) and its exports' write latencies, and the daemon's session counters, read
//! into a [`Scrape`] and encoded as Prometheus text (version 0.0.4) by `prometheus-client`.
//! docs/serve.md lists every family; a family added here belongs there too.
//!
//! States (a volume's role and disk, a peer's connection and disk) are one gauge per
//! possible state, 1 for the current one and 0 for the others, as Prometheus exporters do,
//! so an alert can say `cutover_volume_disk_state{state="Inconsistent"} == 1`.

use super::DaemonCounters;
use crate::control::VolumeStatus;
use crate::volumes::Hosted;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::Arc;

type Labels = Vec<(&'static str, String)>;

/// The states a volume's role, its disk, and a peer's connection and disk can be in.
const ROLES: [&str; 2] = ["primary", "secondary"];
const DISK_STATES: [&str; 3] = ["UpToDate", "Inconsistent", "Outdated"];
const CONNECTION_STATES: [&str; 4] = ["connecting", "connected", "standalone", "disconnected"];
const PEER_DISK_STATES: [&str; 3] = ["UpToDate", "Inconsistent", "unknown"];

/// One volume as a scrape reads it.
#[derive(Debug)]
struct VolumeScrape {
    status: VolumeStatus,
    nbd_clients: usize,
    latency: nbd::LatencySnapshot,
}

/// Everything one scrape shows, read before encoding (the encoder takes no locks).
#[derive(Debug)]
struct Scrape {
    volumes: Vec<VolumeScrape>,
    sessions_active: u64,
    sessions_total: u64,
    sent: u64,
    received: u64,
    auth_failures: u64,
    tls_failures: u64,
}

/// Read the volumes and counters and encode them. Blocking: status takes the volumes'
/// locks. A volume shutting down is left out.
pub(super) fn scrape(
    hosted: &[Arc<Hosted>],
    counters: &DaemonCounters,
) -> Result<String, fmt::Error> {
    let volumes = hosted
        .iter()
        .filter_map(|h| {
            let status = crate::control::status_of(h).ok()?;
            Some(VolumeScrape {
                status,
                nbd_clients: h.server.connections(),
                latency: h.write_latency.snapshot(),
            })
        })
        .collect();
    let (sent, received) = counters.session_bytes();
    let scrape = Scrape {
        volumes,
        sessions_active: counters.sessions_active.load(Ordering::Relaxed),
        sessions_total: counters.sessions_total.load(Ordering::Relaxed),
        sent,
        received,
        auth_failures: counters.auth_failures.load(Ordering::Relaxed),
        tls_failures: counters.tls_failures.load(Ordering::Relaxed),
    };
    let mut registry = Registry::with_prefix("cutover");
    registry.register_collector(Box::new(scrape));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
    Ok(text)
}

/// A family of `kind`: one sample per label set.
fn family<M: EncodeMetric>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (Labels, M)>,
) -> fmt::Result {
    let mut family = enc.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in samples {
        metric.encode(family.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauges<N: EncodeGaugeValue + fmt::Debug>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, N)>,
) -> fmt::Result {
    let gauges = samples.into_iter().map(|(l, v)| (l, ConstGauge::new(v)));
    family(enc, name, help, MetricType::Gauge, gauges)
}

/// The encoder adds `_total` to a counter's `name`.
fn counters(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (Labels, u64)>,
) -> fmt::Result {
    let counters = samples.into_iter().map(|(l, v)| (l, ConstCounter::new(v)));
    family(enc, name, help, MetricType::Counter, counters)
}

/// One sample per state of `states` (label `key`): 1 for `current`, 0 for the others.
fn state_set<'a>(
    labels: Labels,
    key: &'static str,
    states: &'a [&'static str],
    current: &'a str,
) -> impl Iterator<Item = (Labels, u64)> + 'a {
    states.iter().map(move |&s| {
        let mut l = labels.clone();
        l.push((key, s.to_string()));
        (l, u64::from(s == current))
    })
}

impl Scrape {
    fn volume_labels(v: &VolumeScrape) -> Labels {
        vec![("volume", v.status.name.clone())]
    }

    /// Each peer of each volume with its labels.
    fn peers(&self) -> impl Iterator<Item = (Labels, &crate::roles::PeerStatus)> + '_ {
        self.volumes.iter().flat_map(|v| {
            v.status.peers.iter().map(move |p| {
                let labels = vec![("volume", v.status.name.clone()), ("peer", p.name.clone())];
                (labels, p)
            })
        })
    }

    /// A gauge family with one sample per volume.
    fn per_volume<N: EncodeGaugeValue + fmt::Debug>(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: impl Fn(&VolumeScrape) -> N,
    ) -> fmt::Result {
        let samples = self
            .volumes
            .iter()
            .map(|v| (Self::volume_labels(v), value(v)));
        gauges(enc, name, help, samples)
    }

    /// A gauge family with one sample per peer.
    fn per_peer<N: EncodeGaugeValue + fmt::Debug>(
        &self,
        enc: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: impl Fn(&crate::roles::PeerStatus) -> N,
    ) -> fmt::Result {
        gauges(enc, name, help, self.peers().map(|(l, p)| (l, value(p))))
    }

    fn encode_volumes(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let vols = &self.volumes;
        let states = |key, states, current: fn(&VolumeStatus) -> &str| {
            vols.iter().flat_map(move |v| {
                state_set(Self::volume_labels(v), key, states, current(&v.status))
            })
        };
        gauges(
            enc,
            "volume_role",
            "This node's role for the volume: 1 for the current role, 0 for the other.",
            states("role", &ROLES, |s| &s.role),
        )?;
        gauges(
            enc,
            "volume_disk_state",
            "This node's data of the volume: 1 for the current state, 0 for the others.",
            states("state", &DISK_STATES, |s| &s.disk),
        )?;
        self.per_volume(enc, "volume_size_bytes", "Size of the volume.", |v| {
            v.status.size
        })?;
        self.per_volume(
            enc,
            "volume_dirty_bytes",
            "Bytes written since the volume's last mark (whole blocks).",
            |v| v.status.dirty_bytes,
        )?;
        let per_volume = |f: fn(&VolumeStatus) -> u64| {
            vols.iter()
                .map(move |v| (Self::volume_labels(v), f(&v.status)))
        };
        counters(
            enc,
            "volume_written_bytes",
            "Bytes written to the volume (WRITE, WRITE_ZEROES, TRIM) since the daemon opened it.",
            per_volume(|s| s.bytes_written),
        )?;
        counters(
            enc,
            "volume_writes",
            "Writes (WRITE, WRITE_ZEROES, TRIM) to the volume since the daemon opened it.",
            per_volume(|s| s.writes),
        )?;
        counters(
            enc,
            "volume_flushes",
            "NBD flushes of the volume since the daemon opened it.",
            per_volume(|s| s.flushes),
        )?;
        self.per_volume(
            enc,
            "volume_nbd_clients",
            "NBD clients attached to the volume's export.",
            |v| v.nbd_clients as u64,
        )?;
        self.per_volume(
            enc,
            "volume_tracking_failed",
            "1 when a metadata write failed and the volume refuses writes (see cutover volume status).",
            |v| u64::from(v.status.failed.is_some()),
        )?;
        let mut family = enc.encode_descriptor(
            "volume_write_latency_seconds",
            "Time from an NBD write request's start to its reply (WRITE, WRITE_ZEROES, TRIM; with protocol C the peers' acknowledgements included).",
            None,
            MetricType::Histogram,
        )?;
        for v in vols {
            let l = &v.latency;
            family
                .encode_family(&Self::volume_labels(v))?
                .encode_histogram::<NoLabelSet>(l.sum_secs, l.count, &l.buckets, None)?;
        }
        Ok(())
    }

    fn encode_peers(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        gauges(
            enc,
            "volume_peer_connection_state",
            "The link to the peer: 1 for its current state, 0 for the others.",
            self.peers()
                .flat_map(|(l, p)| state_set(l, "state", &CONNECTION_STATES, &p.connection)),
        )?;
        gauges(
            enc,
            "volume_peer_disk_state",
            "The peer's data as this node knows it: 1 for the current state, 0 for the others.",
            self.peers()
                .flat_map(|(l, p)| state_set(l, "state", &PEER_DISK_STATES, &p.peer_disk)),
        )?;
        self.per_peer(
            enc,
            "volume_peer_out_of_sync_bytes",
            "Bytes of the volume the peer may lack.",
            |p| p.out_of_sync_bytes,
        )?;
        self.per_peer(
            enc,
            "volume_peer_lag_bytes",
            "Bytes sent to the peer and not yet applied by it.",
            |p| p.lag_bytes,
        )?;
        self.per_peer(
            enc,
            "volume_peer_lag_seconds",
            "Age of the oldest write sent to the peer and not yet applied by it.",
            |p| p.lag_secs,
        )?;
        self.per_peer(
            enc,
            "volume_peer_resync_bytes_per_second",
            "Resync rate to the peer (this node its source), 0 when no resync runs.",
            |p| p.resync_rate,
        )?;
        self.per_peer(
            enc,
            "volume_peer_connections",
            "Data connections of the link to the peer.",
            |p| p.connections as u64,
        )?;
        let per_peer =
            |f: fn(&crate::roles::PeerStatus) -> u64| self.peers().map(move |(l, p)| (l, f(p)));
        counters(
            enc,
            "volume_peer_verified_bytes",
            "Bytes online verifies compared with the peer since the daemon started.",
            per_peer(|p| p.verified_bytes),
        )?;
        counters(
            enc,
            "volume_peer_mismatched_blocks",
            "Blocks checksum comparisons with the peer found different and resent, since the daemon started.",
            per_peer(|p| p.mismatched_blocks),
        )
    }

    fn encode_sessions(&self, enc: &mut DescriptorEncoder) -> fmt::Result {
        let none = Labels::new;
        gauges(
            enc,
            "sync_sessions_active",
            "Sync sessions (cutover sync to or from this daemon) open now.",
            [(none(), self.sessions_active)],
        )?;
        counters(
            enc,
            "sync_sessions",
            "Sync sessions opened since the daemon started.",
            [(none(), self.sessions_total)],
        )?;
        counters(
            enc,
            "sync_sent_bytes",
            "Bytes sync sessions sent (framed, before TLS) since the daemon started.",
            [(none(), self.sent)],
        )?;
        counters(
            enc,
            "sync_received_bytes",
            "Bytes sync sessions received (framed, after TLS) since the daemon started.",
            [(none(), self.received)],
        )?;
        let reason = |r: &str| vec![("reason", r.to_string())];
        counters(
            enc,
            "auth_failures",
            "Connections refused since the daemon started: reason=\"tls_handshake\" for a failed or refused TLS handshake, reason=\"credentials\" for a wrong token, an unknown client or peer certificate, or a wrong join proof.",
            [
                (reason("tls_handshake"), self.tls_failures),
                (reason("credentials"), self.auth_failures),
            ],
        )
    }
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        self.encode_volumes(&mut enc)?;
        self.encode_peers(&mut enc)?;
        self.encode_sessions(&mut enc)
    }
}
