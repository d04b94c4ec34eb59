//! rsync's flags in `cutover sync`: those that say something true of cutover are accepted
//! (most are what cutover always does), those it cannot honour are refused before anything
//! runs with one line naming what to use instead, and `-h` alone prints help, as in rsync.
//! The table in docs/sync.md ("rsync's flags") says the same; keep the two in step.

use std::ffi::OsString;

/// The rsync flags `cutover sync` accepts (flattened into its arguments).
#[derive(clap::Args, Debug, Clone, Default)]
#[command(next_help_heading = "rsync's flags (accepted; docs/sync.md has the table)")]
pub struct RsyncArgs {
    /// Archive mode (-rlptgoD): what cutover always does.
    #[arg(short = 'a', long)]
    pub archive: bool,
    /// Recurse into directories: always.
    #[arg(short = 'r', long)]
    pub recursive: bool,
    /// Keep symlinks as links: always (part of -a).
    #[arg(short = 'l', long, hide = true)]
    pub links: bool,
    /// Keep permissions: always (part of -a).
    #[arg(short = 'p', long, hide = true)]
    pub perms: bool,
    /// Keep modification times: always (part of -a).
    #[arg(short = 't', long, hide = true)]
    pub times: bool,
    /// Keep the group: always, when the receiver runs as root (part of -a).
    #[arg(short = 'g', long, hide = true)]
    pub group: bool,
    /// Keep the owner: always, when the receiver runs as root (part of -a).
    #[arg(short = 'o', long, hide = true)]
    pub owner: bool,
    /// Keep device and special files: always (devices as root; part of -a).
    #[arg(short = 'D', hide = true)]
    pub devices_and_specials: bool,
    /// Keep device files: always, as root (part of -D).
    #[arg(long, hide = true)]
    pub devices: bool,
    /// Keep FIFOs and sockets: always (part of -D).
    #[arg(long, hide = true)]
    pub specials: bool,
    /// --progress --partial: the progress bar (on a terminal) and kept partial files, both always.
    #[arg(short = 'P')]
    pub progress_and_partial: bool,
    /// The progress bar: shown whenever stderr is a terminal (not with --json or -q).
    #[arg(long)]
    pub progress: bool,
    /// Keep partial files of an interrupted transfer: always (the next run resumes from them).
    #[arg(long)]
    pub partial: bool,
    /// The report at the end: printed unless -q.
    #[arg(long)]
    pub stats: bool,
    /// List every change (= -v).
    #[arg(short = 'i', long)]
    pub itemize_changes: bool,
    /// = --delete: cutover deletes after the transfer anyway.
    #[arg(long)]
    pub delete_after: bool,
    /// progress2 (the progress bar), stats (the report), name (= -v); comma-separated.
    #[arg(long, value_name = "FLAGS")]
    pub info: Vec<String>,
    /// Human-readable sizes: always. Alone (`cutover sync -h`) it prints this help.
    #[arg(short = 'h', long)]
    pub human_readable: bool,
    /// Keep holes in sparse files: always.
    #[arg(short = 'S', long)]
    pub sparse: bool,
    /// Copy POSIX ACLs: they travel as their system.posix_acl_* xattrs, so -A turns on -X.
    #[arg(short = 'A', long)]
    pub acls: bool,
    /// Print help (`-h` alone does too).
    #[arg(long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
}

impl RsyncArgs {
    /// Whether these flags ask for every change to be listed (`-i`, `--info=name`).
    pub fn itemize(&self) -> bool {
        self.itemize_changes
            || self
                .info
                .iter()
                .flat_map(|i| i.split(','))
                .any(|f| matches!(f, "name" | "name1"))
    }
}

/// What `--info` accepts.
const INFO: &[&str] = &["progress2", "stats", "stats1", "name", "name1"];

/// An rsync flag that cutover does not support, and what to do instead.
struct Refused {
    short: Option<char>,
    long: &'static str,
    instead: &'static str,
}

const fn no(short: Option<char>, long: &'static str, instead: &'static str) -> Refused {
    Refused {
        short,
        long,
        instead,
    }
}

const NO_BACKUP: &str = "cutover keeps no backups of replaced or deleted files; snapshot the destination first, or sync into a new directory";
const NO_BASIS_DIR: &str = "cutover compares with the destination only; copy the older tree first (cp -al OLD NEW) and sync into NEW";
const LINKS_AS_LINKS: &str =
    "cutover copies symlinks as links and never follows them; name the link's target as SRC instead";
const DELETE_AFTER: &str =
    "cutover deletes after the transfer only, when it had no errors; use --delete";
const FILTERS: &str = "use --include, --exclude and --exclude-from (rsync's rule syntax)";
const EQUAL: &str =
    "cutover makes the destination equal to the source; leave files out with --exclude";
const AS_IS: &str = "cutover copies modes and owners (by number, as root) as they are";

static REFUSED: &[Refused] = &[
    no(Some('b'), "backup", NO_BACKUP),
    no(None, "backup-dir", NO_BACKUP),
    no(None, "suffix", NO_BACKUP),
    no(None, "link-dest", NO_BASIS_DIR),
    no(None, "compare-dest", NO_BASIS_DIR),
    no(None, "copy-dest", NO_BASIS_DIR),
    no(Some('u'), "update", EQUAL),
    no(None, "existing", EQUAL),
    no(None, "ignore-existing", EQUAL),
    no(None, "max-size", EQUAL),
    no(None, "min-size", EQUAL),
    no(
        None,
        "remove-source-files",
        "cutover never deletes from the source; remove it yourself after a run that exits 0",
    ),
    no(Some('L'), "copy-links", LINKS_AS_LINKS),
    no(None, "copy-unsafe-links", LINKS_AS_LINKS),
    no(None, "safe-links", LINKS_AS_LINKS),
    no(Some('k'), "copy-dirlinks", LINKS_AS_LINKS),
    no(Some('K'), "keep-dirlinks", LINKS_AS_LINKS),
    no(
        Some('x'),
        "one-file-system",
        "cutover does not stop at mount points; leave them out with --exclude",
    ),
    no(None, "delete-before", DELETE_AFTER),
    no(None, "delete-during", DELETE_AFTER),
    no(None, "del", DELETE_AFTER),
    no(None, "delete-delay", DELETE_AFTER),
    no(
        None,
        "delete-excluded",
        "excluded entries are never deleted; sync without the exclude to delete them",
    ),
    no(
        Some('R'),
        "relative",
        "name the directory to copy as SRC (a trailing slash copies its contents)",
    ),
    no(
        None,
        "include-from",
        "write '+ PATTERN' lines into an --exclude-from FILE",
    ),
    no(Some('f'), "filter", FILTERS),
    no(Some('F'), "", FILTERS),
    no(Some('C'), "cvs-exclude", FILTERS),
    no(
        None,
        "size-only",
        "cutover compares size and mtime, or content with -c",
    ),
    no(
        Some('I'),
        "ignore-times",
        "cutover compares size and mtime; use -c to compare content",
    ),
    no(
        None,
        "append",
        "cutover resumes from partial files by itself; run the same command again",
    ),
    no(
        None,
        "append-verify",
        "cutover resumes from partial files by itself; run the same command again",
    ),
    no(
        Some('m'),
        "prune-empty-dirs",
        "empty directories are always copied; leave them out with --exclude",
    ),
    no(
        Some('O'),
        "omit-dir-times",
        "directory mtimes are always set, after their contents",
    ),
    no(
        Some('y'),
        "fuzzy",
        "delta uses the destination file of the same name only",
    ),
    no(None, "chmod", AS_IS),
    no(None, "chown", AS_IS),
    no(None, "usermap", AS_IS),
    no(None, "groupmap", AS_IS),
    no(None, "rsync-path", "use --remote-cutover PATH"),
    no(
        None,
        "port",
        "give the port in the destination: cutover://host:PORT/module/path",
    ),
    no(None, "password-file", "use --token-file FILE"),
    no(None, "log-file", "use --json for a machine-readable record"),
    no(
        None,
        "out-format",
        "use --json for a machine-readable record",
    ),
];

/// What the command line asks before clap sees it.
#[derive(Debug, PartialEq, Eq)]
pub enum Precheck {
    /// Nothing special: let clap parse it.
    Parse,
    /// `cutover sync -h` alone: print the help, as `rsync -h` does.
    Help,
    /// A flag cutover does not support: this one line, exit 2.
    Refused(String),
}

/// Look at `cutover sync ...` for `-h` alone, refused rsync flags and bad `--info` values,
/// before clap (whose hints for them would be wrong). `takes_value` tells, for a short
/// (`"j"`) or long (`"exclude"`) option of `sync`, whether it takes a value (which is
/// skipped, so `--exclude -b` is a pattern, not a flag).
pub fn precheck(argv: &[OsString], takes_value: &dyn Fn(&str) -> bool) -> Precheck {
    if argv.get(1).and_then(|a| a.to_str()) != Some("sync") {
        return Precheck::Parse;
    }
    let rest = &argv[2..];
    if rest.len() == 1 && rest[0] == "-h" {
        return Precheck::Help;
    }
    let mut i = 0;
    while i < rest.len() {
        let arg = rest[i].to_string_lossy();
        i += 1;
        if arg == "--" {
            break;
        }
        if let Some(long) = arg.strip_prefix("--") {
            let (name, value) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            if let Some(r) = REFUSED.iter().find(|r| !name.is_empty() && r.long == name) {
                return refused(r);
            }
            if !takes_value(name) {
                continue;
            }
            let value = match value {
                Some(v) => v,
                None => {
                    i += 1;
                    match rest.get(i - 1) {
                        Some(v) => v.to_string_lossy().into_owned(),
                        None => continue,
                    }
                }
            };
            if name == "info" {
                if let Some(bad) = value.split(',').find(|f| !INFO.contains(f)) {
                    return Precheck::Refused(format!(
                        "cutover sync: --info={bad} is not supported; cutover knows --info=progress2 (the progress bar), stats (the report) and name (= -v)"
                    ));
                }
            }
        } else if let Some(cluster) = arg.strip_prefix('-').filter(|c| !c.is_empty()) {
            for (at, c) in cluster.char_indices() {
                if let Some(r) = REFUSED.iter().find(|r| r.short == Some(c)) {
                    return refused(r);
                }
                if takes_value(c.encode_utf8(&mut [0; 4])) {
                    // The rest of the cluster is the value, else the next argument.
                    if at + c.len_utf8() == cluster.len() {
                        i += 1;
                    }
                    break;
                }
            }
        }
    }
    Precheck::Parse
}

fn refused(r: &Refused) -> Precheck {
    let name = match (r.short, r.long) {
        (Some(s), "") => format!("-{s}"),
        (Some(s), l) => format!("-{s}/--{l}"),
        (None, l) => format!("--{l}"),
    };
    Precheck::Refused(format!(
        "cutover sync: {name} is not supported: {}",
        r.instead
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(args: &[&str]) -> Precheck {
        let argv: Vec<OsString> = ["cutover", "sync"]
            .iter()
            .chain(args)
            .map(OsString::from)
            .collect();
        precheck(&argv, &|n| matches!(n, "j" | "e" | "exclude" | "info"))
    }

    #[test]
    fn refuses_in_clusters_and_long_forms_but_not_in_values() {
        assert_eq!(check(&["-h"]), Precheck::Help);
        assert_eq!(check(&["-avh", "a", "b"]), Precheck::Parse);
        assert!(
            matches!(check(&["-avb", "a", "b"]), Precheck::Refused(m) if m.contains("-b/--backup"))
        );
        assert!(
            matches!(check(&["--link-dest=x", "a", "b"]), Precheck::Refused(m) if m.contains("--link-dest"))
        );
        assert_eq!(check(&["--exclude", "-b", "a", "b"]), Precheck::Parse);
        assert_eq!(check(&["-je", "a", "b"]), Precheck::Parse);
        assert_eq!(check(&["-e", "ssh -x", "a", "b"]), Precheck::Parse);
        assert_eq!(check(&["--", "-b", "b"]), Precheck::Parse);
        assert_eq!(check(&["--info=progress2", "a", "b"]), Precheck::Parse);
        assert!(
            matches!(check(&["--info", "flist2", "a", "b"]), Precheck::Refused(m) if m.contains("--info=flist2"))
        );
    }
}
