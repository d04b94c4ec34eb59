//! A relay between s_client and the daemon that can hold, cut and inject TLS records.

use super::*;

/// What the relay does with the client's records.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Hold {
    /// Forward each record as soon as it is complete.
    Nothing,
    /// Forward the ClientHello, then hold every record until the KeyUpdate's (by its length)
    /// has arrived, and forward them all in one write.
    UntilKeyUpdate,
}

pub(super) enum Cmd {
    /// Forward only the first half of the client's next record, then shut down the write
    /// side towards the daemon.
    CutNextRecord,
    /// Write these bytes to the daemon now (between two whole records of the client's).
    Inject(Vec<u8>),
}

/// What the relay saw.
#[derive(Default, Debug)]
pub(super) struct Seen {
    /// The relay's end of its connection to the daemon: the peer the daemon logs.
    pub(super) upstream: Option<SocketAddr>,
    /// (content type, length) of each record of the one held-back write.
    pub(super) coalesced: Vec<(u8, usize)>,
    /// Bytes of the record that was cut, and how many of them went to the daemon.
    pub(super) cut: Option<(usize, usize)>,
}

pub(super) struct Relay {
    pub(super) port: u16,
    pub(super) cmds: tokio::sync::mpsc::UnboundedSender<Cmd>,
    pub(super) seen: Arc<Mutex<Seen>>,
    // Dropped last: ends the relay's tasks and sockets.
    pub(super) _rt: tokio::runtime::Runtime,
}

/// The length of the whole record at the start of `buf`, once it is all there.
pub(super) fn whole_record(buf: &[u8]) -> Option<usize> {
    let len = 5 + u16::from_be_bytes(buf.get(3..5)?.try_into().unwrap()) as usize;
    (buf.len() >= len).then_some(len)
}

/// TLS record headers in `buf`: (content type, length) of each whole record.
pub(super) fn record_headers(mut buf: &[u8]) -> Vec<(u8, usize)> {
    let mut out = Vec::new();
    while let Some(len) = whole_record(buf) {
        out.push((buf[0], len - 5));
        buf = &buf[len..];
    }
    out
}

impl Relay {
    /// Listen on a loopback port; relay the first connection to the daemon's `port`.
    pub(super) fn start(daemon_port: u16, hold: Hold) -> Relay {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let port = listener.local_addr().unwrap().port();
        let (cmds, cmd_rx) = tokio::sync::mpsc::unbounded_channel();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let seen2 = Arc::clone(&seen);
        rt.spawn(async move {
            let (client, _) = listener.accept().await.expect("relay accept");
            let daemon = tokio::net::TcpStream::connect(("127.0.0.1", daemon_port))
                .await
                .expect("relay connect to the daemon");
            let _ = client.set_nodelay(true);
            let _ = daemon.set_nodelay(true);
            seen2.lock().unwrap().upstream = Some(daemon.local_addr().unwrap());
            let (mut cr, mut cw) = client.into_split();
            let (mut dr, dw) = daemon.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut dr, &mut cw).await;
                let _ = cw.shutdown().await;
            });
            up(&mut cr, dw, hold, cmd_rx, &seen2).await;
        });
        Relay {
            port,
            cmds,
            seen,
            _rt: rt,
        }
    }

    pub(super) fn send(&self, cmd: Cmd) {
        self.cmds.send(cmd).expect("the relay is running");
    }

    pub(super) fn upstream(&self) -> SocketAddr {
        let started = Instant::now();
        loop {
            if let Some(a) = self.seen.lock().unwrap().upstream {
                return a;
            }
            assert!(started.elapsed() < WAIT, "the relay connected nowhere");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Client to daemon, record by record.
async fn up(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    hold: Hold,
    mut cmds: tokio::sync::mpsc::UnboundedReceiver<Cmd>,
    seen: &Mutex<Seen>,
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 << 10];
    let mut records = 0usize;
    let mut held: Vec<u8> = Vec::new();
    let mut holding = hold == Hold::UntilKeyUpdate;
    // A KeyUpdate that never comes must not hold the handshake back for ever: the records
    // then go on after this long (and the test sees no coalesced write).
    let mut give_up = tokio::time::Instant::now() + 2 * WAIT;
    let (mut cut_next, mut cut_done, mut cmds_open) = (false, false, true);
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(give_up), if holding && !held.is_empty() => {
                holding = false;
                if to.write_all(&std::mem::take(&mut held)).await.is_err() {
                    return;
                }
            }
            cmd = cmds.recv(), if cmds_open => match cmd {
                Some(Cmd::CutNextRecord) => cut_next = true,
                Some(Cmd::Inject(bytes)) => {
                    if to.write_all(&bytes).await.is_err() {
                        return;
                    }
                }
                None => cmds_open = false,
            },
            got = from.read(&mut chunk) => {
                let n = match got {
                    Ok(0) | Err(_) => {
                        if !cut_done {
                            let _ = to.write_all(&held).await;
                            let _ = to.write_all(&buf).await;
                            let _ = to.shutdown().await;
                        }
                        return;
                    }
                    Ok(n) => n,
                };
                buf.extend_from_slice(&chunk[..n]);
                while let Some(len) = whole_record(&buf) {
                    let record: Vec<u8> = buf.drain(..len).collect();
                    records += 1;
                    if cut_done {
                        continue;
                    }
                    if cut_next {
                        let half = record.len() / 2;
                        let _ = to.write_all(&record[..half]).await;
                        let _ = to.shutdown().await;
                        cut_done = true;
                        seen.lock().unwrap().cut = Some((record.len(), half));
                        continue;
                    }
                    if holding && records > 1 {
                        if held.is_empty() {
                            give_up = tokio::time::Instant::now() + WAIT / 2;
                        }
                        held.extend_from_slice(&record);
                        if record[0] == APPLICATION_DATA && len - 5 == KEY_UPDATE_RECORD {
                            seen.lock().unwrap().coalesced = record_headers(&held);
                            holding = false;
                            // All of them in one write.
                            if to.write_all(&std::mem::take(&mut held)).await.is_err() {
                                return;
                            }
                        }
                        continue;
                    }
                    if to.write_all(&record).await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}
