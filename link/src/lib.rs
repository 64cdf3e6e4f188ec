//! shuyuan's links over QUIC, the runtime half of the protocol: TLS 1.3
//! identities made from node keys with pinned peers, framed messages on
//! QUIC streams ([`quic`]), and the one client driver that the agent's
//! uplink and a hub's upstream link both run, with one error type for a
//! link session ([`client`]).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod client;
pub mod quic;
