//! Changed-block passes of a hosted volume (`cutover sync volume:NAME DEST`): for each
//! destination a pass went to, which blocks it still lacks, so that the next pass sends
//! only those instead of hashing the whole device on both sides.
//!
//! A destination's record says: "DEST holds the volume as it was when generation `gen`
//! began, except the blocks in `owed`". Every mark (a pass's own, or `cutover volume
//! mark`) ends a generation; its snapshot (the blocks written during it) is added to the
//! `owed` of every record whose `gen` it ended, and the record moves to the new
//! generation. A pass takes `owed` and sends it; the blocks written meanwhile are in the
//! new generation, so in the next pass. If the pass fails, what it took is owed again.
//!
//! The first pass to a destination (no record, or a record a failed first pass dropped),
//! and a pass asked to compare everything, is a full pass: the sync's positional delta
//! over the whole device. Its mark starts the record, unconfirmed until it succeeds.
//!
//! Confirmed records are saved beside the metadata (`pass_store.rs`) at every mark and at
//! the end of every pass, with what a running pass took still counted as owed. A restart,
//! clean or not, keeps them while the volume's bitmap generation is the one they name (the
//! bitmap then holds every block written since, a superset after a crash); otherwise, and
//! when the file is missing or damaged, every destination gets a full pass: never a pass
//! that misses a block.

use crate::pass_store::{self, Saved};
use crate::volumes::Hosted;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use volume::Snapshot;

/// The destinations of one volume.
#[derive(Default)]
pub(crate) struct Passes {
    dests: Mutex<HashMap<String, Record>>,
    /// Where confirmed records are saved (None: memory only).
    file: Option<PathBuf>,
}

struct Record {
    /// The generation whose writes the destination may lack beyond `owed` (the bitmap id
    /// since the last mark).
    gen: u64,
    /// Blocks of earlier generations the destination lacks.
    owed: Option<Snapshot>,
    /// What the running pass took from `owed` (still owed until it succeeds).
    sending: Option<Snapshot>,
    /// A pass succeeded with this record; until then a failure drops it.
    confirmed: bool,
    /// A pass to this destination is running.
    busy: bool,
}

/// What a pass sends.
pub(crate) enum PassMode {
    /// These blocks, and nothing else: the bitmap's bytes (`Snapshot::to_bytes`) and the
    /// bytes of volume they cover. The record keeps the snapshot itself until the pass ends.
    Changed { bits: Vec<u8>, bytes: u64 },
    /// A comparison of the whole device (the first pass, or one asked for).
    Full,
}

/// A destination as `status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DestinationStatus {
    pub destination: String,
    /// Bytes the next pass sends, besides what is written after its mark.
    pub owed_bytes: u64,
    /// A pass to it has succeeded (else the next pass is a full one).
    pub confirmed: bool,
    pub running: bool,
}

/// `a ∪ b`.
fn union(a: Option<Snapshot>, b: Option<&Snapshot>) -> Option<Snapshot> {
    match (a, b) {
        (Some(mut a), Some(b)) => {
            a.union(b);
            Some(a)
        }
        (a, None) => a,
        (None, Some(b)) => Some(b.clone()),
    }
}

impl Passes {
    /// The destinations saved at `file` that are current with `meta`'s bitmap generation
    /// (see the module's documentation); the others are dropped, and said so in the log.
    pub(crate) fn load(name: &str, file: PathBuf, meta: &volume::Meta) -> Passes {
        let gen = meta.status().bitmap_gen;
        let mut dests = HashMap::new();
        let saved = match pass_store::load(&file) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(
                    "volume {name}: {}: {e}; every sync destination gets a full pass",
                    file.display()
                );
                Vec::new()
            }
        };
        let total = saved.len();
        for s in saved {
            if s.gen != gen {
                continue;
            }
            let owed = match s.owed.is_empty() {
                true => None,
                false => match meta.snapshot_from_bytes(&s.owed) {
                    Some(o) => Some(o),
                    None => continue,
                },
            };
            dests.insert(
                s.destination,
                Record {
                    gen,
                    owed,
                    sending: None,
                    confirmed: true,
                    busy: false,
                },
            );
        }
        if total > 0 {
            tracing::info!(
                "volume {name}: {} sync destination(s) remembered, {} dropped (the volume was marked since they were saved)",
                dests.len(),
                total - dests.len()
            );
        }
        Passes {
            dests: Mutex::new(dests),
            file: Some(file),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Record>> {
        self.dests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Save the confirmed records, a running pass's blocks counted as owed. A failure is
    /// logged: the file then names an older generation or is gone, and is not trusted.
    fn save(&self, name: &str, dests: &HashMap<String, Record>) {
        let Some(file) = &self.file else {
            return;
        };
        let records: Vec<Saved> = dests
            .iter()
            .filter(|(_, r)| r.confirmed)
            .map(|(d, r)| Saved {
                destination: d.clone(),
                gen: r.gen,
                owed: union(r.owed.clone(), r.sending.as_ref())
                    .map(|o| o.to_bytes())
                    .unwrap_or_default(),
            })
            .collect();
        if let Err(e) = pass_store::save(file, &records) {
            tracing::warn!(
                "volume {name}: cannot save the sync destinations to {}: {e}; after a restart they get a full pass",
                file.display()
            );
        }
    }

    pub(crate) fn status(&self) -> Vec<DestinationStatus> {
        let mut v: Vec<DestinationStatus> = self
            .lock()
            .iter()
            .map(|(d, r)| DestinationStatus {
                destination: d.clone(),
                owed_bytes: r.owed.as_ref().map_or(0, |o| o.bytes()),
                confirmed: r.confirmed,
                running: r.busy,
            })
            .collect();
        v.sort_by(|a, b| a.destination.cmp(&b.destination));
        v
    }
}

/// End a generation of `h` and hand its blocks to every record it ended.
fn mark_locked(h: &Hosted, dests: &mut HashMap<String, Record>) -> Result<Snapshot, String> {
    let snap = h
        .with_meta(|m| m.mark())?
        .map_err(|e| format!("volume {:?}: mark failed: {e}", h.name))?;
    // A record of another generation cannot be brought forward (it would miss a
    // generation's blocks): it is dropped, so its next pass is a full one.
    dests.retain(|_, r| {
        if r.gen != snap.from_gen {
            return false;
        }
        r.owed = union(r.owed.take(), Some(&snap));
        r.gen = snap.to_gen;
        true
    });
    h.passes.save(&h.name, dests);
    Ok(snap)
}

/// `cutover volume mark`: a mark that keeps every destination's record.
pub(crate) fn mark(h: &Hosted) -> Result<Snapshot, String> {
    let mut dests = h.passes.lock();
    mark_locked(h, &mut dests)
}

/// Start a pass of `h` to `destination`: mark, then say what it sends.
pub(crate) fn begin(h: &Hosted, destination: &str, full: bool) -> Result<PassMode, String> {
    let mut dests = h.passes.lock();
    if dests.get(destination).is_some_and(|r| r.busy) {
        return Err(format!(
            "a pass of volume {:?} to {destination} is already running; wait for it",
            h.name
        ));
    }
    let snap = mark_locked(h, &mut dests)?;
    match dests.get_mut(destination) {
        Some(r) if r.confirmed && !full => {
            r.busy = true;
            let owed = r.owed.take().unwrap_or_else(|| snap.cleared());
            let mode = PassMode::Changed {
                bits: owed.to_bytes(),
                bytes: owed.bytes(),
            };
            r.sending = Some(owed);
            Ok(mode)
        }
        _ => {
            dests.insert(
                destination.to_string(),
                Record {
                    gen: snap.to_gen,
                    owed: None,
                    sending: None,
                    confirmed: false,
                    busy: true,
                },
            );
            Ok(PassMode::Full)
        }
    }
}

/// The end of a pass: `ok` confirms the record; a failed pass owes again what it took,
/// and a failed full pass drops the record.
pub(crate) fn end(h: &Hosted, destination: &str, ok: bool) {
    let mut dests = h.passes.lock();
    let Some(r) = dests.get_mut(destination) else {
        return;
    };
    r.busy = false;
    let sent = r.sending.take();
    match (ok, sent) {
        (true, _) => r.confirmed = true,
        (false, Some(sent)) => r.owed = union(r.owed.take(), Some(&sent)),
        (false, None) => {
            dests.remove(destination);
        }
    }
    h.passes.save(&h.name, &dests);
}
