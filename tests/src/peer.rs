//! Hand-driven agents: one that speaks the catalog part of the feed
//! protocol, one that sends batches, for tests of the hub's checks and for
//! the benchmarks.

use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use shuyuan_link::client as link;
use shuyuan_link::quic;
use shuyuan_protocol::batch::{BatchBody, BatchHash, Entry, SignedBatch};
use shuyuan_protocol::catalog::doc::{CatalogDoc, Sender};
use shuyuan_protocol::federation::HubHello;
use shuyuan_protocol::message::{CatalogRefusal, CatalogSync, Hello, Welcome};
use shuyuan_protocol::{
    Column, FeedId, Message, MessageV1, NodeId, NodeKey, Op, RejectReason, RowChange, TableSchema,
    UnixMillis, Value,
};

use std::net::SocketAddr;

use rustls::pki_types::CertificateDer;

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
        FeedPeer::connect_at(hub.addr, hub.key.parse()?, key, department, resources).await
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
        FeedPeer::open_at(hub.addr, hub.key.parse()?, key, hello).await
    }

    /// [`FeedPeer::connect`] to the hub at `addr` with key `hub_key`.
    pub async fn connect_at(
        addr: SocketAddr,
        hub_key: NodeId,
        key: &NodeKey,
        department: &str,
        resources: &[&str],
    ) -> Result<(FeedPeer, Welcome)> {
        FeedPeer::open_at(addr, hub_key, key, hello(department, resources)?).await
    }

    /// [`FeedPeer::connect`] with a client made by hand (see
    /// [`presenting`]).
    pub async fn connect_with(
        hub: &HubProcess,
        client: quinn::ClientConfig,
        department: &str,
        resources: &[&str],
    ) -> Result<(FeedPeer, Welcome)> {
        FeedPeer::open_with(hub.addr, client, hello(department, resources)?).await
    }

    async fn open_at(
        addr: SocketAddr,
        hub_key: NodeId,
        key: &NodeKey,
        hello: MessageV1,
    ) -> Result<(FeedPeer, Welcome)> {
        FeedPeer::open_with(addr, quic::client_config(key, hub_key)?, hello).await
    }

    async fn open_with(
        addr: SocketAddr,
        client: quinn::ClientConfig,
        hello: MessageV1,
    ) -> Result<(FeedPeer, Welcome)> {
        let (endpoint, conn) = dial_at(addr, client).await?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|e| anyhow!(quic::explain(&e)))?;
        // A refused key learns it on its first stream operation, which may
        // be this write or the read after it (TLS 1.3 client auth).
        let refused = |e: quic::QuicError| match link::lost_connection(&e) {
            Some(lost) => anyhow!(quic::explain(lost)),
            None => e.into(),
        };
        quic::write_message(&mut send, &hello.into())
            .await
            .map_err(refused)?;
        let welcome = match quic::read_message(&mut recv).await.map_err(refused)? {
            Some(Message::V1(MessageV1::Welcome(w))) => w,
            other => return Err(anyhow!("expected Welcome, got {other:?}")),
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

    /// Writes bytes as they are onto the feed stream: for frames the hub
    /// must refuse.
    pub async fn write_raw(&mut self, bytes: &[u8]) -> Result<()> {
        self.send.write_all(bytes).await?;
        Ok(())
    }

    /// Ends the feed stream (wherever the last write left it).
    pub fn finish(&mut self) -> Result<()> {
        self.send.finish()?;
        Ok(())
    }

    /// Waits up to `timeout` for the hub to close the connection, and
    /// returns why it did, as the operator would read it.
    pub async fn closed_by_hub(&self, timeout: Duration) -> Result<String> {
        let e = tokio::time::timeout(timeout, self.conn.closed())
            .await
            .context("the hub kept the connection open")?;
        Ok(quic::explain(&e))
    }

    /// Sends a message without waiting for an answer.
    pub async fn say(&mut self, message: MessageV1) -> Result<()> {
        quic::write_message(&mut self.send, &message.into()).await?;
        Ok(())
    }

    /// The hub's next message other than catalog sync.
    pub async fn next(&mut self) -> Result<MessageV1> {
        loop {
            let reply =
                tokio::time::timeout(Duration::from_secs(20), quic::read_message(&mut self.recv))
                    .await
                    .context("no message from the hub")??;
            match reply {
                Some(Message::V1(MessageV1::Catalog(_))) => continue,
                Some(Message::V1(m)) => return Ok(m),
                None => return Err(anyhow!("the hub closed the stream")),
            }
        }
    }

    /// Sends one batch and returns the hub's answer to it (skipping the
    /// hub's catalog sync messages, which this peer does not take part in).
    pub async fn send(&mut self, batch: &SignedBatch) -> Result<MessageV1> {
        quic::write_message(&mut self.send, &MessageV1::Batch(batch.clone()).into()).await?;
        self.next().await
    }
}

/// The `Hello` of `department` sending `resources`.
fn hello(department: &str, resources: &[&str]) -> Result<MessageV1> {
    Ok(MessageV1::Hello(Hello {
        software: "test-peer".into(),
        department: department.parse()?,
        resources: resources
            .iter()
            .map(|r| r.parse())
            .collect::<Result<_, _>>()?,
    }))
}

/// Completes a QUIC handshake with `hub` as `key`, nothing more: for peers
/// that then misbehave on purpose. The hub's refusal of the key shows as an
/// error on the first stream operation, not here (TLS 1.3).
pub async fn dial(hub: &HubProcess, key: &NodeKey) -> Result<(quinn::Endpoint, quinn::Connection)> {
    dial_at(hub.addr, quic::client_config(key, hub.key.parse()?)?).await
}

async fn dial_at(
    addr: SocketAddr,
    client: quinn::ClientConfig,
) -> Result<(quinn::Endpoint, quinn::Connection)> {
    let endpoint = quic::client_endpoint(addr)?;
    let conn = endpoint
        .connect_with(client, addr, quic::SERVER_NAME)?
        .await
        .map_err(|e| anyhow!(quic::explain(&e)))?;
    Ok((endpoint, conn))
}

/// A client that presents `cert` as its certificate but signs the TLS
/// handshake with `signer`, and accepts only the hub `hub_key`: for a
/// certificate whose key the client does not hold (another node's public
/// key, see [`certificate_of`]) or one without an ed25519 key
/// ([`certificate_without_ed25519`]).
pub fn presenting(
    cert: CertificateDer<'static>,
    signer: &NodeKey,
    hub_key: NodeId,
) -> Result<quinn::ClientConfig> {
    Ok(quic::client_config_presenting(cert, signer, hub_key)?)
}

/// A certificate for the public key `key`, issued by `issuer`: what an
/// impostor can make without `key`'s private half.
pub fn certificate_of(key: &NodeId, issuer: &NodeKey) -> Result<CertificateDer<'static>> {
    /// A public key alone.
    struct Public([u8; 32]);
    impl rcgen::PublicKeyData for Public {
        fn der_bytes(&self) -> &[u8] {
            &self.0
        }

        fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
            &rcgen::PKCS_ED25519
        }
    }
    let pkcs8 = rustls::pki_types::PrivatePkcs8KeyDer::from(issuer.to_pkcs8_der()?);
    let issuer_key = rcgen::KeyPair::try_from(&pkcs8)?;
    let params = rcgen::CertificateParams::new(vec![quic::SERVER_NAME.to_string()])?;
    let issuer = rcgen::Issuer::from_params(&params, &issuer_key);
    let cert = params.signed_by(&Public(*key.as_bytes()), &issuer)?;
    Ok(cert.der().clone())
}

/// A self-signed certificate with an ECDSA P-256 key, which no node has.
pub fn certificate_without_ed25519() -> Result<CertificateDer<'static>> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let params = rcgen::CertificateParams::new(vec![quic::SERVER_NAME.to_string()])?;
    Ok(params.self_signed(&key)?.der().clone())
}

/// Enrolls each key for its own department `{prefix}{index:04}`, with a
/// few `shuyuan-hub enroll` commands at a time.
pub fn enroll_departments(hub: &HubProcess, prefix: &str, keys: &[NodeKey]) -> Result<()> {
    const AT_ONCE: usize = 8;
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..AT_ONCE)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(key) = keys.get(i) else {
                            return Ok(());
                        };
                        let department = format!("{prefix}{i:04}");
                        hub.enroll(&department, &department, &key.id().to_string())?;
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .try_for_each(|w| w.join().map_err(|_| anyhow!("enroll worker panicked"))?)
    })
}

/// Connects one [`FeedPeer`] per key (department `{prefix}{index:04}`,
/// as [`enroll_departments`] enrolled it), `at_once` handshakes at a time,
/// and has each send `batches` batches of feed `M01/0001`, every one
/// acknowledged. Returns the open connections.
pub async fn connect_departments(
    hub: &HubProcess,
    prefix: &str,
    keys: &[NodeKey],
    batches: u64,
    at_once: usize,
) -> Result<Vec<FeedPeer>> {
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(at_once));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, key) in keys.iter().enumerate() {
        let (hub_key, addr, key, gate): (NodeId, _, _, _) =
            (hub.key.parse()?, hub.addr, key.clone(), gate.clone());
        let department = format!("{prefix}{i:04}");
        tasks.spawn(async move {
            let _turn = gate.acquire_owned().await?;
            let (mut peer, _) =
                FeedPeer::connect_at(addr, hub_key, &key, &department, &["M01/0001"]).await?;
            let feed = format!("{department}:M01/0001");
            let mut prev = BatchHash::GENESIS;
            for seq in 1..=batches {
                let b = batch(&key, &feed, seq, prev, &format!("{department}-{seq:06}"))?;
                expect_ack(peer.send(&b).await?, seq);
                prev = b.hash();
            }
            Ok::<_, anyhow::Error>((i, peer))
        });
    }
    let mut peers = Vec::with_capacity(keys.len());
    while let Some(done) = tasks.join_next().await {
        peers.push(done??);
    }
    peers.sort_by_key(|(i, _)| *i);
    Ok(peers.into_iter().map(|(_, p)| p).collect())
}

/// A process's resident memory (`VmRSS`) and its peak (`VmHWM`), in KiB,
/// from `/proc/PID/status`.
pub fn memory_kib(pid: u32) -> Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
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
