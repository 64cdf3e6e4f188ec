//! The replication connection: PostgreSQL's streaming replication protocol
//! over a plain connection (`replication=database`), enough to run
//! `START_REPLICATION ... LOGICAL` and exchange its CopyBoth messages.
//!
//! tokio-postgres has no CopyBoth support, so this speaks the protocol
//! itself, using `postgres-protocol` for message building and the password
//! exchanges (cleartext, MD5, SCRAM-SHA-256).
//!
//! Invariant: [`ReplConn::recv`] is cancel-safe (bytes are buffered before
//! parsing), so a read can wait for the log with a timeout without losing a
//! message.

use bytes::BytesMut;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_postgres::config::Host;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A server error or a protocol failure.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cannot connect to PostgreSQL at {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("PostgreSQL connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("PostgreSQL: {message} (SQLSTATE {code})")]
    Server { code: String, message: String },
    #[error("PostgreSQL protocol: {0}")]
    Protocol(String),
}

/// One message of the replication stream.
#[derive(Debug)]
pub enum Replication {
    /// A pgoutput message starting at `start`.
    XLogData { start: u64, data: Vec<u8> },
    /// The server's position; it wants an answer now when `reply` is set.
    Keepalive { wal_end: u64, reply: bool },
}

/// An open replication connection.
pub struct ReplConn {
    stream: Box<dyn Stream>,
    buf: Vec<u8>,
    at: usize,
}

impl std::fmt::Debug for ReplConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplConn").finish_non_exhaustive()
    }
}

fn protocol(what: impl Into<String>) -> WireError {
    WireError::Protocol(what.into())
}

impl ReplConn {
    /// Connects as the DSN says, in replication mode, with the session
    /// settings that fix how values are printed.
    pub async fn connect(
        config: &tokio_postgres::Config,
        settings: &[(&str, &str)],
    ) -> Result<ReplConn, WireError> {
        let host = config
            .get_hosts()
            .first()
            .cloned()
            .unwrap_or(Host::Tcp("localhost".into()));
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let stream: Box<dyn Stream> = match &host {
            Host::Tcp(h) => {
                let addr = format!("{h}:{port}");
                let s = tokio::net::TcpStream::connect(&addr)
                    .await
                    .map_err(|source| WireError::Connect { addr, source })?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Host::Unix(dir) => {
                let path = dir.join(format!(".s.PGSQL.{port}"));
                let s = tokio::net::UnixStream::connect(&path)
                    .await
                    .map_err(|source| WireError::Connect {
                        addr: path.display().to_string(),
                        source,
                    })?;
                Box::new(s)
            }
        };
        let mut conn = ReplConn {
            stream,
            buf: Vec::with_capacity(64 * 1024),
            at: 0,
        };
        let user = config.get_user().unwrap_or("postgres").to_string();
        let db = config.get_dbname().unwrap_or(&user).to_string();
        let mut params: Vec<(&str, &str)> = vec![
            ("user", &user),
            ("database", &db),
            ("replication", "database"),
            ("application_name", "shuyuan-agent"),
        ];
        params.extend_from_slice(settings);
        let mut out = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut out)?;
        conn.send(&out).await?;
        conn.authenticate(&user, config.get_password()).await?;
        Ok(conn)
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), WireError> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await?;
        Ok(())
    }

    async fn authenticate(&mut self, user: &str, password: Option<&[u8]>) -> Result<(), WireError> {
        let need_password = || protocol("the server asks for a password; set source.password_file");
        let mut scram: Option<sasl::ScramSha256> = None;
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'R' => {
                    let code = be_i32(&body, 0)?;
                    let mut out = BytesMut::new();
                    match code {
                        0 => {}
                        3 => {
                            let pw = password.ok_or_else(need_password)?;
                            frontend::password_message(pw, &mut out)?;
                        }
                        5 => {
                            let pw = password.ok_or_else(need_password)?;
                            let salt: [u8; 4] = body
                                .get(4..8)
                                .and_then(|s| s.try_into().ok())
                                .ok_or_else(|| protocol("short MD5 request"))?;
                            let hash = md5_hash(user.as_bytes(), pw, salt);
                            frontend::password_message(hash.as_bytes(), &mut out)?;
                        }
                        10 => {
                            let pw = password.ok_or_else(need_password)?;
                            let mechanisms = String::from_utf8_lossy(&body[4..]);
                            if !mechanisms.split('\0').any(|m| m == sasl::SCRAM_SHA_256) {
                                return Err(protocol(format!(
                                    "no supported SASL mechanism among {mechanisms:?}"
                                )));
                            }
                            let s = sasl::ScramSha256::new(pw, sasl::ChannelBinding::unsupported());
                            frontend::sasl_initial_response(
                                sasl::SCRAM_SHA_256,
                                s.message(),
                                &mut out,
                            )?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| protocol("SASL out of order"))?;
                            s.update(&body[4..])?;
                            frontend::sasl_response(s.message(), &mut out)?;
                        }
                        12 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| protocol("SASL out of order"))?;
                            s.finish(&body[4..])?;
                        }
                        other => {
                            return Err(protocol(format!(
                                "unsupported authentication method {other}"
                            )));
                        }
                    }
                    if !out.is_empty() {
                        self.send(&out).await?;
                    }
                }
                b'Z' => return Ok(()),
                b'E' => return Err(server_error(&body)),
                _ => {} // ParameterStatus, BackendKeyData, notices
            }
        }
    }

    /// Starts streaming the slot from `lsn` with pgoutput.
    pub async fn start(
        &mut self,
        slot: &str,
        publication: &str,
        lsn: u64,
    ) -> Result<(), WireError> {
        let sql = format!(
            "START_REPLICATION SLOT \"{slot}\" LOGICAL {} (proto_version '1', publication_names '\"{publication}\"')",
            lsn_text(lsn)
        );
        let mut out = BytesMut::new();
        frontend::query(&sql, &mut out)?;
        self.send(&out).await?;
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'W' => return Ok(()),
                b'E' => return Err(server_error(&body)),
                b'N' | b'S' => {}
                other => {
                    return Err(protocol(format!(
                        "unexpected message {:?} after START_REPLICATION",
                        other as char
                    )));
                }
            }
        }
    }

    /// The next replication message. Cancel-safe.
    pub async fn recv(&mut self) -> Result<Replication, WireError> {
        loop {
            let (tag, body) = self.message().await?;
            match tag {
                b'd' => {
                    return match body.first() {
                        Some(b'w') if body.len() >= 25 => Ok(Replication::XLogData {
                            start: be_u64(&body, 1)?,
                            data: body[25..].to_vec(),
                        }),
                        Some(b'k') if body.len() >= 18 => Ok(Replication::Keepalive {
                            wal_end: be_u64(&body, 1)?,
                            reply: body[17] == 1,
                        }),
                        _ => Err(protocol("unknown replication message")),
                    };
                }
                b'E' => return Err(server_error(&body)),
                b'c' => return Err(protocol("the server ended the replication stream")),
                _ => {}
            }
        }
    }

    /// Tells the server what is durable: the slot's confirmed position
    /// moves to `flushed`.
    pub async fn status(&mut self, flushed: u64, reply: bool) -> Result<(), WireError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
            - PG_EPOCH_MICROS;
        let mut msg = Vec::with_capacity(39);
        msg.push(b'd');
        msg.extend_from_slice(&38i32.to_be_bytes());
        msg.push(b'r');
        for lsn in [flushed, flushed, flushed] {
            msg.extend_from_slice(&lsn.to_be_bytes());
        }
        msg.extend_from_slice(&now.to_be_bytes());
        msg.push(u8::from(reply));
        self.send(&msg).await
    }

    /// Reads one whole backend message (tag, body), buffering partial input.
    async fn message(&mut self) -> Result<(u8, Vec<u8>), WireError> {
        loop {
            let avail = &self.buf[self.at..];
            if avail.len() >= 5 {
                let len = be_i32(avail, 1)?;
                let len = usize::try_from(len)
                    .ok()
                    .filter(|l| (4..=1 << 30).contains(l))
                    .ok_or_else(|| protocol(format!("bad message length {len}")))?;
                if avail.len() > len {
                    let tag = avail[0];
                    let body = avail[5..1 + len].to_vec();
                    self.at += 1 + len;
                    if self.at == self.buf.len() {
                        self.buf.clear();
                        self.at = 0;
                    }
                    return Ok((tag, body));
                }
            }
            if self.at > 0 {
                self.buf.drain(..self.at);
                self.at = 0;
            }
            let n = self.stream.read_buf(&mut self.buf).await?;
            if n == 0 {
                return Err(WireError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

fn be_i32(b: &[u8], at: usize) -> Result<i32, WireError> {
    b.get(at..at + 4)
        .and_then(|s| s.try_into().ok())
        .map(i32::from_be_bytes)
        .ok_or_else(|| protocol("message too short"))
}

fn be_u64(b: &[u8], at: usize) -> Result<u64, WireError> {
    b.get(at..at + 8)
        .and_then(|s| s.try_into().ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| protocol("message too short"))
}

fn server_error(body: &[u8]) -> WireError {
    let mut code = String::new();
    let mut message = String::new();
    for field in body.split(|&b| b == 0) {
        match field.split_first() {
            Some((b'C', v)) => code = String::from_utf8_lossy(v).into_owned(),
            Some((b'M', v)) => message = String::from_utf8_lossy(v).into_owned(),
            _ => {}
        }
    }
    WireError::Server { code, message }
}

/// `X/Y` as PostgreSQL prints a log position.
pub fn lsn_text(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Parses `X/Y`.
pub fn parse_lsn(text: &str) -> Option<u64> {
    let (hi, lo) = text.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    (hi <= u64::from(u32::MAX) && lo <= u64::from(u32::MAX)).then_some(hi << 32 | lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        for lsn in [0u64, 0x16B_3748, 0x1_0000_0000, u64::MAX] {
            assert_eq!(parse_lsn(&lsn_text(lsn)), Some(lsn));
        }
        assert_eq!(parse_lsn("0/16B3748"), Some(0x16B_3748));
        assert_eq!(parse_lsn("16B3748"), None);
        assert_eq!(parse_lsn("1FFFFFFFF/0"), None);
    }
}
