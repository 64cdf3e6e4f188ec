//! QUIC glue shared by the agent's uplink and the hub: TLS 1.3 with
//! certificates made from node keys, mutual key pinning, and framed messages
//! on streams.
//!
//! Invariant: a handshake completes only if the server's key equals the key
//! the client pinned and the client's key is admitted by the server's
//! [`PeerPolicy`]; the TLS handshake signatures are still checked, so a peer
//! must hold the private key of the identity it presents. The policy sees a
//! client's key only after the client proved it holds it (its handshake
//! signature verified against that key), so a refusal that names a key was
//! earned by that key's holder.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{ConnectionError, RecvStream, SendStream, TransportConfig, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use shuyuan_protocol::frame::{self, FrameError, LENGTH_PREFIX};
use shuyuan_protocol::identity::{NodeId, NodeKey};
use shuyuan_protocol::message::{ALPN, Message};

/// The name every node puts in its certificate; identity is the key, not
/// the name, so it is the same everywhere.
pub const SERVER_NAME: &str = "shuyuan.invalid";

/// How often an idle connection sends a keep-alive.
pub const KEEP_ALIVE: Duration = Duration::from_secs(4);
/// How long a silent connection lives before it is declared lost.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// DER prefix of an ed25519 SubjectPublicKeyInfo (RFC 8410); the raw 32-byte
/// key follows it.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Errors setting up QUIC or moving frames.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error("cannot build the TLS certificate from the node key: {0}")]
    Certificate(String),
    #[error("cannot configure TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("cannot configure QUIC: {0}")]
    Config(String),
    #[error("connection lost: {0}")]
    Connection(#[from] ConnectionError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream ended in the middle of a frame")]
    Truncated,
    #[error(transparent)]
    Frame(#[from] FrameError),
}

/// Decides which client keys may complete a handshake with a server.
pub trait PeerPolicy: Send + Sync + fmt::Debug + 'static {
    /// Whether `peer` may connect. Called during the handshake, once the
    /// client has proved it holds `peer`'s private key (its handshake
    /// signature verified); refusing implementations should log and count
    /// the refusal themselves.
    fn admit(&self, peer: &NodeId) -> bool;

    /// A client presented a certificate that holds no ed25519 key.
    fn refuse_unreadable(&self, reason: &str) {
        let _ = reason;
    }

    /// A client's handshake signature does not verify against the key in
    /// its certificate: it has not shown that it holds that key, so the
    /// key says nothing about who it is and is not passed on.
    fn refuse_unproven(&self, reason: &str) {
        let _ = reason;
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A self-signed certificate for `key` and the matching rustls private key.
pub fn certificate(
    key: &NodeKey,
) -> Result<(CertificateDer<'static>, PrivateKeyDer<'static>), QuicError> {
    let der = key
        .to_pkcs8_der()
        .map_err(|e| QuicError::Certificate(e.to_string()))?;
    let pkcs8 = PrivatePkcs8KeyDer::from(der);
    let key_pair =
        rcgen::KeyPair::try_from(&pkcs8).map_err(|e| QuicError::Certificate(e.to_string()))?;
    let params = rcgen::CertificateParams::new(vec![SERVER_NAME.to_string()])
        .map_err(|e| QuicError::Certificate(e.to_string()))?;
    let cert = params
        .self_signed(&key_pair)
        .map_err(|e| QuicError::Certificate(e.to_string()))?;
    Ok((cert.der().clone(), PrivateKeyDer::Pkcs8(pkcs8)))
}

/// The ed25519 key inside a certificate.
pub fn certificate_key(cert: &CertificateDer<'_>) -> Result<NodeId, String> {
    let parsed = rustls::server::ParsedCertificate::try_from(cert).map_err(|e| e.to_string())?;
    let spki = parsed.subject_public_key_info();
    let bytes: &[u8] = spki.as_ref();
    let raw = bytes
        .strip_prefix(&ED25519_SPKI_PREFIX[..])
        .and_then(|k| <&[u8; 32]>::try_from(k).ok())
        .ok_or_else(|| "certificate does not hold an ed25519 key".to_string())?;
    NodeId::from_bytes(raw).map_err(|e| e.to_string())
}

/// The peer's key on an established connection.
pub fn peer_id(connection: &quinn::Connection) -> Option<NodeId> {
    let identity = connection.peer_identity()?;
    let certs = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    certificate_key(certs.first()?).ok()
}

/// The hub's flow-control window per feed stream and per connection: how
/// much a peer may send before the hub has read it. One window bounds what
/// a connection can make the hub buffer in QUIC, whatever the peer does, so
/// `max_connections` times this is the transport's share of the hub's
/// memory. A 16 MiB batch still passes; it just takes several window
/// updates.
pub const SERVER_RECEIVE_WINDOW: u32 = 4 * 1024 * 1024;

/// Streams a client may open on one connection: the feed stream. Further
/// streams are refused by QUIC flow control, so a peer cannot make the hub
/// hold state for streams nobody reads.
pub const SERVER_MAX_STREAMS: u32 = 1;

/// Connection attempts the hub's endpoint holds before the accept loop has
/// seen them; beyond it quinn refuses at once.
pub const SERVER_MAX_INCOMING: usize = 4096;

fn transport() -> Arc<TransportConfig> {
    Arc::new(base_transport())
}

/// The hub side: smaller windows (many connections share one process) and
/// only the one bidirectional stream the protocol uses.
fn server_transport() -> Arc<TransportConfig> {
    let mut t = base_transport();
    t.stream_receive_window(VarInt::from_u32(SERVER_RECEIVE_WINDOW));
    t.receive_window(VarInt::from_u32(SERVER_RECEIVE_WINDOW));
    t.max_concurrent_bidi_streams(VarInt::from_u32(SERVER_MAX_STREAMS));
    t.max_concurrent_uni_streams(VarInt::from_u32(0));
    Arc::new(t)
}

fn base_transport() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(VarInt::from_u32(
        IDLE_TIMEOUT.as_millis() as u32,
    ))));
    // Feeds stream large batches on one stream; give it room.
    t.stream_receive_window(VarInt::from_u32(8 * 1024 * 1024));
    t.receive_window(VarInt::from_u32(16 * 1024 * 1024));
    t.send_window(16 * 1024 * 1024);
    t
}

/// Server configuration: presents `key`'s certificate, requires a client
/// certificate, and admits only keys `policy` admits.
pub fn server_config(
    key: &NodeKey,
    policy: Arc<dyn PeerPolicy>,
) -> Result<quinn::ServerConfig, QuicError> {
    let (cert, private) = certificate(key)?;
    let provider = provider();
    let verifier = Arc::new(AdmittedClients {
        policy,
        provider: provider.clone(),
    });
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], private)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No session resumption: a resumed session skips the client
    // certificate, and with it `policy`, so a key revoked or withdrawn
    // since its last connection could come back in.
    tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    tls.send_tls13_tickets = 0;
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| QuicError::Config(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config.transport_config(server_transport());
    config.max_incoming(SERVER_MAX_INCOMING);
    Ok(config)
}

/// The key QUIC's stateless resets are made with, derived from the node
/// key. A restarted hub then answers packets of connections it no longer
/// knows with a reset the peer accepts, and agents reconnect at once
/// instead of waiting out the idle timeout.
struct ResetKey([u8; 32]);

impl quinn::crypto::HmacKey for ResetKey {
    fn sign(&self, data: &[u8], signature_out: &mut [u8]) {
        let mac = blake3::keyed_hash(&self.0, data);
        let n = signature_out.len().min(32);
        signature_out[..n].copy_from_slice(&mac.as_bytes()[..n]);
    }

    fn signature_len(&self) -> usize {
        32
    }

    fn verify(&self, data: &[u8], signature: &[u8]) -> Result<(), quinn::crypto::CryptoError> {
        let given: [u8; 32] = signature
            .try_into()
            .map_err(|_| quinn::crypto::CryptoError)?;
        // `blake3::Hash` compares in constant time.
        if blake3::keyed_hash(&self.0, data) == blake3::Hash::from(given) {
            Ok(())
        } else {
            Err(quinn::crypto::CryptoError)
        }
    }
}

/// Random 8-byte connection ids that any instance of the hub takes for
/// its own. quinn's default ids carry a check keyed per process, so a
/// restarted hub would drop its old connections' packets as invalid
/// instead of resetting them.
struct RandomIds;

impl quinn::ConnectionIdGenerator for RandomIds {
    fn generate_cid(&mut self) -> quinn::ConnectionId {
        let mut id = [0u8; 8];
        if getrandom::fill(&mut id).is_err() {
            // Ids need only be unpredictable enough not to collide.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            id = blake3::hash(&t.as_nanos().to_le_bytes()).as_bytes()[..8]
                .try_into()
                .unwrap_or_default();
        }
        quinn::ConnectionId::new(&id)
    }

    fn cid_len(&self) -> usize {
        8
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
}

/// A server endpoint on `addr` whose stateless resets survive restarts
/// (the reset key is derived from the node key).
pub fn server_endpoint(
    key: &NodeKey,
    config: quinn::ServerConfig,
    addr: SocketAddr,
) -> std::io::Result<quinn::Endpoint> {
    let reset = ResetKey(key.derive_secret("shuyuan 2026 quic stateless reset v1"));
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    let mut endpoint = quinn::EndpointConfig::new(Arc::new(reset));
    endpoint.cid_generator(|| Box::new(RandomIds));
    quinn::Endpoint::new(
        endpoint,
        Some(config),
        std::net::UdpSocket::bind(addr)?,
        runtime,
    )
}

/// Client configuration: presents `key`'s certificate and accepts only a
/// server whose key is `server`.
pub fn client_config(key: &NodeKey, server: NodeId) -> Result<quinn::ClientConfig, QuicError> {
    let (cert, _) = certificate(key)?;
    client_config_presenting(cert, key, server)
}

/// A client that presents `cert` as its certificate and signs the
/// handshake with `signer`, accepting only a server whose key is `server`.
/// With `cert` from [`certificate`] of `signer`, an honest node
/// ([`client_config`]); with a certificate of another node's public key, or
/// one without an ed25519 key, an impostor, as tests use it to prove the
/// server refuses one.
pub fn client_config_presenting(
    cert: CertificateDer<'static>,
    signer: &NodeKey,
    server: NodeId,
) -> Result<quinn::ClientConfig, QuicError> {
    let (_, private) = certificate(signer)?;
    let provider = provider();
    let key = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| QuicError::Certificate(e.to_string()))?;
    let certified = Arc::new(rustls::sign::CertifiedKey::new(vec![cert], key));
    let verifier = Arc::new(PinnedServer {
        pinned: server,
        provider: provider.clone(),
    });
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(Present(certified)));
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| QuicError::Config(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(transport());
    Ok(config)
}

/// Presents one certificate on every handshake.
#[derive(Debug)]
struct Present(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for Present {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _schemes: &[SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A client endpoint on an ephemeral port of the right address family.
pub fn client_endpoint(remote: SocketAddr) -> std::io::Result<quinn::Endpoint> {
    let local: SocketAddr = if remote.is_ipv6() {
        "[::]:0".parse().map_err(std::io::Error::other)?
    } else {
        "0.0.0.0:0".parse().map_err(std::io::Error::other)?
    };
    quinn::Endpoint::client(local)
}

/// Why [`dial`] could not open a stream to a peer.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("cannot resolve {address}: {reason}")]
    Resolve { address: String, reason: String },
    #[error("cannot set up QUIC: {0}")]
    Setup(String),
    #[error("no answer from {0} within {1:?}")]
    Timeout(SocketAddr, Duration),
    #[error("{0}")]
    Connection(ConnectionError),
}

/// Resolves `address` (`HOST:PORT`), creates the client endpoint on first
/// use, connects within `timeout` and opens the feed stream: the one way
/// both an agent and a child hub reach their hub.
pub async fn dial(
    endpoint: &mut Option<quinn::Endpoint>,
    client: &quinn::ClientConfig,
    address: &str,
    timeout: Duration,
) -> Result<(SocketAddr, quinn::Connection, SendStream, RecvStream), DialError> {
    let resolve = |reason: String| DialError::Resolve {
        address: address.to_string(),
        reason,
    };
    let addr = tokio::net::lookup_host(address)
        .await
        .map_err(|e| resolve(e.to_string()))?
        .next()
        .ok_or_else(|| resolve("no addresses".into()))?;
    if endpoint.is_none() {
        *endpoint = Some(client_endpoint(addr).map_err(|e| DialError::Setup(e.to_string()))?);
    }
    let Some(ep) = endpoint.as_ref() else {
        return Err(DialError::Setup("no endpoint".into()));
    };
    let connecting = ep
        .connect_with(client.clone(), addr, SERVER_NAME)
        .map_err(|e| DialError::Setup(e.to_string()))?;
    let conn = match tokio::time::timeout(timeout, connecting).await {
        Err(_) => return Err(DialError::Timeout(addr, timeout)),
        Ok(Err(e)) => return Err(DialError::Connection(e)),
        Ok(Ok(c)) => c,
    };
    let (send, recv) = conn.open_bi().await.map_err(DialError::Connection)?;
    Ok((addr, conn, send, recv))
}

/// The only handshake signature scheme either side offers or accepts.
const SCHEMES: [SignatureScheme; 1] = [SignatureScheme::ED25519];

fn refuse_tls12() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

/// The real TLS 1.3 handshake signature check: pinning decides whose key is
/// acceptable, this proves the peer holds it.
fn check_tls13(
    provider: &CryptoProvider,
    message: &[u8],
    cert: &CertificateDer<'_>,
    dss: &DigitallySignedStruct,
) -> Result<HandshakeSignatureValid, rustls::Error> {
    rustls::crypto::verify_tls13_signature(
        message,
        cert,
        dss,
        &provider.signature_verification_algorithms,
    )
}

#[derive(Debug)]
struct PinnedServer {
    pinned: NodeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let presented = certificate_key(end_entity).map_err(rustls::Error::General)?;
        if presented == self.pinned {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "hub key mismatch: the server presented {presented}, the config pins {}",
                self.pinned
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        check_tls13(&self.provider, message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

#[derive(Debug)]
struct AdmittedClients {
    policy: Arc<dyn PeerPolicy>,
    provider: Arc<CryptoProvider>,
}

impl ClientCertVerifier for AdmittedClients {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    /// Checks only that the certificate holds an ed25519 key. rustls asks
    /// before the client has signed the handshake, so the key is not yet
    /// proven: the policy decides on it in `verify_tls13_signature`.
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        client_key(self.policy.as_ref(), end_entity)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        refuse_tls12()
    }

    /// The client's CertificateVerify, which every TLS 1.3 handshake with
    /// a client certificate passes before it completes: once it verifies
    /// against the certificate's key, the client holds that key, and the
    /// policy decides whether it may connect.
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let proven = check_tls13(&self.provider, message, cert, dss).inspect_err(|e| {
            self.policy.refuse_unproven(&e.to_string());
        })?;
        let peer = client_key(self.policy.as_ref(), cert)?;
        if self.policy.admit(&peer) {
            Ok(proven)
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        SCHEMES.to_vec()
    }
}

/// The ed25519 key of a client certificate; a certificate without one is
/// refused (and reported to `policy`).
fn client_key(policy: &dyn PeerPolicy, cert: &CertificateDer<'_>) -> Result<NodeId, rustls::Error> {
    certificate_key(cert).map_err(|reason| {
        policy.refuse_unreadable(&reason);
        rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
    })
}

/// Writes one framed message.
pub async fn write_message(send: &mut SendStream, message: &Message) -> Result<(), QuicError> {
    let frame = frame::encode_frame(message)?;
    send.write_all(&frame).await?;
    Ok(())
}

/// Reads one framed message; `Ok(None)` when the peer finished the stream
/// cleanly between frames. The length is checked before the payload buffer
/// is allocated.
pub async fn read_message(recv: &mut RecvStream) -> Result<Option<Message>, QuicError> {
    match read_prefix(recv).await? {
        Some(len) => Ok(Some(read_payload(recv, len).await?)),
        None => Ok(None),
    }
}

/// Reads a frame's length prefix, refusing lengths over the limit;
/// `Ok(None)` when the peer finished the stream cleanly between frames.
/// A reader that accounts for memory reserves the length before it reads
/// the payload with [`read_payload`].
pub async fn read_prefix(recv: &mut RecvStream) -> Result<Option<usize>, QuicError> {
    let mut prefix = [0u8; LENGTH_PREFIX];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(QuicError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    Ok(Some(frame::payload_len(prefix)?))
}

/// Reads and decodes the `len`-byte payload that follows a prefix.
pub async fn read_payload(recv: &mut RecvStream, len: usize) -> Result<Message, QuicError> {
    let mut payload = vec![0u8; len];
    match recv.read_exact(&mut payload).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(_)) => return Err(QuicError::Truncated),
        Err(quinn::ReadExactError::ReadError(e)) => return Err(e.into()),
    }
    Ok(frame::decode_payload(&payload)?)
}

/// What went wrong with a connection, in words for an operator. TLS alerts
/// during or right after the handshake mean the peer refused our identity
/// (with TLS 1.3 client authentication the client learns this only on its
/// first stream operation).
pub fn explain(error: &ConnectionError) -> String {
    match error {
        ConnectionError::ConnectionClosed(close) if is_tls_alert(close.error_code) => format!(
            "authentication failed: the peer refused this node's key during the TLS handshake ({}); \
             ask its administrator to enroll this node's key",
            String::from_utf8_lossy(&close.reason)
        ),
        ConnectionError::TransportError(e) if is_tls_alert(e.code) => {
            format!("authentication failed: {}", e.reason)
        }
        ConnectionError::TimedOut => "no answer from the peer (timed out)".to_string(),
        ConnectionError::ApplicationClosed(close) => format!(
            "the peer closed the connection: {}",
            String::from_utf8_lossy(&close.reason)
        ),
        ConnectionError::Reset => {
            "the peer reset the connection (it may have restarted)".to_string()
        }
        other => other.to_string(),
    }
}

/// Whether a connection error is a TLS authentication failure.
pub fn is_auth_failure(error: &ConnectionError) -> bool {
    match error {
        ConnectionError::ConnectionClosed(close) => is_tls_alert(close.error_code),
        ConnectionError::TransportError(e) => is_tls_alert(e.code),
        _ => false,
    }
}

fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    // QUIC carries TLS alerts as CRYPTO_ERROR codes 0x0100-0x01ff (RFC 9001).
    let code = u64::from(code);
    (0x100..=0x1ff).contains(&code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shuyuan_protocol::message::{Ack, MessageV1};
    use std::sync::Mutex;

    /// Admits the keys in `.0`; records the keys it refused (`.1`) and the
    /// clients that did not prove their key (`.2`).
    #[derive(Debug, Default)]
    struct Allow(Mutex<Vec<NodeId>>, Mutex<Vec<NodeId>>, Mutex<Vec<String>>);
    impl PeerPolicy for Allow {
        fn admit(&self, peer: &NodeId) -> bool {
            let ok = self.0.lock().unwrap().contains(peer);
            if !ok {
                self.1.lock().unwrap().push(*peer);
            }
            ok
        }

        fn refuse_unproven(&self, reason: &str) {
            self.2.lock().unwrap().push(reason.to_string());
        }
    }

    #[test]
    fn certificate_carries_the_node_key() {
        let key = NodeKey::from_seed([11; 32]);
        let (cert, _) = certificate(&key).unwrap();
        assert_eq!(certificate_key(&cert).unwrap(), key.id());
    }

    async fn pair(
        client_config: quinn::ClientConfig,
        policy: Arc<Allow>,
        server_key: &NodeKey,
    ) -> (quinn::Endpoint, Result<(quinn::Connection, NodeId), String>) {
        let server = quinn::Endpoint::server(
            server_config(server_key, policy).unwrap(),
            "127.0.0.1:0".parse().unwrap(),
        )
        .unwrap();
        let addr = server.local_addr().unwrap();
        let srv = server.clone();
        let accept = tokio::spawn(async move {
            let conn = srv.accept().await?.await.ok()?;
            let (mut send, mut recv) = conn.accept_bi().await.ok()?;
            let m = read_message(&mut recv).await.ok()??;
            write_message(&mut send, &m).await.ok()?;
            send.finish().ok()?;
            let _ = conn.closed().await;
            Some(())
        });
        let client = client_endpoint(addr).unwrap();
        let result = async {
            let conn = client
                .connect_with(client_config, addr, SERVER_NAME)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| explain(&e))?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| explain(&e))?;
            let m = Message::V1(MessageV1::Ack(Ack {
                feed: "D:R".parse().unwrap(),
                seq: 9,
            }));
            write_message(&mut send, &m)
                .await
                .map_err(|e| e.to_string())?;
            let echoed = match read_message(&mut recv).await {
                Ok(Some(m)) => m,
                Ok(None) => return Err("stream ended".to_string()),
                Err(QuicError::Read(quinn::ReadError::ConnectionLost(e))) => {
                    return Err(explain(&e));
                }
                Err(e) => return Err(e.to_string()),
            };
            assert_eq!(echoed, m);
            let peer = peer_id(&conn).ok_or("no peer id")?;
            Ok((conn, peer))
        }
        .await;
        drop(accept);
        (server, result)
    }

    #[tokio::test]
    async fn mutual_pinning() {
        let hub = NodeKey::from_seed([1; 32]);
        let agent = NodeKey::from_seed([2; 32]);
        let stranger = NodeKey::from_seed([3; 32]);
        let policy = Arc::new(Allow::default());
        policy.0.lock().unwrap().push(agent.id());

        let (_s, ok) = pair(
            client_config(&agent, hub.id()).unwrap(),
            policy.clone(),
            &hub,
        )
        .await;
        let (_conn, peer) = ok.unwrap();
        assert_eq!(peer, hub.id());

        let (_s, refused) = pair(
            client_config(&stranger, hub.id()).unwrap(),
            policy.clone(),
            &hub,
        )
        .await;
        let err = refused.unwrap_err();
        assert!(err.contains("authentication failed"), "{err}");
        assert_eq!(policy.1.lock().unwrap().as_slice(), &[stranger.id()]);

        let (_s, wrong_hub) = pair(
            client_config(&agent, stranger.id()).unwrap(),
            policy.clone(),
            &hub,
        )
        .await;
        let err = wrong_hub.unwrap_err();
        assert!(err.contains("hub key mismatch"), "{err}");
    }

    #[tokio::test]
    async fn the_policy_sees_a_key_only_once_the_client_proved_it_holds_it() {
        let hub = NodeKey::from_seed([1; 32]);
        let victim = NodeKey::from_seed([4; 32]);
        let impostor = NodeKey::from_seed([5; 32]);
        let policy = Arc::new(Allow::default());
        // The victim's certificate is public; its private key is not.
        let (victim_cert, _) = certificate(&victim).unwrap();
        for enrolled in [false, true] {
            if enrolled {
                policy.0.lock().unwrap().push(victim.id());
            }
            let client =
                client_config_presenting(victim_cert.clone(), &impostor, hub.id()).unwrap();
            let (_s, refused) = pair(client, policy.clone(), &hub).await;
            let err = refused.unwrap_err();
            assert!(err.contains("authentication failed"), "{err}");
        }
        assert!(
            policy.1.lock().unwrap().is_empty(),
            "the victim's key was refused in its name"
        );
        assert_eq!(policy.2.lock().unwrap().len(), 2);
        // The victim itself still gets in.
        let (_s, ok) = pair(client_config(&victim, hub.id()).unwrap(), policy, &hub).await;
        ok.unwrap();
    }
}
