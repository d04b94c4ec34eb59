//! Changed-block passes: `cutover sync volume:NAME DEST` of a volume the local `cutover
//! serve` hosts, written through its NBD export with qemu-io. The first pass to a
//! destination compares everything; later passes read and send only the blocks written
//! since (counted with /proc's read counters on both sides); a failed pass owes its
//! blocks again; a `cutover volume mark` in between loses none; the destinations survive a
//! restart and a `kill -9` of the daemon, and a damaged record file means full passes.

use crate::util::*;
use std::path::{Path, PathBuf};
use std::process::Command;

const SIZE: usize = 64 << 20;

/// A volume `db` on a 64 MiB image of random bytes, hosted by a started daemon.
struct Host {
    dir: PathBuf,
    config: PathBuf,
    daemon: Daemon,
}

impl Host {
    fn start(dir: &Path) -> Host {
        std::fs::create_dir_all(dir).unwrap();
        let image = dir.join("disk.img");
        std::fs::write(&image, random_bytes(7, SIZE)).unwrap();
        let config = dir.join("host.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\nstate_dir = \"{}\"\n[[volume]]\nname = \"db\"\nbacking = \"{}\"\n",
                s(&dir.join("state")),
                s(&image)
            ),
        )
        .unwrap();
        let mut c = cutover_cmd();
        c.args(["volume", "create-md", "db", "--config", s(&config)]);
        Running::start(c).wait().ok();
        let daemon = Daemon::start_with(dir, &config);
        Host {
            dir: dir.to_path_buf(),
            config,
            daemon,
        }
    }

    fn image(&self) -> PathBuf {
        self.dir.join("disk.img")
    }

    /// Write through the export with qemu-io, one command per `-c`.
    fn write(&self, commands: &[&str]) {
        let uri = format!(
            "nbd+unix:///db?socket={}",
            s(&self.dir.join("state/db.sock"))
        );
        let mut c = Command::new("qemu-io");
        c.args(["-f", "raw", &uri]);
        for cmd in commands {
            c.args(["-c", cmd]);
        }
        let out = c.output().expect("qemu-io is needed for this test");
        assert!(
            out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("failed"),
            "{c:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn volume(&self, args: &[&str]) -> Out {
        let mut c = cutover_cmd();
        c.arg("volume")
            .args(args)
            .args(["--config", s(&self.config)]);
        Running::start(c).wait()
    }
}

/// Bytes a process has read (`rchar`: every read call, page cache included).
fn rchar(pid: &str) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// `cutover sync --json ARGS` to the end, and the bytes it read: a shell runs it and then
/// prints its own read counters, which include those of the child it waited for.
fn sync_counting(args: &[&str]) -> (Out, u64) {
    let mut line = String::from("\"$0\" sync --json");
    for a in args {
        line.push_str(&format!(" '{a}'"));
    }
    line.push_str("; rc=$?; cat /proc/$$/io >&2; exit $rc");
    let c = cutover_cmd();
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(&line).arg(c.get_program());
    for (k, v) in c.get_envs() {
        match v {
            Some(v) => sh.env(k, v),
            None => sh.env_remove(k),
        };
    }
    let out = Running::start(sh).wait();
    let read = out
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no read counters: {out}"));
    (out, read)
}

fn note(out: &Out) -> String {
    out.events("note")
        .first()
        .and_then(|n| n["message"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn same_content(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

#[test]
fn later_passes_read_and_send_only_the_written_blocks_on_both_sides() {
    let t = tmp();
    let host = Host::start(&t.path().join("host"));
    let dst_dir = t.path().join("dst");
    let dest = Daemon::start(&t.path().join("d"), &[Module::rw("dst", &dst_dir)]);
    let url = dest.url("dst/disk.img");
    let vc = s(&host.config).to_string();
    let pid = dest.pid().to_string();

    // The first pass compares everything: each side reads the whole volume.
    let before = rchar(&pid);
    let (first, read) = sync_counting(&["--volume-config", &vc, "volume:db", &url]);
    first.ok();
    let dest_read = rchar(&pid) - before;
    assert!(note(&first).contains("full pass"), "{first}");
    assert!(same_content(&host.image(), &dst_dir.join("disk.img")));
    assert!(read >= SIZE as u64, "the first pass read {read} bytes");
    assert!(dest_read >= SIZE as u64, "the destination read {dest_read}");

    // 1 MiB + 256 KiB + 4 KiB + 5 unaligned bytes (one 16 KiB block) written.
    host.write(&[
        "write -P 0x5a 1M 256k",
        "write -P 0x33 40M 4k",
        "write -P 0x77 63M 1M",
        "write -P 0x11 20000005 5",
    ]);
    let dirty = (1 << 20) + (256 << 10) + (16 << 10) + (16 << 10);
    let before = rchar(&pid);
    let (second, read) = sync_counting(&["--volume-config", &vc, "volume:db", &url]);
    second.ok();
    let dest_read = rchar(&pid) - before;
    assert!(note(&second).contains("changed-block pass"), "{second}");
    assert!(same_content(&host.image(), &dst_dir.join("disk.img")));
    let literal = second.summary()["bytes_literal"]
        .as_u64()
        .unwrap_or(u64::MAX);
    assert_eq!(literal, dirty as u64, "{second}");
    // The source read the dirty blocks (and the little the control connection carries);
    // the destination read the frames from its sockets and nothing of the volume.
    assert!(
        read <= 2 * dirty as u64 + (1 << 20),
        "the source side read {read} bytes for {dirty} dirty"
    );
    assert!(
        dest_read <= 2 * dirty as u64 + (1 << 20),
        "the destination read {dest_read} bytes for {dirty} dirty"
    );

    // Nothing written: nothing sent.
    let (third, _) = sync_counting(&["--volume-config", &vc, "volume:db", &url]);
    third.ok();
    assert_eq!(third.summary()["bytes_literal"], 0, "{third}");
    let st = host.volume(&["status", "db", "--json"]);
    st.ok();
    let dests = &st.json()[0]["volumes"][0]["destinations"];
    assert_eq!(dests.as_array().map(Vec::len), Some(1), "{st}");
    assert_eq!(dests[0]["confirmed"], true, "{st}");
    let human = host.volume(&["status", "db"]);
    human.ok();
    assert!(
        human
            .stdout
            .contains("sync destination cutover://127.0.0.1:")
            && human
                .stdout
                .contains("its next pass sends only what changed"),
        "{human}"
    );
}

#[test]
fn a_failed_pass_owes_its_blocks_again_and_marks_restarts_and_crashes_lose_none() {
    let t = tmp();
    let mut host = Host::start(&t.path().join("host"));
    let out_dir = t.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let copy = out_dir.join("disk.img");
    let vc = s(&host.config).to_string();
    let image = host.image();
    // A pass slowed to 1 MiB/s, 1.5 s under way.
    let slow_pass = || {
        let mut run = spawn_sync(&[
            "--bwlimit",
            "1M",
            "--volume-config",
            &vc,
            "volume:db",
            s(&copy),
        ]);
        std::thread::sleep(std::time::Duration::from_millis(1500));
        assert!(run.running(), "the slowed pass ended early");
        run
    };
    let pass = |expect: &str| -> Out {
        let (o, _) = sync_counting(&["--volume-config", &vc, "volume:db", s(&copy)]);
        o.ok();
        assert!(note(&o).contains(expect), "{o}");
        assert!(same_content(&image, &copy), "{o}");
        o
    };
    pass("full pass");
    host.write(&["write -P 0x21 4M 64k"]);
    pass("changed-block pass");

    // A pass killed half-way (slowed to 1 MiB/s) confirms nothing: the daemon sees its
    // connection close, and the blocks it took are owed again.
    host.write(&["write -P 0x42 8M 8M"]);
    let killed = slow_pass();
    killed.signal(rustix::process::Signal::KILL);
    killed.wait();
    host.write(&["write -P 0x43 20M 64k"]);
    let o = pass("changed-block pass");
    assert_eq!(o.summary()["bytes_literal"], (8 << 20) + (64 << 10), "{o}");

    // A mark by the operator between passes ends a generation; its blocks stay owed.
    host.write(&["write -P 0x44 16M 64k"]);
    host.volume(&["mark", "db"]).ok();
    host.write(&["write -P 0x45 24M 64k"]);
    let o = pass("changed-block pass");
    assert_eq!(o.summary()["bytes_literal"], 128 << 10, "{o}");

    // A clean restart keeps the destinations (saved beside the metadata): the next pass
    // sends exactly what was written, before the stop and after.
    host.write(&["write -P 0x46 30M 64k"]);
    host.daemon.terminate().wait().unwrap();
    host.daemon = Daemon::start_with(&host.dir, &host.config);
    host.write(&["write -P 0x47 31M 64k"]);
    let o = pass("changed-block pass");
    assert_eq!(o.summary()["bytes_literal"], 128 << 10, "{o}");

    // A daemon stopped while a pass runs, after a mark saved the records meanwhile: what
    // the pass took is still owed after the restart.
    host.write(&["write -P 0x48 36M 8M"]);
    let slow = slow_pass();
    host.volume(&["mark", "db"]).ok();
    host.daemon.terminate().wait().unwrap();
    slow.signal(rustix::process::Signal::KILL);
    slow.wait();
    host.daemon = Daemon::start_with(&host.dir, &host.config);
    let o = pass("changed-block pass");
    assert!(
        o.summary()["bytes_literal"].as_u64() >= Some(8 << 20),
        "{o}"
    );

    // kill -9 after more writes: the restart recovers the bitmap from the activity log
    // (whole hot extents, a superset), and the next pass leaves an exact copy.
    host.write(&["write -P 0x49 46M 64k"]);
    host.daemon.kill9();
    host.daemon = Daemon::start_with(&host.dir, &host.config);
    host.write(&["write -P 0x4a 50M 64k"]);
    pass("changed-block pass");

    // The saved file damaged: every destination gets a full pass again.
    host.daemon.terminate().wait().unwrap();
    std::fs::write(host.dir.join("state/db.passes"), b"damaged").unwrap();
    host.daemon = Daemon::start_with(&host.dir, &host.config);
    pass("full pass");
    host.write(&["write -P 0x4b 52M 64k"]);
    pass("changed-block pass");

    // A dry run compares without starting a pass (nothing owed is taken).
    host.write(&["write -P 0x48 33M 64k"]);
    let (dry, _) = sync_counting(&["--volume-config", &vc, "-n", "volume:db", s(&copy)]);
    dry.ok();
    let o = pass("changed-block pass");
    assert_eq!(o.summary()["bytes_literal"], 64 << 10, "{o}");
}

/// A changed-block pass finds a FIFO where its copy was: the FIFO is replaced by a full
/// copy (never written through), and the sync ends. (Writing the volume in place into the
/// FIFO was refused, and then opening the destination to sync its file system blocked on
/// the FIFO forever: block-device sources too.)
#[test]
fn a_volume_pass_onto_a_fifo_replaces_it_with_a_full_copy_and_ends() {
    let t = tmp();
    let host = Host::start(&t.path().join("host"));
    let vc = s(&host.config).to_string();
    let copy = t.path().join("copy.img");
    sync(&["--volume-config", &vc, "volume:db", s(&copy)]).ok();
    host.write(&["write -P 0x61 2M 64k"]);
    std::fs::remove_file(&copy).unwrap();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        &copy,
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    let mut run = spawn_sync(&["--json", "--volume-config", &vc, "volume:db", s(&copy)]);
    let started = std::time::Instant::now();
    while run.running() && started.elapsed() < std::time::Duration::from_secs(60) {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let hung = run.running();
    if hung {
        run.signal(rustix::process::Signal::KILL);
    }
    let out = run.wait();
    assert!(!hung, "the sync onto a FIFO did not end: {out}");
    out.ok();
    assert!(note(&out).contains("changed-block pass"), "{out}");
    assert!(std::fs::symlink_metadata(&copy).unwrap().is_file());
    assert!(same_content(&host.image(), &copy), "{out}");
    assert_eq!(out.summary()["bytes_literal"], SIZE as u64, "{out}");
}

#[test]
fn volume_sources_are_refused_with_one_line_when_they_cannot_work() {
    let t = tmp();
    let host = Host::start(&t.path().join("host"));
    let vc = s(&host.config).to_string();
    let copy = t.path().join("copy.img");
    let unknown = sync(&["--volume-config", &vc, "volume:nope", s(&copy)]);
    assert_one_line_error(&unknown, &["volume:nope", "no volume \"nope\"", "db"]);
    let list = t.path().join("list");
    std::fs::write(&list, "x\n").unwrap();
    let listed = sync(&[
        "--volume-config",
        &vc,
        "--files-from",
        s(&list),
        "volume:db",
        s(&copy),
    ]);
    assert_one_line_error(&listed, &["volume:db", "--files-from"]);
    let other = t.path().join("other.toml");
    std::fs::write(
        &other,
        format!(
            "state_dir = \"{}\"\n[[volume]]\nname = \"db\"\nbacking = \"{}\"\n",
            s(&t.path().join("none")),
            s(&host.image())
        ),
    )
    .unwrap();
    let absent = sync(&["--volume-config", s(&other), "volume:db", s(&copy)]);
    assert_one_line_error(&absent, &["no `cutover serve` is running"]);
    assert!(!copy.exists());
}

/// A plan's `volume` task with a `volume:NAME` source: the first presync copies everything,
/// the next sends only what was written, and the cutover's final pass and its verification
/// (a full comparison of the backing with the copy) succeed.
#[test]
fn a_plan_volume_task_passes_only_the_written_blocks() {
    let t = tmp();
    let host = Host::start(&t.path().join("host"));
    let copy = t.path().join("copy.img");
    let p = t.path().join("plan.toml");
    std::fs::write(
        &p,
        format!(
            "verify_mode = \"full\"\n[[task]]\nname = \"db\"\nkind = \"volume\"\nsource = \"volume:db\"\nvolume_config = \"{}\"\ndestination = \"{}\"\n",
            s(&host.config),
            s(&copy)
        ),
    )
    .unwrap();
    crate::plan::plan(&["presync", s(&p)]).ok();
    assert!(same_content(&host.image(), &copy));
    host.write(&["write -P 0x71 5M 256k"]);
    crate::plan::plan(&["presync", s(&p)]).ok();
    assert!(same_content(&host.image(), &copy));
    let last = crate::plan::task(&crate::plan::status(&p), "db")["last_pass"].clone();
    assert_eq!(last["bytes_literal"], 256 << 10, "{last}");
    host.write(&["write -P 0x72 6M 64k"]);
    let out = crate::plan::plan(&["cutover", s(&p)]);
    out.ok();
    assert!(out.stdout.contains("db: verify ok"), "{out}");
    assert!(same_content(&host.image(), &copy), "{out}");
    let last = crate::plan::task(&crate::plan::status(&p), "db")["last_pass"].clone();
    assert_eq!(last["bytes_literal"], 64 << 10, "{last}");
}

/// A symlink where the copy goes is replaced, never written through, and the destination is
/// remembered by the name given, not by where the link pointed (a later pass to that file
/// must not be taken for a pass to a copy).
#[test]
fn a_symlink_destination_is_replaced_and_remembered_by_its_own_name() {
    let t = tmp();
    let host = Host::start(&t.path().join("host"));
    let vc = s(&host.config).to_string();
    let victim = t.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    let link = t.path().join("link.img");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    sync(&["--volume-config", &vc, "volume:db", s(&link)]).ok();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(std::fs::symlink_metadata(&link).unwrap().is_file());
    assert!(same_content(&host.image(), &link));
    let st = host.volume(&["status", "db", "--json"]);
    st.ok();
    let dests = &st.json()[0]["volumes"][0]["destinations"];
    assert_eq!(dests[0]["destination"], s(&link), "{st}");
}
