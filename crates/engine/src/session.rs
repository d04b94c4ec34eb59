//! A session as the engine sees it: one control connection (ordered: file list, needs,
//! signatures, completions) and a stream of data connections that may grow while it runs.

use net::{Conn, ConnError, MsgReader, MsgWriter, RateLimiter};
use proto::Msg;
use std::sync::Arc;
use tokio::sync::mpsc;

pub struct Session {
    pub control: Conn,
    /// Data connections: those opened at the start and any that join later.
    pub data: mpsc::Receiver<Conn>,
    /// Shared by every data connection (`--bwlimit`).
    pub limiter: Option<Arc<RateLimiter>>,
}

/// The control connection, driven by two tasks so that any task may send on it.
pub(crate) struct Control {
    pub tx: mpsc::Sender<Msg>,
    pub rx: mpsc::Receiver<Result<Msg, ConnError>>,
    pub writer: tokio::task::JoinHandle<MsgWriter>,
}

pub(crate) fn spawn_control(conn: Conn) -> Control {
    let (out_tx, mut out_rx) = mpsc::channel::<Msg>(256);
    let (in_tx, in_rx) = mpsc::channel(256);
    let Conn { reader, mut writer } = conn;
    let writer_task = tokio::spawn(async move {
        while let Some(msg) = out_rx.recv().await {
            // Control traffic is metadata (lists, hashes): it always compresses well.
            if writer.send(msg, true).await.is_err() {
                break;
            }
        }
        writer.close().await;
        writer
    });
    tokio::spawn(forward(reader, in_tx));
    Control {
        tx: out_tx,
        rx: in_rx,
        writer: writer_task,
    }
}

/// Pass every message of `reader` to `to`; an error ends the stream with that error.
pub(crate) async fn forward(mut reader: MsgReader, to: mpsc::Sender<Result<Msg, ConnError>>) {
    loop {
        match reader.recv().await {
            Ok(Some(m)) => {
                if to.send(Ok(m)).await.is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                let _ = to.send(Err(e)).await;
                return;
            }
        }
    }
}
