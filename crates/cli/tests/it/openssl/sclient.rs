//! `openssl s_client` as a child process: its output gathered as it comes, commands and data on its stdin, its `-msg` trace.

use super::*;

/// The last 6000 bytes of `t` or a little less (from a character boundary).
pub(super) fn tail(t: &str) -> &str {
    let mut from = t.len().saturating_sub(6000);
    while !t.is_char_boundary(from) {
        from += 1;
    }
    &t[from..]
}

/// Collect everything a pipe delivers into a shared buffer, as it arrives.
pub(super) fn gather(
    mut r: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 << 10];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            into.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    })
}

/// A running `openssl s_client`, killed on drop.
pub(super) struct SClient {
    pub(super) child: Child,
    pub(super) stdin: Option<ChildStdin>,
    pub(super) out: Arc<Mutex<Vec<u8>>>,
    pub(super) err: Arc<Mutex<Vec<u8>>>,
    pub(super) trace: PathBuf,
    pub(super) readers: Vec<JoinHandle<()>>,
}

impl SClient {
    /// `openssl s_client -connect 127.0.0.1:PORT -tls1_3` exporting the token proof's keying
    /// material, offering `alpn` (none: no ALPN extension), tracing messages to a file in `dir`.
    pub(super) fn start(dir: &Path, port: u16, alpn: Option<&str>) -> SClient {
        std::fs::create_dir_all(dir).unwrap();
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let trace = dir.join(format!("s_client-{n}.msg"));
        let mut cmd = Command::new("openssl");
        cmd.args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
            .args(["-tls1_3", "-keymatexport", LABEL, "-keymatexportlen", "32"])
            .args(["-msg", "-msgfile", s(&trace)]);
        if let Some(p) = alpn {
            cmd.args(["-alpn", p]);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run openssl s_client (install openssl): {e}"));
        let (out, err) = (Arc::default(), Arc::default());
        let readers = vec![
            gather(child.stdout.take().unwrap(), Arc::clone(&out)),
            gather(child.stderr.take().unwrap(), Arc::clone(&err)),
        ];
        SClient {
            stdin: child.stdin.take(),
            child,
            out,
            err,
            trace,
            readers,
        }
    }

    pub(super) fn stdout(&self) -> Vec<u8> {
        self.out.lock().unwrap().clone()
    }

    pub(super) fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// OpenSSL's trace of the messages sent (`>>>`) and received (`<<<`).
    pub(super) fn trace(&self) -> String {
        std::fs::read_to_string(&self.trace).unwrap_or_default()
    }

    /// Everything s_client printed so far, for failure messages.
    pub(super) fn dump(&self) -> String {
        let out = String::from_utf8_lossy(&self.stdout()).into_owned();
        let trace = self.trace();
        format!(
            "--- s_client stdout (tail):\n{}\n--- s_client stderr:\n{}\n--- s_client -msg trace (tail):\n{}",
            tail(&out),
            self.stderr(),
            tail(&trace)
        )
    }

    /// Wait until `done` holds for (stdout, stderr); panics with everything after `WAIT`.
    pub(super) fn wait_for(&self, what: &str, done: impl Fn(&[u8], &str) -> bool) {
        let started = Instant::now();
        while !done(&self.stdout(), &self.stderr()) {
            assert!(
                started.elapsed() < WAIT,
                "s_client: no {what} within {WAIT:?}\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The exporter output (`Keying material: HEX`), printed once the handshake is done.
    pub(super) fn keying_material(&self) -> [u8; 32] {
        self.wait_for("keying material", |out, _| keying_material(out).is_some());
        keying_material(&self.stdout()).unwrap()
    }

    /// Write `bytes` to s_client's stdin (it sends them as application data, or takes them
    /// as a command when they start with a command letter).
    pub(super) fn send(&mut self, bytes: &[u8]) {
        self.send_or(bytes, String::new);
    }

    /// `send`, adding `context` (the daemon's log) to the failure when s_client has exited.
    pub(super) fn send_or(&mut self, bytes: &[u8], context: impl Fn() -> String) {
        let stdin = self.stdin.as_mut().expect("s_client stdin is open");
        if let Err(e) = stdin.write_all(bytes).and_then(|()| stdin.flush()) {
            // s_client has exited: the connection ended.
            std::thread::sleep(SETTLE);
            panic!(
                "cannot write to s_client's stdin ({e}): it exited, {:?}\n{}\n{}",
                self.child.try_wait(),
                self.dump(),
                context()
            );
        }
    }

    /// Ask for a KeyUpdate (`K`: the peer must update too; `k`: it need not) and wait until
    /// s_client took the command, so the next write is read as data on its own.
    pub(super) fn key_update(&mut self, requested: bool) {
        let before = self.stderr().matches("KEYUPDATE").count();
        self.send(if requested { b"K\n" } else { b"k\n" });
        self.wait_for("KEYUPDATE (the command taken)", |_, err| {
            err.matches("KEYUPDATE").count() > before
        });
    }

    /// Close stdin (s_client then sends close_notify and exits) and wait for the exit.
    pub(super) fn finish(mut self) -> Finished {
        drop(self.stdin.take());
        let started = Instant::now();
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                break st;
            }
            assert!(
                started.elapsed() < WAIT,
                "s_client did not exit within {WAIT:?} of its stdin closing\n{}",
                self.dump()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Finished {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
            trace: self.trace(),
            dump: self.dump(),
        }
    }
}

impl Drop for SClient {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What an s_client that exited left behind.
pub(super) struct Finished {
    pub(super) status: ExitStatus,
    pub(super) stdout: Vec<u8>,
    pub(super) stderr: String,
    pub(super) trace: String,
    pub(super) dump: String,
}

impl Finished {
    /// The alert numbers s_client reported receiving ("SSL alert number N").
    pub(super) fn alerts(&self) -> Vec<u32> {
        alert_numbers(&self.stderr)
    }
}

/// The alerts in an OpenSSL `-msg` trace that came from the peer ("fatal decode_error",
/// "warning close_notify").
pub(super) fn received_alerts(trace: &str) -> Vec<String> {
    trace
        .lines()
        .filter(|l| l.starts_with("<<<") && l.contains(", Alert ["))
        .filter_map(|l| l.rsplit_once("], ").map(|(_, a)| a.to_string()))
        .collect()
}

pub(super) fn alert_numbers(text: &str) -> Vec<u32> {
    text.split("SSL alert number ")
        .skip(1)
        .filter_map(|rest| {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

/// `Keying material: <64 hex digits>` in s_client's (or s_server's) output.
pub(super) fn keying_material(out: &[u8]) -> Option<[u8; 32]> {
    let text = String::from_utf8_lossy(out);
    let at = text.find("Keying material: ")?;
    let hex = text[at + "Keying material: ".len()..].get(..64)?;
    let mut km = [0u8; 32];
    for (i, b) in km.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(km)
}

/// A hello as a complete frame.
pub(super) fn hello_bytes(hello: &Hello) -> Vec<u8> {
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    proto::frame::encode_frame(hello, false, &mut None, &mut plain, &mut out).expect("encode");
    out
}

/// A welcome as a complete frame.
pub(super) fn welcome_bytes(welcome: &Welcome) -> Vec<u8> {
    let (mut plain, mut out) = (Vec::new(), Vec::new());
    proto::frame::encode_frame(welcome, false, &mut None, &mut plain, &mut out).expect("encode");
    out
}

/// The frame of a `Hello::New` push to module `m` proving `token` over `binding`. The frame
/// starts with its length's low byte, which must not be a command letter of s_client: the
/// path grows until it is not.
pub(super) fn hello_frame(token: &str, binding: &[u8; 32]) -> Vec<u8> {
    for extra in 0..4 {
        let hello = Hello::New(NewSession {
            version: PROTOCOL_VERSION,
            module: "m".into(),
            path: format!("ossl{}/", "x".repeat(extra)),
            server_role: Role::Receiver,
            options: SyncOptions::default(),
            token_proof: Some(net::tls::token_proof(token.as_bytes(), binding)),
        });
        let bytes = hello_bytes(&hello);
        if !COMMAND_LETTERS.contains(&bytes[0]) {
            return bytes;
        }
    }
    unreachable!("four consecutive lengths cannot all be command letters")
}

/// The `Welcome` frame in s_client's stdout: the first place where a frame decodes as a
/// `Welcome` that encodes back to exactly those bytes (s_client's own text around it has no
/// NUL bytes, so cannot pass for a length prefix of a small frame).
pub(super) fn find_welcome(out: &[u8]) -> Option<Welcome> {
    (0..out.len().saturating_sub(5)).find_map(|i| {
        let len = u32::from_le_bytes(out[i..i + 4].try_into().unwrap()) as usize;
        if len == 0 || len > 4096 || i + 4 + len > out.len() {
            return None;
        }
        let welcome = proto::frame::decode_payload::<Welcome>(out[i + 4], &out[i + 5..i + 4 + len])
            .ok()
            .flatten()?;
        (welcome_bytes(&welcome) == out[i..i + 4 + len]).then_some(welcome)
    })
}

/// KeyUpdate messages in an OpenSSL `-msg` trace, in order: (received, update_requested).
pub(super) fn key_updates(trace: &str) -> Vec<(bool, bool)> {
    let lines: Vec<&str> = trace.lines().collect();
    lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.ends_with("KeyUpdate"))
        .filter_map(|(i, l)| {
            // The message's bytes follow on the next line (once written).
            let body = lines.get(i + 1)?.trim();
            Some((l.starts_with("<<<"), body == "18 00 00 01 01"))
        })
        .collect()
}

/// Line numbers in the trace of received KeyUpdates and of received application data
/// records (an inner content type of 0x17), to tell which came first.
pub(super) fn received_order(trace: &str) -> (Vec<usize>, Vec<usize>) {
    let lines: Vec<&str> = trace.lines().collect();
    let mut updates = Vec::new();
    let mut data = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if !l.starts_with("<<<") {
            continue;
        }
        if l.ends_with("KeyUpdate") {
            updates.push(i);
        }
        if l.contains("InnerContent") && lines.get(i + 1).map(|b| b.trim()) == Some("17") {
            data.push(i);
        }
    }
    (updates, data)
}
