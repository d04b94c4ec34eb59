//! The `--files-from` list on the side that has it: read once (a file or standard input),
//! every record checked and normalised, then sorted into walk order without duplicates — in
//! memory while it is small, else in sorted runs on unlinked temporary files merged into one —
//! so that a session, and each retry of it, streams the list from its start with bounded
//! memory, and the sender can walk it in one pass that never goes back.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Read, Seek, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

/// Bytes of paths sorted in memory before a sorted run goes to a temporary file: a list of
/// up to about half a million paths never touches the disk.
pub const SORT_BUDGET: usize = 32 << 20;
/// The longest path a list may name (as `cofs::validate_rel` and Linux's `PATH_MAX`).
const MAX_PATH: usize = 4096;
/// The longest record read before it is refused: room for leading slashes and `./`.
const MAX_RECORD: usize = 2 * MAX_PATH;
/// Per-path cost of holding it in memory besides its bytes (the `Vec` itself, the heap's
/// bookkeeping), so that a list of many short paths also spills.
const PER_PATH: usize = 40;

/// Why a list could not be read. Each is one line naming the list (and the line) and what to do.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    #[error("--files-from {list}: {source}")]
    Read {
        list: String,
        #[source]
        source: std::io::Error,
    },
    #[error("--files-from {list}: {unit} {n}: {reason}")]
    Bad {
        list: String,
        /// "line", or "entry" for a NUL-separated list.
        unit: &'static str,
        n: u64,
        reason: String,
    },
    #[error("--files-from {list}: cannot sort the list on a temporary file ($TMPDIR): {source}")]
    Spill {
        list: String,
        #[source]
        source: std::io::Error,
    },
}

/// Compare two normalised paths in walk order: component by component, each byte-wise, a
/// directory before what is beneath it — the order of a sorted walk (`cofs::Walker`), so the
/// list's paths and the walk beneath a listed directory interleave into one walk order.
pub fn walk_order(a: &[u8], b: &[u8]) -> Ordering {
    // '/' sorts before every byte a name can hold (no NUL in paths), which compares
    // component by component: "a/b" < "a-c" because "a" < "a-c".
    let key = |c: &u8| if *c == b'/' { 0 } else { *c };
    a.iter().map(key).cmp(b.iter().map(key))
}

/// Whether `path` is `dir` or beneath it ("" is the root, above everything).
pub fn is_within(path: &[u8], dir: &[u8]) -> bool {
    dir.is_empty()
        || path == dir
        || (path.len() > dir.len() && path.starts_with(dir) && path[dir.len()] == b'/')
}

/// One record of a list as the path it names: `Ok(None)` for a record that names nothing (a
/// blank line; without `from0` also a comment, `#` or `;` first, as rsync reads it). A
/// leading `/` is dropped (paths are relative to the source, as in rsync), and so are `.` and
/// empty components; "" is the source itself. `..` is refused: a list never leads out of the
/// source.
pub fn parse_record(raw: &[u8], from0: bool) -> Result<Option<Vec<u8>>, String> {
    let raw = if from0 {
        raw
    } else {
        // A list written on Windows: rsync drops the CR too.
        raw.strip_suffix(b"\r").unwrap_or(raw)
    };
    if raw.is_empty() || (!from0 && matches!(raw[0], b'#' | b';')) {
        return Ok(None);
    }
    let shown = || format!("{:?}", String::from_utf8_lossy(raw));
    if raw.contains(&0) {
        return Err(format!(
            "{}: a NUL byte in a path; for a NUL-separated list (find -print0) add --from0",
            shown()
        ));
    }
    let mut path = Vec::with_capacity(raw.len());
    for comp in raw.split(|&b| b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                return Err(format!(
                    "{}: '..' would lead out of the source; list paths relative to the source, without '..'",
                    shown()
                ))
            }
            c if c.len() > 255 => {
                return Err(format!("{}: a name longer than 255 bytes", shown()));
            }
            c => {
                if !path.is_empty() {
                    path.push(b'/');
                }
                path.extend_from_slice(c);
            }
        }
    }
    if path.len() > MAX_PATH {
        return Err(format!("{}: longer than {MAX_PATH} bytes", shown()));
    }
    Ok(Some(path))
}

/// A list read, checked and sorted: iterate it with [`PathList::cursor`], as often as needed.
#[derive(Debug)]
pub struct PathList {
    store: Store,
    len: u64,
}

#[derive(Debug)]
enum Store {
    Memory(Vec<Vec<u8>>),
    /// NUL-terminated paths in walk order, in an unlinked temporary file.
    Spilled(File),
}

impl PathList {
    /// Read the list at `list` (`-`: standard input). Blocking: call it off the runtime.
    pub fn read(list: &Path, from0: bool) -> Result<PathList, ListError> {
        let name = list.display().to_string();
        if list == Path::new("-") {
            let stdin = std::io::stdin();
            return PathList::from_reader(stdin.lock(), "-", from0, SORT_BUDGET);
        }
        let file = File::open(list).map_err(|source| ListError::Read {
            list: name.clone(),
            source,
        })?;
        PathList::from_reader(
            BufReader::with_capacity(64 << 10, file),
            &name,
            from0,
            SORT_BUDGET,
        )
    }

    /// Read a list from `input`, sorting in memory up to `budget` bytes at a time.
    pub fn from_reader(
        mut input: impl BufRead,
        name: &str,
        from0: bool,
        budget: usize,
    ) -> Result<PathList, ListError> {
        let delim = if from0 { 0 } else { b'\n' };
        let unit = if from0 { "entry" } else { "line" };
        let bad = |n, reason| ListError::Bad {
            list: name.to_string(),
            unit,
            n,
            reason,
        };
        let spill = |source| ListError::Spill {
            list: name.to_string(),
            source,
        };
        let mut sorter = Sorter::new(budget);
        let mut record = Vec::new();
        let mut n = 0u64;
        loop {
            let read =
                read_record(&mut input, delim, &mut record).map_err(|source| ListError::Read {
                    list: name.to_string(),
                    source,
                })?;
            n += 1;
            match read {
                Record::End => break,
                Record::TooLong => {
                    return Err(bad(n, format!("longer than {MAX_RECORD} bytes")));
                }
                Record::Got => {
                    if let Some(path) = parse_record(&record, from0).map_err(|r| bad(n, r))? {
                        sorter.push(path).map_err(spill)?;
                    }
                }
            }
        }
        let (store, len) = sorter.finish().map_err(spill)?;
        Ok(PathList { store, len })
    }

    /// Paths in the list (each once).
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A reader of the list from its first path.
    pub fn cursor(self: &Arc<Self>) -> PathCursor {
        let spilled = match &self.store {
            Store::Memory(_) => None,
            Store::Spilled(_) => Some(BufReader::with_capacity(
                64 << 10,
                SpillReader {
                    list: self.clone(),
                    at: 0,
                },
            )),
        };
        PathCursor {
            list: self.clone(),
            next: 0,
            spilled,
        }
    }
}

/// Reads a `PathList` in order; any number may read one list at once.
pub struct PathCursor {
    list: Arc<PathList>,
    /// In memory: the index of the next path.
    next: usize,
    spilled: Option<BufReader<SpillReader>>,
}

impl PathCursor {
    /// Up to `max_paths` paths or about `max_bytes` of them (at least one path, if any is
    /// left), and whether the list ends with them.
    pub fn chunk(
        &mut self,
        max_paths: usize,
        max_bytes: usize,
    ) -> std::io::Result<(Vec<Vec<u8>>, bool)> {
        let mut out = Vec::new();
        let mut bytes = 0;
        while out.len() < max_paths && bytes < max_bytes {
            match self.next() {
                Some(p) => {
                    let p = p?;
                    bytes += p.len();
                    out.push(p);
                }
                None => return Ok((out, true)),
            }
        }
        Ok((out, false))
    }
}

impl Iterator for PathCursor {
    type Item = std::io::Result<Vec<u8>>;

    fn next(&mut self) -> Option<Self::Item> {
        match (&self.list.store, &mut self.spilled) {
            (Store::Memory(paths), _) => {
                let p = paths.get(self.next)?.clone();
                self.next += 1;
                Some(Ok(p))
            }
            (Store::Spilled(_), Some(reader)) => {
                let mut p = Vec::new();
                match reader.read_until(0, &mut p) {
                    Ok(0) => None,
                    Ok(_) => {
                        p.pop();
                        Some(Ok(p))
                    }
                    Err(e) => Some(Err(e)),
                }
            }
            (Store::Spilled(_), None) => None,
        }
    }
}

/// Reads the spilled list at its own offset, so cursors do not share one.
struct SpillReader {
    list: Arc<PathList>,
    at: u64,
}

impl Read for SpillReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let Store::Spilled(file) = &self.list.store else {
            return Ok(0);
        };
        let n = file.read_at(buf, self.at)?;
        self.at += n as u64;
        Ok(n)
    }
}

enum Record {
    Got,
    End,
    TooLong,
}

/// Read up to the next `delim` (not included) into `buf`, refusing a record longer than
/// `MAX_RECORD` before holding more of it: a list without any delimiter is not read whole.
fn read_record(input: &mut impl BufRead, delim: u8, buf: &mut Vec<u8>) -> std::io::Result<Record> {
    buf.clear();
    loop {
        let available = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            // The last record may lack its delimiter.
            return Ok(if buf.is_empty() {
                Record::End
            } else {
                Record::Got
            });
        }
        let (take, found) = match available.iter().position(|&b| b == delim) {
            Some(i) => (i, true),
            None => (available.len(), false),
        };
        if buf.len() + take > MAX_RECORD {
            return Ok(Record::TooLong);
        }
        buf.extend_from_slice(&available[..take]);
        input.consume(take + usize::from(found));
        if found {
            return Ok(Record::Got);
        }
    }
}

/// Sorting with bounded memory: sorted runs of `budget` bytes go to temporary files and are
/// merged at the end.
struct Sorter {
    budget: usize,
    paths: Vec<Vec<u8>>,
    bytes: usize,
    runs: Vec<File>,
}

impl Sorter {
    fn new(budget: usize) -> Self {
        Sorter {
            budget,
            paths: Vec::new(),
            bytes: 0,
            runs: Vec::new(),
        }
    }

    fn push(&mut self, path: Vec<u8>) -> std::io::Result<()> {
        self.bytes += path.len() + PER_PATH;
        self.paths.push(path);
        if self.bytes >= self.budget {
            self.spill()?;
        }
        Ok(())
    }

    fn sorted(&mut self) -> Vec<Vec<u8>> {
        let mut paths = std::mem::take(&mut self.paths);
        self.bytes = 0;
        paths.sort_unstable_by(|a, b| walk_order(a, b));
        paths.dedup();
        paths
    }

    fn spill(&mut self) -> std::io::Result<()> {
        let paths = self.sorted();
        let mut run = BufWriter::with_capacity(64 << 10, tempfile::tempfile()?);
        for p in &paths {
            run.write_all(p)?;
            run.write_all(&[0])?;
        }
        let mut file = run.into_inner().map_err(|e| e.into_error())?;
        file.rewind()?;
        self.runs.push(file);
        Ok(())
    }

    /// The list in walk order, each path once, and how many paths it holds.
    fn finish(mut self) -> std::io::Result<(Store, u64)> {
        if self.runs.is_empty() {
            let paths = self.sorted();
            let n = paths.len() as u64;
            return Ok((Store::Memory(paths), n));
        }
        if !self.paths.is_empty() {
            self.spill()?;
        }
        let mut readers: Vec<BufReader<File>> = std::mem::take(&mut self.runs)
            .into_iter()
            .map(|f| BufReader::with_capacity(64 << 10, f))
            .collect();
        let mut heap = BinaryHeap::new();
        for (run, r) in readers.iter_mut().enumerate() {
            if let Some(path) = next_spilled(r)? {
                heap.push(Head { path, run });
            }
        }
        let mut out = BufWriter::with_capacity(64 << 10, tempfile::tempfile()?);
        let mut last: Option<Vec<u8>> = None;
        let mut n = 0u64;
        while let Some(Head { path, run }) = heap.pop() {
            if let Some(next) = next_spilled(&mut readers[run])? {
                heap.push(Head { path: next, run });
            }
            // Runs are each free of duplicates, not of each other's.
            if last.as_deref() == Some(path.as_slice()) {
                continue;
            }
            out.write_all(&path)?;
            out.write_all(&[0])?;
            n += 1;
            last = Some(path);
        }
        let file = out.into_inner().map_err(|e| e.into_error())?;
        Ok((Store::Spilled(file), n))
    }
}

fn next_spilled(r: &mut BufReader<File>) -> std::io::Result<Option<Vec<u8>>> {
    let mut p = Vec::new();
    if r.read_until(0, &mut p)? == 0 {
        return Ok(None);
    }
    p.pop();
    Ok(Some(p))
}

/// The smallest unmerged path of one run; the heap pops the smallest first.
struct Head {
    path: Vec<u8>,
    run: usize,
}

impl Ord for Head {
    fn cmp(&self, other: &Self) -> Ordering {
        walk_order(&other.path, &self.path).then(other.run.cmp(&self.run))
    }
}

impl PartialOrd for Head {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Head {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Head {}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(text: &[u8], from0: bool, budget: usize) -> Result<Vec<String>, ListError> {
        let list = Arc::new(PathList::from_reader(text, "LIST", from0, budget)?);
        let paths: Vec<String> = list
            .cursor()
            .map(|p| String::from_utf8(p.unwrap()).unwrap())
            .collect();
        assert_eq!(paths.len() as u64, list.len());
        Ok(paths)
    }

    #[test]
    fn records_are_normalised_and_comments_dropped_as_rsync_does() {
        let text = b"b/x\n#comment\n;comment\n\n/a//c/./d/\r\n./a\na\n.\n b\n";
        assert_eq!(
            read(text, false, SORT_BUDGET).unwrap(),
            ["", " b", "a", "a/c/d", "b/x"]
        );
        // NUL-separated: every record is a path, '#' and ';' first included; newlines are
        // part of names.
        let text = b"#hash\0;semi\0new\nline\0\0a";
        assert_eq!(
            read(text, true, SORT_BUDGET).unwrap(),
            ["#hash", ";semi", "a", "new\nline"]
        );
    }

    #[test]
    fn walk_order_puts_a_directory_before_its_contents_and_siblings_by_name() {
        let mut v = vec!["a-c", "a/b", "a", "ab/x", "a/b/c", "B", ""];
        v.sort_by(|a, b| walk_order(a.as_bytes(), b.as_bytes()));
        assert_eq!(v, ["", "B", "a", "a/b", "a/b/c", "a-c", "ab/x"]);
        assert!(is_within(b"a/b", b"a") && is_within(b"a", b"a") && is_within(b"x", b""));
        assert!(!is_within(b"ab", b"a") && !is_within(b"a", b"a/b"));
    }

    #[test]
    fn bad_records_name_the_line_and_the_fix() {
        let e = read(b"ok\n../x\n", false, SORT_BUDGET)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--files-from LIST: line 2: \"../x\""), "{e}");
        assert!(e.contains("without '..'"), "{e}");
        let e = read(b"a/../../b\0", true, SORT_BUDGET)
            .unwrap_err()
            .to_string();
        assert!(e.contains("entry 1"), "{e}");
        let e = read(b"a\0b\n", false, SORT_BUDGET).unwrap_err().to_string();
        assert!(e.contains("--from0"), "{e}");
        let long = vec![b'x'; 300];
        let e = read(&long, false, SORT_BUDGET).unwrap_err().to_string();
        assert!(e.contains("255"), "{e}");
        let endless = vec![b'y'; 3 * MAX_RECORD];
        let e = read(&endless, false, SORT_BUDGET).unwrap_err().to_string();
        assert!(e.contains("line 1: longer than"), "{e}");
    }

    #[test]
    fn a_list_larger_than_the_budget_is_merged_from_runs_in_order_without_duplicates() {
        let mut text = Vec::new();
        let mut expected = Vec::new();
        for i in (0..3000u32).rev() {
            let p = format!("d{}/f{}", i % 37, i);
            text.extend_from_slice(p.as_bytes());
            text.push(b'\n');
            // Every path twice, in different runs.
            if i % 3 == 0 {
                text.extend_from_slice(p.as_bytes());
                text.push(b'\n');
            }
            expected.push(p);
        }
        expected.sort_by(|a, b| walk_order(a.as_bytes(), b.as_bytes()));
        // Spills every few hundred paths.
        let got = read(&text, false, 16 << 10).unwrap();
        assert_eq!(got, expected);
        // And read again from the start, as a retried session does, in chunks.
        let list = Arc::new(PathList::from_reader(&text[..], "L", false, 16 << 10).unwrap());
        let mut c = list.cursor();
        let mut n = 0;
        loop {
            let (chunk, last) = c.chunk(1000, 1 << 20).unwrap();
            n += chunk.len();
            if last {
                break;
            }
        }
        assert_eq!(n, expected.len());
    }
}
