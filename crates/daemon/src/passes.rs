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
//! Records live in the daemon's memory only: after a restart (or a crash, when the
//! metadata's bitmap says only "since the last mark") every destination gets a full pass
//! again, never a pass that misses a block.

use crate::volumes::Hosted;
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use volume::Snapshot;

/// The destinations of one volume.
#[derive(Default)]
pub(crate) struct Passes {
    dests: Mutex<HashMap<String, Record>>,
}

struct Record {
    /// The generation whose writes the destination may lack beyond `owed` (the bitmap id
    /// since the last mark).
    gen: u64,
    /// Blocks of earlier generations the destination lacks.
    owed: Option<Snapshot>,
    /// A pass succeeded with this record; until then a failure drops it.
    confirmed: bool,
    /// A pass to this destination is running.
    busy: bool,
}

/// What a pass sends.
pub(crate) enum PassMode {
    /// These blocks, and nothing else.
    Changed(Snapshot),
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

impl Passes {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Record>> {
        self.dests.lock().unwrap_or_else(|p| p.into_inner())
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
        r.owed = Some(match r.owed.take() {
            Some(mut o) => {
                o.union(&snap);
                o
            }
            None => snap.clone(),
        });
        r.gen = snap.to_gen;
        true
    });
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
            Ok(PassMode::Changed(owed))
        }
        _ => {
            dests.insert(
                destination.to_string(),
                Record {
                    gen: snap.to_gen,
                    owed: None,
                    confirmed: false,
                    busy: true,
                },
            );
            Ok(PassMode::Full)
        }
    }
}

/// The end of a pass: `ok` confirms the record; a failed pass owes again what it took
/// (`sent`), and a failed full pass drops the record.
pub(crate) fn end(h: &Hosted, destination: &str, ok: bool, sent: Option<Snapshot>) {
    let mut dests = h.passes.lock();
    let Some(r) = dests.get_mut(destination) else {
        return;
    };
    r.busy = false;
    match (ok, sent) {
        (true, _) => r.confirmed = true,
        (false, Some(sent)) => {
            r.owed = Some(match r.owed.take() {
                Some(mut o) => {
                    o.union(&sent);
                    o
                }
                None => sent,
            });
        }
        (false, None) => {
            dests.remove(destination);
        }
    }
}
