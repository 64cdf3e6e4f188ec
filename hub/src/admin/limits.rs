//! Limits on failed logins, against password guessing.
//!
//! Invariant: an address (an IPv6 /64) whose logins failed
//! `per_address` times (default [`ADDRESS_FAILURES`]) within
//! [`ADDRESS_WINDOW`] has its password checks refused until the oldest of
//! those failures leaves the window; and once `global` logins failed
//! (default [`GLOBAL_FAILURES`]) within [`GLOBAL_WINDOW`] from
//! anywhere, every password check is refused until the window has room
//! again. Sessions and tokens already given keep working. Each limit is
//! announced once when it begins (for the audit log) and every refusal is
//! counted.

use std::collections::{BTreeMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Failed logins one address may make within [`ADDRESS_WINDOW`].
pub const ADDRESS_FAILURES: usize = 5;
pub const ADDRESS_WINDOW: Duration = Duration::from_secs(15 * 60);
/// Failed logins the hub accepts from all addresses within [`GLOBAL_WINDOW`].
pub const GLOBAL_FAILURES: usize = 30;
pub const GLOBAL_WINDOW: Duration = Duration::from_secs(60);
/// Addresses remembered at most; beyond it the global limit still holds.
const ADDRESSES_KEPT: usize = 10_000;

/// Which limit refused a login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Address,
    Global,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Address => "address",
            Scope::Global => "global",
        }
    }
}

/// A refused password check: which limit, and when to try again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub scope: Scope,
    pub retry_after: Duration,
}

#[derive(Debug, Default)]
struct Failures {
    by_address: BTreeMap<IpAddr, VecDeque<Instant>>,
    all: VecDeque<Instant>,
}

/// The failed-login limits.
#[derive(Debug)]
pub struct LoginLimits {
    /// Failures one address may make within [`ADDRESS_WINDOW`].
    pub per_address: usize,
    /// Failures all addresses may make within [`GLOBAL_WINDOW`].
    pub global: usize,
    failures: Mutex<Failures>,
    /// Checks refused by each limit since the hub started.
    pub refused_address: AtomicU64,
    pub refused_global: AtomicU64,
}

/// Addresses that share a limit: one IPv4 address, or one IPv6 /64 (what
/// one host usually gets).
fn bucket(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut s = v6.segments();
                s[4..].fill(0);
                IpAddr::V6(s.into())
            }
        },
    }
}

fn trim(q: &mut VecDeque<Instant>, window: Duration, now: Instant) {
    while q.front().is_some_and(|t| now.duration_since(*t) >= window) {
        q.pop_front();
    }
}

/// When a full window has room again.
fn full(q: &VecDeque<Instant>, limit: usize, window: Duration, now: Instant) -> Option<Duration> {
    (q.len() >= limit).then(|| {
        let oldest = q[q.len() - limit];
        (oldest + window).saturating_duration_since(now)
    })
}

impl Default for LoginLimits {
    fn default() -> Self {
        LoginLimits::new(ADDRESS_FAILURES, GLOBAL_FAILURES)
    }
}

impl LoginLimits {
    pub fn new(per_address: usize, global: usize) -> LoginLimits {
        LoginLimits {
            per_address: per_address.max(1),
            global: global.max(1),
            failures: Mutex::default(),
            refused_address: AtomicU64::new(0),
            refused_global: AtomicU64::new(0),
        }
    }

    /// Whether a password check from `ip` may run now.
    pub fn admit(&self, ip: IpAddr) -> Result<(), Limited> {
        self.admit_at(ip, Instant::now())
    }

    fn admit_at(&self, ip: IpAddr, now: Instant) -> Result<(), Limited> {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        trim(&mut f.all, GLOBAL_WINDOW, now);
        if let Some(retry_after) = full(&f.all, self.global, GLOBAL_WINDOW, now) {
            self.refused_global.fetch_add(1, Ordering::Relaxed);
            return Err(Limited {
                scope: Scope::Global,
                retry_after,
            });
        }
        if let Some(q) = f.by_address.get_mut(&bucket(ip)) {
            trim(q, ADDRESS_WINDOW, now);
            if let Some(retry_after) = full(q, self.per_address, ADDRESS_WINDOW, now) {
                self.refused_address.fetch_add(1, Ordering::Relaxed);
                return Err(Limited {
                    scope: Scope::Address,
                    retry_after,
                });
            }
        }
        Ok(())
    }

    /// A failed login from `ip`: the text to audit when it starts a limit.
    pub fn failed(&self, ip: IpAddr) -> Option<String> {
        self.failed_at(ip, Instant::now())
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) -> Option<String> {
        let mut f = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let f = &mut *f;
        if f.by_address.len() >= ADDRESSES_KEPT {
            f.by_address.retain(|_, q| {
                trim(q, ADDRESS_WINDOW, now);
                !q.is_empty()
            });
        }
        let mut said = Vec::new();
        let key = bucket(ip);
        if f.by_address.len() < ADDRESSES_KEPT || f.by_address.contains_key(&key) {
            let q = f.by_address.entry(key).or_default();
            trim(q, ADDRESS_WINDOW, now);
            q.push_back(now);
            if q.len() == self.per_address {
                said.push(format!(
                    "{} failed logins from {key} within {} min: its password checks are refused for up to {} min (per-address limit)",
                    self.per_address,
                    ADDRESS_WINDOW.as_secs() / 60,
                    ADDRESS_WINDOW.as_secs() / 60
                ));
            }
            while q.len() > self.per_address {
                q.pop_front();
            }
        }
        trim(&mut f.all, GLOBAL_WINDOW, now);
        f.all.push_back(now);
        if f.all.len() == self.global {
            said.push(format!(
                "{} failed logins within {} s from all addresses: every password check is refused for up to {} s (global limit); sessions already open keep working",
                self.global,
                GLOBAL_WINDOW.as_secs(),
                GLOBAL_WINDOW.as_secs()
            ));
        }
        while f.all.len() > self.global {
            f.all.pop_front();
        }
        (!said.is_empty()).then(|| said.join("; "))
    }

    /// A successful login from `ip` forgets that address's failures.
    pub fn succeeded(&self, ip: IpAddr) {
        self.failures
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .by_address
            .remove(&bucket(ip));
    }

    pub fn refused(&self, scope: Scope) -> u64 {
        match scope {
            Scope::Address => self.refused_address.load(Ordering::Relaxed),
            Scope::Global => self.refused_global.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_limited_after_its_failures_until_the_window_passes() {
        let l = LoginLimits::default();
        let a: IpAddr = "192.0.2.7".parse().unwrap();
        let b: IpAddr = "192.0.2.8".parse().unwrap();
        let t = Instant::now();
        for i in 0..ADDRESS_FAILURES {
            assert_eq!(l.admit_at(a, t), Ok(()));
            let said = l.failed_at(a, t + Duration::from_secs(i as u64));
            assert_eq!(said.is_some(), i + 1 == ADDRESS_FAILURES, "{said:?}");
        }
        let refused = l.admit_at(a, t + Duration::from_secs(60)).unwrap_err();
        assert_eq!(refused.scope, Scope::Address);
        assert_eq!(
            refused.retry_after,
            ADDRESS_WINDOW - Duration::from_secs(60)
        );
        assert_eq!(l.refused(Scope::Address), 1);
        // Another address is not affected.
        assert_eq!(l.admit_at(b, t), Ok(()));
        // Once the first failure leaves the window, one more try.
        assert_eq!(l.admit_at(a, t + ADDRESS_WINDOW), Ok(()));
        // A success forgets the address's failures.
        l.succeeded(a);
        assert_eq!(l.admit_at(a, t + Duration::from_secs(61)), Ok(()));
    }

    #[test]
    fn an_ipv6_slash_64_is_one_address() {
        let l = LoginLimits::default();
        let t = Instant::now();
        for i in 0..ADDRESS_FAILURES {
            let ip: IpAddr = format!("2001:db8::{i:x}").parse().unwrap();
            l.failed_at(ip, t);
        }
        let other: IpAddr = "2001:db8::ffff:1".parse().unwrap();
        assert_eq!(l.admit_at(other, t).unwrap_err().scope, Scope::Address);
        let elsewhere: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        assert_eq!(l.admit_at(elsewhere, t), Ok(()));
    }

    #[test]
    fn many_addresses_trip_the_global_limit() {
        let l = LoginLimits::default();
        let t = Instant::now();
        let mut said = Vec::new();
        for i in 0..GLOBAL_FAILURES {
            let ip = IpAddr::from([10, 0, (i / 256) as u8, (i % 256) as u8]);
            assert_eq!(l.admit_at(ip, t), Ok(()));
            said.extend(l.failed_at(ip, t));
        }
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(said[0].contains("global limit"), "{said:?}");
        let fresh = IpAddr::from([10, 9, 9, 9]);
        let refused = l.admit_at(fresh, t + Duration::from_secs(1)).unwrap_err();
        assert_eq!(refused.scope, Scope::Global);
        assert_eq!(refused.retry_after, GLOBAL_WINDOW - Duration::from_secs(1));
        assert_eq!(l.admit_at(fresh, t + GLOBAL_WINDOW), Ok(()));
    }
}
