//! A UDP relay between one agent and its hub that misbehaves on request:
//! partitions, loss, reordering, duplication, NAT rebinding and a hub that
//! moved. The agent's `hub.address` points at [`FaultProxy::addr`]; the
//! proxy forwards to the hub from its own hub-facing socket, so the hub sees
//! the proxy as the agent's address.
//!
//! Every random decision comes from one seeded [`Rng`], so a run's faults
//! are reproducible given the same traffic, and every fault is counted so a
//! test can prove the fault really happened rather than assume it.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::data::Rng;

/// How long a socket read waits before the relay looks at its held-back
/// datagrams and its stop flag again.
const POLL: Duration = Duration::from_millis(5);
/// The longest a held-back datagram waits for a later one to overtake it.
pub const HOLD_MAX: Duration = Duration::from_millis(40);
/// Held-back datagrams per direction; more are forwarded in order.
const HOLD_SLOTS: usize = 8;
/// The largest datagram relayed (QUIC keeps well under it on loopback).
const DATAGRAM_MAX: usize = 65_535;

/// What the relay does to each datagram, in both directions.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Faults {
    /// Drop everything.
    pub partition: bool,
    /// Probability of dropping a datagram.
    pub loss: f64,
    /// Probability of holding a datagram back until a later one passed it
    /// (or [`HOLD_MAX`] elapsed).
    pub reorder: f64,
    /// Probability of sending a datagram twice.
    pub duplicate: f64,
}

impl Faults {
    /// Everything passes, in order, once.
    pub const NONE: Faults = Faults {
        partition: false,
        loss: 0.0,
        reorder: 0.0,
        duplicate: 0.0,
    };

    /// Nothing passes.
    pub const PARTITION: Faults = Faults {
        partition: true,
        loss: 0.0,
        reorder: 0.0,
        duplicate: 0.0,
    };
}

/// What the relay did so far (both directions together).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyCounters {
    /// Datagrams sent on (a duplicate counts once more).
    pub forwarded: u64,
    /// Dropped because of a partition.
    pub partitioned: u64,
    /// Dropped at random.
    pub lost: u64,
    /// Sent twice.
    pub duplicated: u64,
    /// Held back and then sent after a later datagram.
    pub reordered: u64,
    /// Hub-facing sockets replaced.
    pub rebinds: u64,
    /// Hub addresses switched to.
    pub retargets: u64,
}

#[derive(Debug, Default)]
struct Counters {
    forwarded: AtomicU64,
    partitioned: AtomicU64,
    lost: AtomicU64,
    duplicated: AtomicU64,
    reordered: AtomicU64,
    rebinds: AtomicU64,
    retargets: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// Which way a datagram travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    ToHub = 0,
    ToAgent = 1,
}

#[derive(Debug)]
struct Held {
    since: Instant,
    copies: u64,
    bytes: Vec<u8>,
}

#[derive(Debug)]
struct State {
    faults: Faults,
    rng: Rng,
    hub: SocketAddr,
    hub_facing: Arc<UdpSocket>,
    /// Where the agent last sent from (it moves when the agent restarts).
    agent: Option<SocketAddr>,
    held: [Vec<Held>; 2],
    hold_max: Duration,
}

#[derive(Debug)]
struct Shared {
    agent_facing: UdpSocket,
    state: Mutex<State>,
    counters: Counters,
    stop: AtomicBool,
}

/// A running relay; stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

fn loopback_socket() -> Result<UdpSocket> {
    let s = UdpSocket::bind("127.0.0.1:0").context("cannot bind a loopback UDP socket")?;
    s.set_read_timeout(Some(POLL))?;
    Ok(s)
}

impl FaultProxy {
    /// Starts relaying to `hub`, passing everything, with faults drawn from
    /// `seed`.
    pub fn start(hub: SocketAddr, seed: u64) -> Result<FaultProxy> {
        let agent_facing = loopback_socket()?;
        let addr = agent_facing.local_addr()?;
        let shared = Arc::new(Shared {
            agent_facing,
            state: Mutex::new(State {
                faults: Faults::NONE,
                rng: Rng::new(seed),
                hub,
                hub_facing: Arc::new(loopback_socket()?),
                agent: None,
                held: [Vec::new(), Vec::new()],
                hold_max: HOLD_MAX,
            }),
            counters: Counters::default(),
            stop: AtomicBool::new(false),
        });
        let threads = [Direction::ToHub, Direction::ToAgent]
            .into_iter()
            .map(|dir| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("faultproxy-{dir:?}"))
                    .spawn(move || shared.relay(dir))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(FaultProxy {
            addr,
            shared,
            threads,
        })
    }

    /// The address the agent should use as its hub.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The address the hub sees the agent at.
    pub fn hub_facing_addr(&self) -> Result<SocketAddr> {
        Ok(self.shared.lock().hub_facing.local_addr()?)
    }

    pub fn set_faults(&self, faults: Faults) {
        self.shared.lock().faults = faults;
    }

    /// Replaces the hub-facing socket, as a NAT that forgot its mapping:
    /// the hub now sees the agent at a new address, and answers to the old
    /// one are lost. Returns the new address.
    pub fn rebind(&self) -> Result<SocketAddr> {
        let fresh = loopback_socket()?;
        let addr = fresh.local_addr()?;
        self.shared.lock().hub_facing = Arc::new(fresh);
        bump(&self.shared.counters.rebinds, 1);
        Ok(addr)
    }

    /// Forwards to `hub` from now on: the hub moved.
    pub fn retarget(&self, hub: SocketAddr) {
        self.shared.lock().hub = hub;
        bump(&self.shared.counters.retargets, 1);
    }

    pub fn counters(&self) -> ProxyCounters {
        let c = &self.shared.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ProxyCounters {
            forwarded: n(&c.forwarded),
            partitioned: n(&c.partitioned),
            lost: n(&c.lost),
            duplicated: n(&c.duplicated),
            reordered: n(&c.reordered),
            rebinds: n(&c.rebinds),
            retargets: n(&c.retargets),
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads one direction's socket until stopped, passing each datagram
    /// through the faults in force.
    fn relay(&self, dir: Direction) {
        let mut buf = vec![0u8; DATAGRAM_MAX];
        while !self.stop.load(Ordering::Relaxed) {
            let socket = match dir {
                Direction::ToHub => None,
                // Cloned each round so that a rebind takes effect at once.
                Direction::ToAgent => Some(self.lock().hub_facing.clone()),
            };
            let read = match &socket {
                None => self.agent_facing.recv_from(&mut buf),
                Some(s) => s.recv_from(&mut buf),
            };
            match read {
                Ok((len, from)) => self.pass(dir, from, &buf[..len]),
                // Timeouts, and ICMP "port unreachable" while the hub is
                // down: nothing to relay this round.
                Err(_) => self.release_overdue(dir),
            }
        }
    }

    fn pass(&self, dir: Direction, from: SocketAddr, bytes: &[u8]) {
        let mut st = self.lock();
        if dir == Direction::ToHub {
            st.agent = Some(from);
        }
        if st.faults.partition {
            bump(&self.counters.partitioned, 1);
            return;
        }
        let faults = st.faults;
        if chance(&mut st.rng, faults.loss) {
            bump(&self.counters.lost, 1);
            return;
        }
        let copies = if chance(&mut st.rng, faults.duplicate) {
            bump(&self.counters.duplicated, 1);
            2
        } else {
            1
        };
        let held = st.held[dir as usize].len();
        if held < HOLD_SLOTS && chance(&mut st.rng, faults.reorder) {
            st.held[dir as usize].push(Held {
                since: Instant::now(),
                copies,
                bytes: bytes.to_vec(),
            });
            return;
        }
        self.send(&st, dir, bytes, copies);
        // This datagram overtook everything held back: now send those.
        let overtaken = std::mem::take(&mut st.held[dir as usize]);
        bump(&self.counters.reordered, overtaken.len() as u64);
        for h in overtaken {
            self.send(&st, dir, &h.bytes, h.copies);
        }
    }

    /// Sends datagrams held back longer than [`HOLD_MAX`]: no later one
    /// came to overtake them, so they leave late but in order.
    fn release_overdue(&self, dir: Direction) {
        let mut st = self.lock();
        let hold_max = st.hold_max;
        let held = &mut st.held[dir as usize];
        if held.first().is_none_or(|h| h.since.elapsed() < hold_max) {
            return;
        }
        let due = std::mem::take(held);
        for h in due {
            self.send(&st, dir, &h.bytes, h.copies);
        }
    }

    fn send(&self, st: &State, dir: Direction, bytes: &[u8], copies: u64) {
        if st.faults.partition {
            bump(&self.counters.partitioned, copies);
            return;
        }
        for _ in 0..copies {
            // A failed send is a lost datagram, which QUIC recovers from.
            let sent = match (dir, st.agent) {
                (Direction::ToHub, _) => st.hub_facing.send_to(bytes, st.hub).is_ok(),
                (Direction::ToAgent, Some(agent)) => {
                    self.agent_facing.send_to(bytes, agent).is_ok()
                }
                (Direction::ToAgent, None) => false,
            };
            if sent {
                bump(&self.counters.forwarded, 1);
            }
        }
    }
}

/// True with probability `p`.
fn chance(rng: &mut Rng, p: f64) -> bool {
    if p <= 0.0 {
        return false;
    }
    let unit = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    unit < p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pair of sockets standing for the agent and the hub.
    fn ends() -> Result<(UdpSocket, UdpSocket)> {
        let agent = UdpSocket::bind("127.0.0.1:0")?;
        let hub = UdpSocket::bind("127.0.0.1:0")?;
        for s in [&agent, &hub] {
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
        }
        Ok((agent, hub))
    }

    fn recv(s: &UdpSocket) -> Result<(Vec<u8>, SocketAddr)> {
        let mut buf = [0u8; 64];
        let (n, from) = s.recv_from(&mut buf)?;
        Ok((buf[..n].to_vec(), from))
    }

    #[test]
    fn relays_both_ways_and_rebinds() -> Result<()> {
        let (agent, hub) = ends()?;
        let proxy = FaultProxy::start(hub.local_addr()?, 1)?;
        agent.send_to(b"hello", proxy.addr())?;
        let (bytes, seen) = recv(&hub)?;
        assert_eq!(bytes, b"hello");
        assert_eq!(seen, proxy.hub_facing_addr()?);
        hub.send_to(b"welcome", seen)?;
        assert_eq!(recv(&agent)?, (b"welcome".to_vec(), proxy.addr()));

        let moved = proxy.rebind()?;
        assert_ne!(moved, seen);
        agent.send_to(b"again", proxy.addr())?;
        assert_eq!(recv(&hub)?, (b"again".to_vec(), moved));
        // The relay counts a datagram once the send returned, which may be
        // after the hub already has it.
        let c = wait_counters(&proxy, |c| c.forwarded >= 3)?;
        assert_eq!(c.rebinds, 1);
        assert_eq!(c.forwarded, 3);
        Ok(())
    }

    #[test]
    fn partition_drops_and_duplication_doubles() -> Result<()> {
        let (agent, hub) = ends()?;
        let proxy = FaultProxy::start(hub.local_addr()?, 2)?;
        proxy.set_faults(Faults::PARTITION);
        agent.send_to(b"lost", proxy.addr())?;
        let c = wait_counters(&proxy, |c| c.partitioned == 1)?;
        assert_eq!(c.forwarded, 0);

        proxy.set_faults(Faults {
            duplicate: 1.0,
            ..Faults::NONE
        });
        agent.send_to(b"twice", proxy.addr())?;
        assert_eq!(recv(&hub)?.0, b"twice");
        assert_eq!(recv(&hub)?.0, b"twice");
        assert_eq!(proxy.counters().duplicated, 1);
        Ok(())
    }

    #[test]
    fn reordering_lets_a_later_datagram_overtake() -> Result<()> {
        let (agent, hub) = ends()?;
        let proxy = FaultProxy::start(hub.local_addr()?, 3)?;
        // Long enough that only the later datagram can release the first.
        proxy.shared.lock().hold_max = Duration::from_secs(60);
        proxy.set_faults(Faults {
            reorder: 1.0,
            ..Faults::NONE
        });
        agent.send_to(b"first", proxy.addr())?;
        wait_for_held(&proxy)?;
        proxy.set_faults(Faults::NONE);
        agent.send_to(b"second", proxy.addr())?;
        assert_eq!(recv(&hub)?.0, b"second");
        assert_eq!(recv(&hub)?.0, b"first");
        assert_eq!(proxy.counters().reordered, 1);
        Ok(())
    }

    fn wait_for_held(proxy: &FaultProxy) -> Result<()> {
        crate::wait_for("a datagram held back", Duration::from_secs(5), || {
            Ok((!proxy.shared.lock().held[0].is_empty()).then_some(()))
        })
    }

    fn wait_counters(
        proxy: &FaultProxy,
        f: impl Fn(&ProxyCounters) -> bool,
    ) -> Result<ProxyCounters> {
        crate::wait_for("the proxy counters", Duration::from_secs(5), || {
            let c = proxy.counters();
            Ok(f(&c).then_some(c))
        })
    }
}
