//! Federation, the parts both ends share: which keys a child hub carries,
//! how a parent accepts a child's signed registrations and forwarded
//! batches, which registrations a hub sends upward and in what order, and
//! which feeds its share policy lets leave.
//!
//! Invariants: a forwarded batch is accepted only under the signature of a
//! department key that a registration chain rooted at the sending child
//! vouches for; all keys of a department come from one signer, so a hub in
//! the middle cannot add a key of its own for a department registered
//! further down; a registration of this hub's own key, or of a hub that is
//! already above it, is a loop and ends the connection.

use std::collections::{BTreeMap, BTreeSet};

use shuyuan_protocol::catalog::ShareType;
use shuyuan_protocol::federation::{Registered, Registration, RegistrationBody};
use shuyuan_protocol::{DepartmentCode, FeedId, NodeId, NodeKey, RejectReason};

use crate::apply::keys::{Enrollment, NodeKind};
use crate::catalog::CityEntry;
use crate::config::UpstreamConfig;
use crate::peers::Peers;

/// The departments whose agents are registered below the child hub `hub`.
pub fn carried(peers: &Peers, hub: &NodeId) -> BTreeSet<DepartmentCode> {
    peers
        .all()
        .into_iter()
        .filter(|(_, e)| {
            !e.is_hub() && matches!(e.kind, NodeKind::Below { via, .. } if via == *hub)
        })
        .map(|(_, e)| e.department)
        .collect()
}

/// Why a registration was not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reason: RejectReason,
    pub detail: String,
    /// The tree would contain a loop: the connection ends.
    pub is_loop: bool,
}

fn refuse(reason: RejectReason, detail: String) -> Refusal {
    Refusal {
        reason,
        detail,
        is_loop: false,
    }
}

/// Decides whether a registration that the child hub `child` sent may be
/// recorded here (`own` is this hub's key). Returns the enrollment to
/// store, or None when it is already recorded as it is.
pub fn check_registration(
    peers: &Peers,
    own: &NodeId,
    child: &NodeId,
    registration: Registration,
) -> Result<Option<(NodeId, Enrollment)>, Refusal> {
    let body: RegistrationBody = registration.open().map_err(|e| {
        refuse(
            RejectReason::BadSignature,
            format!("registration forwarded by child hub {child}: {e}"),
        )
    })?;
    let key = body.key;
    if key == *own || key == *child {
        return Err(Refusal {
            reason: RejectReason::ProtocolViolation,
            detail: format!(
                "child hub {child} forwards a registration of {} signed by {}: that hub would be below itself, a loop; refusing the link",
                if key == *own { "this hub" } else { "itself" },
                registration.signer
            ),
            is_loop: true,
        });
    }
    // The signer: the child itself, or a hub registered below it.
    let signer_ok = registration.signer == *child
        || peers.get(&registration.signer).is_some_and(|e| {
            e.is_hub() && matches!(e.kind, NodeKind::Below { via, .. } if via == *child)
        });
    if !signer_ok {
        return Err(refuse(
            RejectReason::UnknownSigner,
            format!(
                "registration of {key} forwarded by child hub {child} is signed by {}, which is neither that hub nor a hub registered below it",
                registration.signer
            ),
        ));
    }
    let (department, hub) = match &body.what {
        Registered::Agent { department } => (department.clone(), false),
        Registered::Hub { code } => (code.clone(), true),
    };
    match peers.get(&key) {
        Some(Enrollment {
            kind:
                NodeKind::Below {
                    via,
                    registration: r,
                    ..
                },
            ..
        }) if via == *child && r == registration => return Ok(None),
        // A newer registration of the same key (renamed): checked and
        // recorded again below.
        Some(Enrollment {
            kind: NodeKind::Below { via, .. },
            ..
        }) if via == *child => {}
        Some(Enrollment {
            kind: NodeKind::Below { via, .. },
            ..
        }) => {
            return Err(refuse(
                RejectReason::WrongDepartment,
                format!("key {key} is already registered below child hub {via}, not {child}"),
            ));
        }
        Some(e) => {
            return Err(Refusal {
                reason: if e.is_hub() {
                    RejectReason::ProtocolViolation
                } else {
                    RejectReason::WrongDepartment
                },
                detail: format!(
                    "key {key}, forwarded by child hub {child}, is enrolled directly at this hub{}",
                    if e.is_hub() {
                        " as a child hub: a loop; refusing the link"
                    } else {
                        ""
                    }
                ),
                is_loop: e.is_hub(),
            });
        }
        None => {}
    }
    if !hub {
        // One department, one source of keys.
        for (other, e) in peers.all() {
            if other == key || e.is_hub() || e.department != department {
                continue;
            }
            let clash = match &e.kind {
                NodeKind::Agent => Some("enrolled directly at this hub".to_string()),
                NodeKind::Below { via, .. } if *via != *child => {
                    Some(format!("served below child hub {via}"))
                }
                NodeKind::Below {
                    registration: r, ..
                } if r.signer != registration.signer => {
                    Some(format!("registered by hub {}", r.signer))
                }
                _ => None,
            };
            if let Some(clash) = clash {
                return Err(refuse(
                    RejectReason::WrongDepartment,
                    format!(
                        "department {department} is {clash}; a key for it registered by {} and forwarded by child hub {child} is refused",
                        registration.signer
                    ),
                ));
            }
        }
    }
    Ok(Some((
        key,
        Enrollment {
            department,
            name: body.name,
            kind: NodeKind::Below {
                via: *child,
                hub,
                registration,
            },
            enrolled_at: body.enrolled_at,
        },
    )))
}

/// The registrations this hub sends its parent, parents before children:
/// its own enrollments signed now with `key` (deterministic: the same
/// enrollment gives the same bytes), then the ones it received from below,
/// unchanged, each after the registration of the hub that signed it.
pub fn registrations(key: &NodeKey, peers: &Peers) -> Vec<Registration> {
    let mut out = Vec::new();
    let mut below: Vec<Registration> = Vec::new();
    for (id, e) in peers.all() {
        let what = match &e.kind {
            NodeKind::Agent => Registered::Agent {
                department: e.department.clone(),
            },
            NodeKind::Hub => Registered::Hub {
                code: e.department.clone(),
            },
            NodeKind::Below { registration, .. } => {
                below.push(registration.clone());
                continue;
            }
        };
        let body = RegistrationBody {
            key: id,
            what,
            name: e.name.clone(),
            enrolled_at: e.enrolled_at,
        };
        match Registration::sign(key, &body) {
            Ok(r) => out.push(r),
            Err(e) => tracing::error!(key = %id, error = %e, "cannot sign a registration"),
        }
    }
    // Emit a registration once its signer's own registration went out.
    let mut sent: BTreeSet<NodeId> = out
        .iter()
        .filter_map(|r| r.open().ok())
        .map(|b| b.key)
        .collect();
    sent.insert(key.id());
    while !below.is_empty() {
        let (ready, waiting): (Vec<_>, Vec<_>) =
            below.into_iter().partition(|r| sent.contains(&r.signer));
        if ready.is_empty() {
            // Signers never registered here: the parent would refuse them.
            for r in &waiting {
                tracing::warn!(signer = %r.signer, "a registration's signer is not known here; not forwarded");
            }
            break;
        }
        for r in ready {
            if let Ok(b) = r.open() {
                sent.insert(b.key);
            }
            out.push(r);
        }
        below = waiting;
    }
    out
}

/// Why a feed's data stays at this hub, or None when it is forwarded,
/// from its catalog entry's share type (共享类型) and the upstream config.
pub fn held(
    feed: &FeedId,
    shares: &BTreeMap<(String, String), Option<ShareType>>,
    config: &UpstreamConfig,
) -> Option<String> {
    if config.exclude.contains(feed) {
        return Some("excluded by upstream.exclude".into());
    }
    let declared = shares
        .get(&(feed.department.to_string(), feed.resource.to_string()))
        .copied()
        .flatten();
    match declared {
        Some(ShareType::NotShared) => Some("not shared (不予共享)".into()),
        Some(t) if config.share_types.contains(&t) => None,
        Some(t) => Some(format!(
            "share type {t} ({}) is not forwarded (upstream.share_types)",
            t.chinese()
        )),
        None if config.forward_undeclared => None,
        None => Some(
            "its catalog entry declares no share type (共享类型) yet; set it, or upstream.undeclared = \"forward\""
                .into(),
        ),
    }
}

/// Each catalog entry's share type, by department and resource code.
pub fn share_types(city: &[CityEntry]) -> BTreeMap<(String, String), Option<ShareType>> {
    city.iter()
        .map(|e| {
            (
                (e.department.clone(), e.entry.code.clone()),
                e.entry.share_type,
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use shuyuan_protocol::UnixMillis;

    fn upstream() -> UpstreamConfig {
        UpstreamConfig {
            address: "parent:7700".into(),
            key: NodeKey::from_seed([9; 32]).id(),
            share_types: vec![ShareType::Unconditional, ShareType::Conditional],
            forward_undeclared: false,
            exclude: vec!["D1:EXCLUDED".parse().unwrap()],
        }
    }

    #[test]
    fn share_policy() {
        let mut shares = BTreeMap::new();
        let mut put = |r: &str, t| {
            shares.insert(("D1".to_string(), r.to_string()), t);
        };
        put("OPEN", Some(ShareType::Unconditional));
        put("COND", Some(ShareType::Conditional));
        put("SECRET", Some(ShareType::NotShared));
        put("DRAFT", None);
        put("EXCLUDED", Some(ShareType::Unconditional));
        let mut c = upstream();
        let held = |f: &str, c: &UpstreamConfig| held(&f.parse().unwrap(), &shares, c);
        assert_eq!(held("D1:OPEN", &c), None);
        assert_eq!(held("D1:COND", &c), None);
        assert!(held("D1:SECRET", &c).unwrap().contains("不予共享"));
        assert!(held("D1:DRAFT", &c).unwrap().contains("共享类型"));
        assert!(held("D1:UNKNOWN", &c).unwrap().contains("共享类型"));
        assert!(held("D1:EXCLUDED", &c).unwrap().contains("exclude"));
        c.forward_undeclared = true;
        assert_eq!(held("D1:DRAFT", &c), None);
        assert!(held("D1:SECRET", &c).is_some(), "never, whatever else");
        c.share_types = vec![ShareType::Unconditional];
        assert!(held("D1:COND", &c).unwrap().contains("有条件共享"));
    }

    fn reg(signer: &NodeKey, key: &NodeKey, what: Registered) -> Registration {
        Registration::sign(
            signer,
            &RegistrationBody {
                key: key.id(),
                what,
                name: "n".into(),
                enrolled_at: UnixMillis(1),
            },
        )
        .unwrap()
    }

    fn agent(department: &str) -> Registered {
        Registered::Agent {
            department: department.parse().unwrap(),
        }
    }

    fn hub(code: &str) -> Registered {
        Registered::Hub {
            code: code.parse().unwrap(),
        }
    }

    #[tokio::test]
    async fn registration_chains_are_checked_from_the_child_down() {
        use crate::store::memory::MemoryEngine;
        use crate::verify::{Incoming, forwarded_batch as verify_forwarded};
        use crate::writer::Store;
        use shuyuan_protocol::{BatchBody, SignedBatch};
        use std::sync::Arc;
        let (store, _writer) = Store::start(Arc::new(MemoryEngine::new())).unwrap();
        let peers = Peers::load(store.clone()).unwrap();
        let [top, city, district, agent1, agent2, rogue] =
            [1u8, 2, 3, 4, 5, 6].map(|s| NodeKey::from_seed([s; 32]));
        peers
            .enroll(
                city.id(),
                Enrollment {
                    department: "CITY".parse().unwrap(),
                    name: "市".into(),
                    kind: NodeKind::Hub,
                    enrolled_at: UnixMillis(1),
                },
            )
            .await
            .unwrap();
        let check = |r: Registration| check_registration(&peers, &top.id(), &city.id(), r);
        // An agent signed by a hub nobody registered yet is refused.
        let a1 = reg(&district, &agent1, agent("D1"));
        assert_eq!(
            check(a1.clone()).unwrap_err().reason,
            RejectReason::UnknownSigner
        );
        // The district, registered by the city, then its agent.
        for r in [reg(&city, &district, hub("DISTRICT")), a1.clone()] {
            let (k, e) = check(r).unwrap().unwrap();
            peers.enroll(k, e).await.unwrap();
        }
        assert_eq!(check(a1.clone()).unwrap(), None, "already recorded");
        assert_eq!(
            carried(&peers, &city.id()).into_iter().collect::<Vec<_>>(),
            vec!["D1".parse::<DepartmentCode>().unwrap()]
        );
        // Altered on the way: the signature fails.
        let mut altered = a1.clone();
        let last = altered.body.len() - 1;
        altered.body[last] ^= 1;
        assert_eq!(
            check(altered).unwrap_err().reason,
            RejectReason::BadSignature
        );
        // The middle hub adds a key of its own for the district's department.
        let err = check(reg(&city, &rogue, agent("D1"))).unwrap_err();
        assert_eq!(err.reason, RejectReason::WrongDepartment);
        assert!(err.detail.contains("registered by hub"), "{}", err.detail);
        // A second agent of the same department from the same signer is fine.
        assert!(
            check(reg(&district, &agent2, agent("D1")))
                .unwrap()
                .is_some()
        );
        // This hub, registered below its own child: a loop.
        let err = check(reg(&district, &top, hub("LOOP"))).unwrap_err();
        assert!(err.is_loop, "{}", err.detail);

        // Forwarded batches: the department's own signature, bytes unchanged.
        let body = BatchBody {
            feed: "D1:R1".parse().unwrap(),
            seq: 1,
            prev: shuyuan_protocol::BatchHash::GENESIS,
            created_at: UnixMillis(1),
            entries: vec![shuyuan_protocol::Entry::ZeroUpdate(
                shuyuan_protocol::ZeroUpdate {
                    since: UnixMillis(0),
                    until: UnixMillis(1),
                    source_position: "0".into(),
                },
            )],
        };
        let signed = SignedBatch::seal(&agent1, &body).unwrap();
        assert!(matches!(
            verify_forwarded(&peers, city.id(), signed.clone()),
            Incoming::Verified(_)
        ));
        let mut bad = signed.clone();
        bad.body[3] ^= 1;
        match verify_forwarded(&peers, city.id(), bad) {
            Incoming::Refused { reason, detail, .. } => {
                assert_eq!(reason, RejectReason::BadSignature);
                assert!(detail.contains("altered"), "{detail}");
            }
            other => panic!("{other:?}"),
        }
        // The same batch from another child, or re-signed by the middle hub.
        let other_child = NodeKey::from_seed([7; 32]).id();
        assert!(matches!(
            verify_forwarded(&peers, other_child, signed),
            Incoming::Refused {
                reason: RejectReason::UnknownSigner,
                ..
            }
        ));
        let resigned = SignedBatch::seal(&city, &body).unwrap();
        assert!(matches!(
            verify_forwarded(&peers, city.id(), resigned),
            Incoming::Refused {
                reason: RejectReason::UnknownSigner,
                ..
            }
        ));
        // What the city sends up: its own enrollment first, then the chain.
        let sent = registrations(&city, &peers);
        let order: Vec<NodeId> = sent.iter().map(|r| r.open().unwrap().key).collect();
        let pos = |k: &NodeKey| order.iter().position(|x| *x == k.id()).unwrap();
        assert!(pos(&city) < pos(&district) && pos(&district) < pos(&agent1));
        assert_eq!(sent[pos(&agent1)], a1, "forwarded unchanged");
        store.close().await;
    }
}
