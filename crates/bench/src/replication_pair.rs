//! The daemons of the replication rows: each node's state directory, config (one peer for
//! R1–R5, several for R7) and daemon, the pair of R1–R5 dialling through a wanem relay or
//! direct, waiting until a peer is in step, CPU marks, and the `nbd_load.py` writers.

use crate::proc::{describe, quote, stdout_of, tail, Background};
use crate::replication::{CONNECTIONS, NBD_LOAD, POLL};
use crate::tools::{self, Env, Verify, Wanem, WireCount};
use crate::volume_io::VOLUME;
use crate::volume_io::{create_md, same_bytes, serve, sparse_file, stop_cleanly};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The peer options both nodes are given.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerOpts {
    pub(crate) protocol: &'static str,
    pub(crate) csums: bool,
}

/// One node: its directory, config, backing and daemon identity.
pub(crate) struct Node {
    pub(crate) dir: PathBuf,
    pub(crate) config: PathBuf,
    pub(crate) backing: PathBuf,
    pub(crate) fingerprint: String,
}

impl Node {
    /// `run_dir/name` with a backing of `size` bytes (a copy of `initial`, or sparse) and
    /// an identity made in advance, so each config can pin the other's fingerprint.
    pub(crate) fn new(
        bin: &Path,
        run_dir: &Path,
        name: &str,
        size: u64,
        initial: Option<&Path>,
    ) -> Result<Node> {
        let dir = run_dir.join(name);
        let state = dir.join("state");
        fs::create_dir_all(&state).with_context(|| format!("create {}", state.display()))?;
        let backing = dir.join("backing.img");
        match initial {
            Some(img) => {
                fs::copy(img, &backing)
                    .with_context(|| format!("copy {} to {}", img.display(), backing.display()))?;
            }
            None => sparse_file(&backing, size)?,
        }
        let mut cmd = Command::new(bin);
        cmd.args(["identity", "--file"])
            .arg(state.join("identity.pem"));
        let fingerprint = stdout_of(&mut cmd)?.trim().to_string();
        Ok(Node {
            config: dir.join("serve.toml"),
            dir,
            backing,
            fingerprint,
        })
    }

    pub(crate) fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// This node's config: the volume with `peer` (named `peer_name`) as its one peer,
    /// dialled at `127.0.0.1:PORT` when `address` is given.
    pub(crate) fn configure(
        &self,
        peer_name: &str,
        peer: &Node,
        address: Option<u16>,
        o: PeerOpts,
    ) -> Result<()> {
        self.configure_peers(&[PeerLine {
            name: peer_name,
            node: peer,
            address,
            opts: o,
        }])
    }

    /// This node's config: the volume with `peers`, in that order.
    pub(crate) fn configure_peers(&self, peers: &[PeerLine]) -> Result<()> {
        let mut text = format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n\n[[volume]]\nname = \"{VOLUME}\"\nbacking = {:?}\n",
            self.state().display().to_string(),
            self.backing.display().to_string(),
        );
        for p in peers {
            text.push_str(&format!(
                "[[volume.peer]]\nname = \"{}\"\nfingerprint = \"{}\"\nprotocol = \"{}\"\n\
                 connections = {CONNECTIONS}\ncsums = {}\n",
                p.name, p.node.fingerprint, p.opts.protocol, p.opts.csums,
            ));
            if let Some(port) = p.address {
                text.push_str(&format!("address = \"127.0.0.1:{port}\"\n"));
            }
        }
        fs::write(&self.config, text).with_context(|| format!("write {}", self.config.display()))
    }
}

/// One `[[volume.peer]]` of a node's config.
pub(crate) struct PeerLine<'a> {
    pub(crate) name: &'a str,
    pub(crate) node: &'a Node,
    /// Dialled at `127.0.0.1:PORT` when given, else waited for.
    pub(crate) address: Option<u16>,
    pub(crate) opts: PeerOpts,
}

/// `cutover volume ARGS --config NODE's config`.
pub(crate) fn volume_at(bin: &Path, node: &Node, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new(bin);
    cmd.arg("volume")
        .args(args)
        .arg("--config")
        .arg(&node.config);
    stdout_of(&mut cmd)
}

/// The volume's entry in `status --json` on `node`.
pub(crate) fn status_at(bin: &Path, node: &Node) -> Result<Value> {
    let text = volume_at(bin, node, &["status", VOLUME, "--json"])?;
    let v: Value = serde_json::from_str(text.trim())
        .with_context(|| format!("status --json printed {text:?}"))?;
    Ok(v["volumes"][0].clone())
}

/// Whether a peer in a status is in step: connected, this node the source, nothing out of
/// sync, nothing in flight, the peer up to date.
pub(crate) fn peer_in_step(p: &Value) -> bool {
    p["connection"] == "connected"
        && p["replication"] == "source"
        && p["out_of_sync_bytes"] == 0
        && p["lag_bytes"] == 0
        && p["peer_disk"] == "UpToDate"
}

/// Whether alpha's status says its peer is in step: connected, alpha the source, nothing
/// out of sync, nothing in flight, the peer up to date.
pub(crate) fn in_step(st: &Value) -> bool {
    peer_in_step(&st["peers"][0])
}

/// Note in `up` when a status sample first shows the link connected.
pub(crate) fn link_up(up: &mut Option<Instant>, st: &Value) {
    if up.is_none() && st["peers"][0]["connection"] == "connected" {
        *up = Some(Instant::now());
    }
}

pub(crate) fn peer_u64(st: &Value, key: &str) -> u64 {
    st["peers"][0][key].as_u64().unwrap_or(0)
}

/// CPU seconds (user + system) a process has used so far.
pub(crate) fn cpu_secs(pid: i32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After "pid (comm)": state is field 3, utime 14, stime 15.
    let rest: Vec<&str> = stat[stat.rfind(')')? + 1..].split_whitespace().collect();
    let ticks = rest.get(11)?.parse::<f64>().ok()? + rest.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| ticks / hz as f64)
}

/// CPU used so far by wanem, alpha's and beta's daemons, at one instant.
pub(crate) struct CpuMark {
    pub(crate) at: Instant,
    pub(crate) secs: [Option<f64>; 3],
}

impl CpuMark {
    /// Each process's share of one core between `self` and `later`.
    pub(crate) fn share_until(&self, later: &CpuMark) -> Value {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let share = |i: usize| match (self.secs[i], later.secs[i]) {
            (Some(a), Some(b)) => json!(((b - a) / wall * 100.0).round() / 100.0),
            _ => Value::Null,
        };
        json!({"wanem": share(0), "alpha": share(1), "beta": share(2)})
    }
}

/// The two daemons and the relay between them.
pub(crate) struct Pair {
    pub(crate) bin: PathBuf,
    pub(crate) alpha: Node,
    pub(crate) beta: Node,
    pub(crate) opts: PeerOpts,
    pub(crate) alpha_d: Option<Background>,
    pub(crate) beta_d: Option<Background>,
    pub(crate) wanem: Option<Wanem>,
    pub(crate) wan_port: u16,
    pub(crate) beta_port: u16,
    pub(crate) dir: PathBuf,
    pub(crate) logs: PathBuf,
    /// wanem's link options, for the report.
    pub(crate) link: String,
    /// Daemon starts so far, for log names.
    pub(crate) starts: usize,
}

impl Pair {
    /// Make both nodes in `dir`, run the initial full sync over direct loopback, then route
    /// alpha through a wanem relay and wait until the peer is in step again (all untimed).
    pub(crate) fn start(
        env: &Env,
        dir: &Path,
        logs: &Path,
        size: u64,
        initial: Option<&Path>,
        opts: PeerOpts,
    ) -> Result<Pair> {
        let bin = tools::cutover_bin(env)?;
        let alpha = Node::new(&bin, dir, "alpha", size, initial)?;
        let beta = Node::new(&bin, dir, "beta", size, None)?;
        beta.configure("alpha", &alpha, None, opts)?;
        create_md(&bin, &beta.config, VOLUME)?;
        let (beta_d, beta_port) = serve(
            &bin,
            &beta.config,
            &beta.dir.join("serve.port"),
            &logs.join("beta-serve.log"),
        )?;
        alpha.configure("beta", &beta, Some(beta_port), opts)?;
        create_md(&bin, &alpha.config, VOLUME)?;
        let mut pair = Pair {
            bin,
            alpha,
            beta,
            opts,
            alpha_d: None,
            beta_d: Some(beta_d),
            wanem: None,
            wan_port: 0,
            beta_port,
            dir: dir.to_path_buf(),
            logs: logs.to_path_buf(),
            link: tools::shell_words(&env.link.args()),
            starts: 0,
        };
        pair.start_alpha()?;
        pair.volume(&["primary", VOLUME, "--force"])?;
        let t = Instant::now();
        // At least 10 MB/s, or something is wrong.
        let budget = Duration::from_secs(60 + size / 10_000_000);
        pair.wait_in_step(budget, "the initial sync over direct loopback", |_| {})?;
        eprintln!(
            "  initial full sync of {:.0} MB over direct loopback: {:.1} s",
            size as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
        pair.stop_alpha()?;
        let log = logs.join("wanem-setup.log");
        let wanem = Wanem::start(env, beta_port, dir, "wanem-setup", &log)?;
        pair.wan_port = wanem.port;
        pair.wanem = Some(wanem);
        pair.alpha
            .configure("beta", &pair.beta, Some(pair.wan_port), pair.opts)?;
        pair.start_alpha()?;
        let what = "reconnecting through wanem";
        pair.wait_in_step(Duration::from_secs(120), what, |_| {})?;
        Ok(pair)
    }

    pub(crate) fn start_alpha(&mut self) -> Result<()> {
        self.starts += 1;
        let log = self.logs.join(format!("alpha-serve-{}.log", self.starts));
        let port_file = self.alpha.dir.join("serve.port");
        let (d, _) = serve(&self.bin, &self.alpha.config, &port_file, &log)?;
        self.alpha_d = Some(d);
        Ok(())
    }

    pub(crate) fn stop_alpha(&mut self) -> Result<()> {
        let mut d = self
            .alpha_d
            .take()
            .context("alpha's daemon is not running")?;
        stop_cleanly(&mut d, "alpha's cutover serve")
    }

    /// SIGKILL to alpha's daemon, and reap it.
    pub(crate) fn kill_alpha(&mut self) -> Result<()> {
        kill9(&mut self.alpha_d, "alpha's daemon")
    }

    /// `cutover volume ARGS --config alpha's` (or beta's).
    pub(crate) fn volume_on(&self, beta: bool, args: &[&str]) -> Result<String> {
        volume_at(&self.bin, if beta { &self.beta } else { &self.alpha }, args)
    }

    pub(crate) fn volume(&self, args: &[&str]) -> Result<String> {
        self.volume_on(false, args)
    }

    /// The volume's entry in `status --json` on alpha (or beta).
    pub(crate) fn status_on(&self, beta: bool) -> Result<Value> {
        status_at(&self.bin, if beta { &self.beta } else { &self.alpha })
    }

    pub(crate) fn status(&self) -> Result<Value> {
        self.status_on(false)
    }

    /// Poll alpha every 100 ms until its peer is in step (each status goes to `seen`), then
    /// beta until its disk is UpToDate. Returns when alpha said so, and that status.
    pub(crate) fn wait_in_step(
        &self,
        budget: Duration,
        what: &str,
        mut seen: impl FnMut(&Value),
    ) -> Result<(Instant, Value)> {
        let start = Instant::now();
        let (at, st) = loop {
            let tick = Instant::now();
            let st = self.status()?;
            seen(&st);
            if in_step(&st) {
                break (Instant::now(), st);
            }
            if start.elapsed() > budget {
                bail!(
                    "{what}: the peer is not in step after {:.0} s: {}",
                    budget.as_secs_f64(),
                    st["peers"][0]
                );
            }
            std::thread::sleep(POLL.saturating_sub(tick.elapsed()));
        };
        loop {
            let b = self.status_on(true)?;
            if b["disk"] == "UpToDate" {
                return Ok((at, st));
            }
            if start.elapsed() > budget + Duration::from_secs(60) {
                bail!(
                    "{what}: alpha says in step, beta's disk stays {}",
                    b["disk"]
                );
            }
            std::thread::sleep(POLL);
        }
    }

    /// Replace the relay by a fresh one on the same port, so its count covers only what
    /// follows (alpha must be disconnected or down); returns what the old one carried.
    pub(crate) fn swap_wanem(&mut self, env: &Env, name: &str) -> Result<WireCount> {
        let old = self.wanem.take().context("no relay")?.finish()?;
        let log = self.logs.join(format!("{name}.log"));
        let w = Wanem::start_at(env, self.wan_port, self.beta_port, &self.dir, name, &log)?;
        self.wanem = Some(w);
        Ok(old)
    }

    pub(crate) fn cpu_mark(&self) -> CpuMark {
        let pids = [
            self.wanem.as_ref().and_then(Wanem::pid),
            self.alpha_d.as_ref().and_then(Background::pid),
            self.beta_d.as_ref().and_then(Background::pid),
        ];
        CpuMark {
            at: Instant::now(),
            secs: pids.map(|p| p.and_then(cpu_secs)),
        }
    }

    /// Stop the relay (what it carried since it started), both daemons, and compare the
    /// backings.
    pub(crate) fn finish(mut self) -> Result<(WireCount, Verify)> {
        let wire = self.wanem.take().context("no relay")?.finish()?;
        if self.alpha_d.is_some() {
            self.stop_alpha()?;
        }
        if let Some(mut d) = self.beta_d.take() {
            stop_cleanly(&mut d, "beta's cutover serve")?;
        }
        Ok((wire, same_bytes(&self.alpha.backing, &self.beta.backing)))
    }

    /// How the timed phase is repeated by hand: `steps` around alpha's config.
    pub(crate) fn command(&self, steps: &[String]) -> String {
        format!(
            "{} (alpha's config: {}; beta's: {}; alpha dials beta through wanem.py {})",
            steps.join("; "),
            quote(&self.alpha.config.to_string_lossy()),
            quote(&self.beta.config.to_string_lossy()),
            self.link,
        )
    }
}

/// SIGKILL to the daemon in `slot` (`who`), and reap it.
pub(crate) fn kill9(slot: &mut Option<Background>, who: &str) -> Result<()> {
    let mut d = slot
        .take()
        .with_context(|| format!("{who} is not running"))?;
    let pid = d.pid().with_context(|| format!("{who} has no pid"))?;
    // SAFETY: kill has no memory effects; the pid is our own unreaped child.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    d.stop(Duration::from_secs(10))?;
    Ok(())
}

/// A python3 that can `import nbd` (the bench's own may lack libnbd's bindings).
pub(crate) fn python_with_nbd() -> Result<String> {
    for p in ["python3", "/usr/bin/python3"] {
        let ok = Command::new(p)
            .args(["-c", "import nbd"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(p.to_string());
        }
    }
    bail!("no python3 can import nbd (libnbd's Python bindings: apt-get install python3-libnbd)")
}

/// `nbd_load.py MODE URI ARGS…` running in the background.
pub(crate) struct Writer {
    pub(crate) process: Background,
    pub(crate) log: PathBuf,
    pub(crate) command: String,
}

impl Writer {
    pub(crate) fn spawn(dir: &Path, logs: &Path, name: &str, args: &[String]) -> Result<Writer> {
        let script = dir.join("nbd_load.py");
        fs::write(&script, NBD_LOAD).with_context(|| format!("write {}", script.display()))?;
        let mut cmd = Command::new(python_with_nbd()?);
        cmd.arg(&script).args(args);
        let command = describe(&cmd);
        eprintln!("  {name}: {command}");
        let log = logs.join(format!("{name}.log"));
        Ok(Writer {
            process: Background::spawn(name, &mut cmd, &log)?,
            log,
            command,
        })
    }

    pub(crate) fn running(&mut self) -> Result<bool> {
        self.process.running()
    }

    /// Let it write for `load` (it must not end before).
    pub(crate) fn keep_for(&mut self, load: Duration) -> Result<()> {
        let start = Instant::now();
        while start.elapsed() < load {
            if !self.running()? {
                bail!("the writer ended early: {}", tail(&self.log, 1500));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    /// Wait for it (at most `limit`, then stop it) and read the JSON line it printed.
    pub(crate) fn finish(mut self, limit: Duration) -> Result<Value> {
        let t = Instant::now();
        while self.process.running()? && t.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(50));
        }
        let (status, killed) = self.process.stop(Duration::from_secs(5))?;
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        match text.lines().rev().find(|l| l.starts_with('{')) {
            Some(line) if !killed => serde_json::from_str(line)
                .with_context(|| format!("{} printed {line:?}", self.command)),
            _ => bail!(
                "{} printed no result ({status}{}): {}",
                self.command,
                if killed {
                    ", stopped after the time allowed"
                } else {
                    ""
                },
                tail(&self.log, 1500)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(dir: &Path, name: &str) -> Node {
        Node {
            dir: dir.join(name),
            config: dir.join(format!("{name}.toml")),
            backing: dir.join(name).join("backing.img"),
            fingerprint: format!("sha256:{name}"),
        }
    }

    #[test]
    fn one_peer_or_several_make_the_same_peer_tables() {
        let dir = std::env::temp_dir().join(format!("rbench-cfg-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (a, b, g) = (node(&dir, "a"), node(&dir, "b"), node(&dir, "g"));
        let c = PeerOpts {
            protocol: "C",
            csums: true,
        };
        // R1–R5's config: one peer, dialled.
        a.configure("beta", &b, Some(7000), c).unwrap();
        let one = fs::read_to_string(&a.config).unwrap();
        let head = format!(
            "listen = \"127.0.0.1:0\"\nstate_dir = {:?}\n\n[[volume]]\nname = \"{VOLUME}\"\nbacking = {:?}\n",
            a.state().display().to_string(),
            a.backing.display().to_string()
        );
        let beta = format!(
            "[[volume.peer]]\nname = \"beta\"\nfingerprint = \"sha256:b\"\nprotocol = \"C\"\n\
             connections = {CONNECTIONS}\ncsums = true\naddress = \"127.0.0.1:7000\"\n"
        );
        assert_eq!(one, format!("{head}{beta}"));
        let a_opts = PeerOpts {
            protocol: "A",
            csums: false,
        };
        a.configure_peers(&[
            PeerLine {
                name: "beta",
                node: &b,
                address: Some(7000),
                opts: c,
            },
            PeerLine {
                name: "gamma",
                node: &g,
                address: None,
                opts: a_opts,
            },
        ])
        .unwrap();
        let gamma = format!(
            "[[volume.peer]]\nname = \"gamma\"\nfingerprint = \"sha256:g\"\nprotocol = \"A\"\n\
             connections = {CONNECTIONS}\ncsums = false\n"
        );
        assert_eq!(
            fs::read_to_string(&a.config).unwrap(),
            format!("{head}{beta}{gamma}")
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
