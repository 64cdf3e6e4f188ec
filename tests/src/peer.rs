//! Hand-driven agents: one that speaks the catalog part of the feed
//! protocol, one that sends batches, for tests of the hub's checks and for
//! the benchmarks.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use shuyuan_protocol::batch::{BatchBody, BatchHash, Entry, SignedBatch};
use shuyuan_protocol::catalog::doc::{CatalogDoc, Sender};
use shuyuan_protocol::federation::HubHello;
use shuyuan_protocol::message::{CatalogRefusal, CatalogSync, Hello, Welcome};
use shuyuan_protocol::quic;
use shuyuan_protocol::{
    Column, FeedId, Message, MessageV1, NodeId, NodeKey, Op, RejectReason, RowChange, TableSchema,
    UnixMillis, Value,
};

use std::net::SocketAddr;

use crate::HubProcess;

/// One connection to a hub.
#[derive(Debug)]
pub struct CatalogPeer {
    _endpoint: quinn::Endpoint,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    state: automerge::sync::State,
}

/// What one exchange cost, and how it ended.
#[derive(Debug, Default, Clone)]
pub struct Conversation {
    /// The hub refused a message, and said why.
    pub refusal: Option<CatalogRefusal>,
    pub messages_sent: usize,
    pub messages_received: usize,
    /// Automerge sync message bytes (without framing).
    pub bytes_sent: usize,
    pub bytes_received: usize,
    /// When the last message went out or came in.
    pub last_activity: Option<std::time::Instant>,
}

impl CatalogPeer {
    /// Connects to the hub at `addr` presenting `hub_key`, with `key`, and
    /// says `Hello` as `department` (with no feeds).
    pub async fn connect(
        addr: SocketAddr,
        hub_key: &str,
        key: &NodeKey,
        department: &str,
    ) -> Result<CatalogPeer> {
        let hub_key: NodeId = hub_key.parse()?;
        let endpoint = quic::client_endpoint(addr)?;
        let conn = endpoint
            .connect_with(quic::client_config(key, hub_key)?, addr, quic::SERVER_NAME)?
            .await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = Hello {
            software: "test-peer".into(),
            department: department.parse()?,
            resources: vec![],
        };
        quic::write_message(&mut send, &MessageV1::Hello(hello).into()).await?;
        match quic::read_message(&mut recv).await? {
            Some(Message::V1(MessageV1::Welcome(_))) => {}
            other => return Err(anyhow!("expected Welcome, got {other:?}")),
        }
        Ok(CatalogPeer {
            _endpoint: endpoint,
            send,
            recv,
            state: automerge::sync::State::new(),
        })
    }

    /// Starts a new sync session (a fresh state), as for another document.
    pub fn reset(&mut self) {
        self.state = automerge::sync::State::new();
    }

    /// Syncs `doc` with the hub (as `department`) until neither side has
    /// more to say for `quiet`, or the hub refuses a message.
    pub async fn converse(
        &mut self,
        doc: &mut CatalogDoc,
        department: &str,
        quiet: Duration,
    ) -> Result<Conversation> {
        let mut talk = Conversation::default();
        for _ in 0..200 {
            while let Some(m) = doc.generate_sync(&mut self.state) {
                talk.messages_sent += 1;
                talk.bytes_sent += m.len();
                talk.last_activity = Some(std::time::Instant::now());
                let sync = CatalogSync {
                    department: department.parse()?,
                    message: m,
                };
                quic::write_message(&mut self.send, &MessageV1::Catalog(sync).into()).await?;
            }
            match tokio::time::timeout(quiet, quic::read_message(&mut self.recv)).await {
                Err(_) => return Ok(talk),
                Ok(m) => match m? {
                    Some(Message::V1(MessageV1::Catalog(s))) => {
                        talk.messages_received += 1;
                        talk.bytes_received += s.message.len();
                        talk.last_activity = Some(std::time::Instant::now());
                        doc.receive_checked(&mut self.state, &s.message, Sender::Platform)?;
                    }
                    Some(Message::V1(MessageV1::CatalogRefused(r))) => {
                        talk.refusal = Some(r);
                        return Ok(talk);
                    }
                    other => return Err(anyhow!("unexpected {other:?}")),
                },
            }
        }
        Err(anyhow!("catalog sync did not settle"))
    }

    /// Reads and drops whatever the hub still has on its way.
    pub async fn drain(&mut self) -> Result<()> {
        while let Ok(m) = tokio::time::timeout(
            Duration::from_millis(500),
            quic::read_message(&mut self.recv),
        )
        .await
        {
            m?;
        }
        Ok(())
    }
}

/// A hand-driven client speaking the feed protocol.
#[derive(Debug)]
pub struct FeedPeer {
    _endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl FeedPeer {
    /// Connects to `hub` with `key` and says `Hello` as `department`.
    pub async fn connect(
        hub: &HubProcess,
        key: &NodeKey,
        department: &str,
        resources: &[&str],
    ) -> Result<(FeedPeer, Welcome)> {
        let hello = MessageV1::Hello(Hello {
            software: "test-peer".into(),
            department: department.parse()?,
            resources: resources
                .iter()
                .map(|r| r.parse())
                .collect::<Result<_, _>>()?,
        });
        FeedPeer::open(hub, key, hello).await
    }

    /// Connects to `hub` with `key` as a child hub and says `HubHello`
    /// with `feeds`.
    pub async fn connect_hub(
        hub: &HubProcess,
        key: &NodeKey,
        feeds: &[&str],
    ) -> Result<(FeedPeer, Welcome)> {
        let feeds: Vec<FeedId> = feeds.iter().map(|f| f.parse()).collect::<Result<_, _>>()?;
        let hello = MessageV1::HubHello(HubHello {
            software: "test-peer".into(),
            name: "test child hub".into(),
            feeds,
        });
        FeedPeer::open(hub, key, hello).await
    }

    async fn open(
        hub: &HubProcess,
        key: &NodeKey,
        hello: MessageV1,
    ) -> Result<(FeedPeer, Welcome)> {
        let hub_key: NodeId = hub.key.parse()?;
        let endpoint = quic::client_endpoint(hub.addr)?;
        let conn = endpoint
            .connect_with(
                quic::client_config(key, hub_key)?,
                hub.addr,
                quic::SERVER_NAME,
            )?
            .await
            .map_err(|e| anyhow!(quic::explain(&e)))?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| anyhow!(quic::explain(&e)))?;
        quic::write_message(&mut send, &hello.into()).await?;
        let welcome = match quic::read_message(&mut recv).await {
            Ok(Some(Message::V1(MessageV1::Welcome(w)))) => w,
            Ok(other) => return Err(anyhow!("expected Welcome, got {other:?}")),
            Err(quic::QuicError::Read(quinn::ReadError::ConnectionLost(e))) => {
                return Err(anyhow!(quic::explain(&e)));
            }
            Err(e) => return Err(e.into()),
        };
        Ok((
            FeedPeer {
                _endpoint: endpoint,
                conn,
                send,
                recv,
            },
            welcome,
        ))
    }

    /// Sends a message without waiting for an answer.
    pub async fn say(&mut self, message: MessageV1) -> Result<()> {
        quic::write_message(&mut self.send, &message.into()).await?;
        Ok(())
    }

    /// Sends one batch and returns the hub's answer to it (skipping the
    /// hub's catalog sync messages, which this peer does not take part in).
    pub async fn send(&mut self, batch: &SignedBatch) -> Result<MessageV1> {
        quic::write_message(&mut self.send, &MessageV1::Batch(batch.clone()).into()).await?;
        loop {
            let reply =
                tokio::time::timeout(Duration::from_secs(20), quic::read_message(&mut self.recv))
                    .await
                    .context("no reply from the hub")??;
            match reply {
                Some(Message::V1(MessageV1::Catalog(_))) => continue,
                Some(Message::V1(m)) => return Ok(m),
                None => return Err(anyhow!("the hub closed the stream")),
            }
        }
    }
}

/// The table of [`batch`]: certificate number and names, keyed by number.
pub fn schema() -> TableSchema {
    TableSchema {
        version: 1,
        table: "marriage".into(),
        columns: vec![
            Column {
                name: "cert_no".into(),
                sql_type: "TEXT".into(),
                nullable: false,
            },
            Column {
                name: "names".into(),
                sql_type: "TEXT".into(),
                nullable: true,
            },
        ],
        key: vec![0],
    }
}

/// Batch `seq` of `feed` signed by `key`: one inserted row keyed `cert`
/// (after the table's schema in batch 1).
pub fn batch(
    key: &NodeKey,
    feed: &str,
    seq: u64,
    prev: BatchHash,
    cert: &str,
) -> Result<SignedBatch> {
    let mut entries = Vec::new();
    if seq == 1 {
        entries.push(Entry::Schema(schema()));
    }
    entries.push(Entry::Change(RowChange {
        op: Op::Insert,
        key: vec![Value::Text(cert.into())],
        row: Some(vec![Value::Text(cert.into()), Value::Text("abc".into())]),
        schema_version: 1,
    }));
    let body = BatchBody {
        feed: feed.parse()?,
        seq,
        prev,
        created_at: UnixMillis::now(),
        entries,
    };
    Ok(SignedBatch::seal(key, &body)?)
}

/// Fails unless `reply` refuses with `reason` and asks to resend from
/// `resend_from`.
pub fn expect_reject(reply: MessageV1, reason: RejectReason, resend_from: u64) {
    match reply {
        MessageV1::Reject(r) => {
            assert_eq!(r.reason, reason, "{r:?}");
            assert_eq!(r.resend_from, resend_from, "{r:?}");
        }
        other => panic!("expected a {reason} rejection, got {other:?}"),
    }
}

/// Fails unless `reply` acknowledges `seq`.
pub fn expect_ack(reply: MessageV1, seq: u64) {
    match reply {
        MessageV1::Ack(a) => assert_eq!(a.seq, seq),
        other => panic!("expected ack {seq}, got {other:?}"),
    }
}
