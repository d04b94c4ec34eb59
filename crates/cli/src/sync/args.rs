//! `cutover sync`'s command line ([`SyncArgs`]: clap, with the parsers of its values and
//! the filter rules in the order given), and the plain [`SyncJob`] it becomes, which a plan
//! task builds without any command line.

use super::*;

#[derive(clap::Args, Debug)]
pub struct SyncArgs {
    /// Source: a local path, [user@]host:PATH (ssh) or cutover://host[:port]/module/path. A
    /// trailing slash copies the directory's contents; without it, the directory itself.
    pub src: String,
    /// Destination: a local path, [user@]host:PATH (ssh) or cutover://host[:port]/module/path.
    pub dst: String,
    /// Data connections: a number, or auto (start with 16, double every 0.5-1 s while the delivered rate rises by 20%, up to 64).
    #[arg(short = 'j', long = "connections", default_value = "auto", value_parser = parse_connections)]
    pub connections: Connections,
    /// Delete destination entries that the source does not have (after the transfer).
    #[arg(long)]
    pub delete: bool,
    /// With --delete: abort before deleting anything if more than N entries would go.
    #[arg(long, value_name = "N")]
    pub max_delete: Option<u64>,
    /// Print what would change (itemised) without changing anything.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Send whole files, no delta.
    #[arg(short = 'W', long)]
    pub whole_file: bool,
    /// Compare content (hashes) even when size and mtime match.
    #[arg(short = 'c', long)]
    pub checksum: bool,
    /// Write into the destination file directly instead of a partial file and rename.
    #[arg(long)]
    pub inplace: bool,
    /// fsync every file before it is renamed into place (default: one filesystem sync at the end).
    #[arg(long)]
    pub fsync: bool,
    /// Preserve hard links.
    #[arg(short = 'H', long)]
    pub hard_links: bool,
    /// Preserve extended attributes.
    #[arg(short = 'X', long)]
    pub xattrs: bool,
    /// Owners are always mapped by number (set when the receiver runs as root); accepted for rsync users.
    #[arg(long)]
    pub numeric_ids: bool,
    /// Compress data frames with zstd (incompressible frames go raw).
    #[arg(short = 'z', long)]
    pub compress: bool,
    /// Exclude paths matching PATTERN (rsync rules: no '/' = any depth, leading '/' = anchored, trailing '/' = dirs).
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<String>,
    /// Include paths matching PATTERN (the first matching rule wins).
    #[arg(long, value_name = "PATTERN")]
    pub include: Vec<String>,
    /// Read exclude patterns from FILE (one a line; '#' comments; '+ PAT' includes, '- PAT' excludes).
    #[arg(long, value_name = "FILE")]
    pub exclude_from: Vec<PathBuf>,
    /// Sync only the paths listed in FILE ('-': standard input), one a line, relative to SRC: a listed directory with everything beneath it, and the directories on the way ('#' and ';' lines are comments). --delete acts only beneath listed directories.
    #[arg(long, value_name = "FILE")]
    pub files_from: Option<PathBuf>,
    /// With --files-from: the list's paths end with NUL instead of a newline (find -print0), and no line is a comment.
    #[arg(short = '0', long, requires = "files_from")]
    pub from0: bool,
    /// With --files-from: a listed path the source lacks is a fatal error (exit 1), not a warning (exit 4).
    #[arg(long, requires = "files_from")]
    pub files_from_strict: bool,
    /// With a `volume:NAME` source: the config of the local `cutover serve` that hosts the volume (to find its control socket; default: the state directory it uses without state_dir).
    #[arg(long, value_name = "FILE")]
    pub volume_config: Option<PathBuf>,
    /// Limit the total rate of all connections: bytes/s with K, M or G suffix (powers of 1024); a bare number is KiB/s.
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub bwlimit: Option<u64>,
    /// End a remote sync whose peer sent nothing, not even a keepalive, for SECS seconds
    /// (a stalled or vanished peer); 0 waits forever.
    #[arg(long, value_name = "SECS", default_value_t = 120, value_parser = parse_timeout)]
    pub timeout: u64,
    /// When a remote session breaks (reset, stalled, peer restarted), open it again and
    /// resume, waiting 1 s, 2 s, 4 s ... up to 30 s between tries; give up once SECS pass
    /// without progress. 0 never retries.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_RETRY_FOR)]
    pub retry_for: u64,
    /// Print one JSON event per line on stdout.
    #[arg(long)]
    pub json: bool,
    /// Itemise every change.
    #[arg(short, long)]
    pub verbose: bool,
    /// Print only errors.
    #[arg(short, long)]
    pub quiet: bool,
    #[command(flatten)]
    pub security: SecurityArgs,
    /// The command that reaches an ssh endpoint (split like a shell would); `ssh` by default.
    #[arg(
        short = 'e',
        long = "rsh",
        value_name = "COMMAND",
        env = "CUTOVER_RSH",
        default_value = "ssh"
    )]
    pub rsh: String,
    /// The cutover program on the remote side of an ssh endpoint.
    #[arg(long, value_name = "PATH", default_value = "cutover")]
    pub remote_cutover: String,
    #[command(flatten)]
    pub rsync: RsyncArgs,
    /// Filters in command-line order (filled by main from the raw matches).
    #[arg(skip)]
    pub filters: Vec<FilterRule>,
    /// Never copy this cutover to an ssh remote that has none (or another version) in its
    /// user's cache (~/.cache/cutover); fail instead, as --remote-cutover PATH does.
    #[arg(long)]
    pub no_remote_install: bool,
}

fn parse_timeout(s: &str) -> Result<u64, String> {
    let min = engine::MIN_IDLE_TIMEOUT.as_secs();
    match s.parse::<u64>() {
        Ok(n) if n == 0 || n >= min => Ok(n),
        _ => Err(format!(
            "{s:?}: expected 0 (no timeout) or a number of seconds from {min} up"
        )),
    }
}

fn parse_connections(s: &str) -> Result<Connections, String> {
    if s == "auto" {
        return Ok(Connections::Auto);
    }
    match s.parse::<usize>() {
        Ok(n) if (1..=256).contains(&n) => Ok(Connections::Fixed(n)),
        _ => Err(format!("{s:?}: expected auto or a number from 1 to 256")),
    }
}

/// `--bwlimit`: "500" (KiB/s), "10M", "1G", "64K".
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1 << 10),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a rate like 500 (KiB/s), 64K, 10M or 1G"))?;
    let bytes = (n * mult as f64) as u64;
    if bytes < 1024 {
        return Err(format!("{s:?}: the smallest rate is 1K"));
    }
    Ok(bytes)
}

/// Build the ordered filter list: --include/--exclude/--exclude-from in command-line order.
pub fn ordered_filters(matches: &clap::ArgMatches) -> Result<Vec<FilterRule>, String> {
    let mut at: Vec<(usize, Vec<FilterRule>)> = Vec::new();
    for (id, make) in [
        ("include", FilterRule::Include as fn(String) -> FilterRule),
        ("exclude", FilterRule::Exclude as fn(String) -> FilterRule),
    ] {
        if let (Some(vals), Some(idx)) = (matches.get_many::<String>(id), matches.indices_of(id)) {
            for (v, i) in vals.zip(idx) {
                at.push((i, vec![make(v.clone())]));
            }
        }
    }
    if let (Some(vals), Some(idx)) = (
        matches.get_many::<PathBuf>("exclude_from"),
        matches.indices_of("exclude_from"),
    ) {
        for (path, i) in vals.zip(idx) {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("--exclude-from {}: {e}", path.display()))?;
            let mut rules = Vec::new();
            for line in text.lines() {
                let l = line.trim_end();
                if l.is_empty() || l.starts_with('#') || l.starts_with(';') {
                    continue;
                }
                if let Some(p) = l.strip_prefix("+ ") {
                    rules.push(FilterRule::Include(p.to_string()));
                } else if let Some(p) = l.strip_prefix("- ") {
                    rules.push(FilterRule::Exclude(p.to_string()));
                } else {
                    rules.push(FilterRule::Exclude(l.to_string()));
                }
            }
            at.push((i, rules));
        }
    }
    at.sort_by_key(|(i, _)| *i);
    Ok(at.into_iter().flat_map(|(_, r)| r).collect())
}

/// One sync, as plain options: what `cutover sync` parses its arguments into and what a
/// plan task is turned into, so both run through [`run_job`].
#[derive(Debug, Clone)]
pub struct SyncJob {
    pub src: String,
    pub dst: String,
    pub connections: Connections,
    /// What both ends agree on; `owners`, `copy_dir_itself` and `files_from` are set by
    /// [`run_job`] (from this process's rights, the source's trailing slash and
    /// `SyncJob::files_from`). `files_from_strict` is the caller's.
    pub options: SyncOptions,
    /// Idle timeout of a remote session in seconds (0 = none).
    pub timeout: u64,
    /// Seconds without progress after which a broken remote session is no longer reopened.
    pub retry_for: u64,
    pub security: SecurityArgs,
    pub rsh: String,
    pub remote_cutover: String,
    /// Install this binary on an ssh remote whose `remote_cutover` is missing or of another
    /// version (`net::remote_install`).
    pub remote_install: bool,
    /// Only the paths listed in this file (rsync's `--files-from`).
    pub files_from: Option<FilesFrom>,
    /// A tracked volume's pass (`volume:NAME`, see `volume_pass`): `src` is its backing,
    /// and these are the blocks written since the destination's last pass.
    pub changed: Option<Arc<ChangedBlocks>>,
    /// The config of the `cutover serve` hosting a `volume:NAME` source (to find its
    /// control socket); `None`: the default state directory.
    pub volume_config: Option<std::path::PathBuf>,
}

/// A list of paths relative to the source root: only they (and, for a directory, what is
/// beneath it) are walked and compared, and `--delete` acts only beneath listed directories.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilesFrom {
    /// The list's file; `-` is standard input.
    pub list: std::path::PathBuf,
    /// Paths end with NUL instead of a newline (`--from0`).
    pub from0: bool,
}

/// The remote program unless named otherwise: `cutover` in the remote `PATH`.
pub const DEFAULT_REMOTE_CUTOVER: &str = "cutover";

impl SyncArgs {
    pub fn job(&self) -> SyncJob {
        SyncJob {
            src: self.src.clone(),
            dst: self.dst.clone(),
            connections: self.connections,
            options: SyncOptions {
                delete: self.delete || self.rsync.delete_after,
                max_delete: self.max_delete,
                dry_run: self.dry_run,
                whole_file: self.whole_file,
                checksum: self.checksum,
                inplace: self.inplace,
                fsync: self.fsync,
                hard_links: self.hard_links,
                xattrs: self.xattrs || self.rsync.acls,
                compress: self.compress,
                filters: self.filters.clone(),
                bwlimit: self.bwlimit,
                files_from_strict: self.files_from_strict,
                ..SyncOptions::default()
            },
            timeout: self.timeout,
            retry_for: self.retry_for,
            security: self.security.clone(),
            rsh: self.rsh.clone(),
            remote_cutover: self.remote_cutover.clone(),
            // A program named on purpose is the one to run, not ours.
            remote_install: !self.no_remote_install
                && self.remote_cutover == DEFAULT_REMOTE_CUTOVER,
            files_from: self.files_from.clone().map(|list| FilesFrom {
                list,
                from0: self.from0,
            }),
            changed: None,
            volume_config: self.volume_config.clone(),
        }
    }
}
