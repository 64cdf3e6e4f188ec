//! Three replicas of a department's catalog apply random interleavings of
//! edits and partial syncs in random order: the department's agent, its hub,
//! and a second platform replica that syncs only with the hub (as a parent
//! hub does). Once every link has synced to quiescence they hold the same
//! document, and no edit that nobody overwrote is lost. Every message from
//! or to the department goes through the ownership check.

use std::collections::BTreeMap;

use automerge::sync::State;
use proptest::prelude::*;
use shuyuan_protocol::catalog::doc::{CatalogDoc, Sender};
use shuyuan_protocol::catalog::{CatalogEntry, Review, ReviewStatus};
use shuyuan_protocol::{DepartmentCode, NodeKey, UnixMillis};

const CODES: [&str; 2] = ["101001/00001", "101001/00002"];
const FIELDS: [&str; 4] = ["name", "summary", "share_conditions", "legal_basis"];
/// The department talks to its hub (1); the hub to the other platform
/// replica (2).
const LINKS: [(usize, usize); 4] = [(0, 1), (1, 0), (1, 2), (2, 1)];

#[derive(Debug, Clone)]
enum Step {
    /// The department edits one field of one entry.
    Edit {
        code: usize,
        field: usize,
        value: String,
    },
    /// A platform replica reviews an entry.
    Review {
        replica: usize,
        code: usize,
        approve: bool,
        remarks: String,
    },
    /// One message from `from` to `to` (0 = department, 1 and 2 = platform).
    Sync { from: usize, to: usize },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..2usize, 0..4usize, "[a-z一-龥]{0,6}").prop_map(|(code, field, value)| Step::Edit {
            code,
            field,
            value
        }),
        (1..3usize, 0..2usize, any::<bool>(), "[a-z]{0,4}").prop_map(
            |(replica, code, approve, remarks)| Step::Review {
                replica,
                code,
                approve,
                remarks
            }
        ),
        prop::sample::select(&LINKS[..]).prop_map(|(from, to)| Step::Sync { from, to }),
    ]
}

fn sender(from: usize, to: usize) -> Option<Sender> {
    match (from, to) {
        (0, _) => Some(Sender::Department),
        (_, 0) => Some(Sender::Platform),
        _ => None, // platform replicas trust each other
    }
}

struct World {
    docs: Vec<CatalogDoc>,
    states: BTreeMap<(usize, usize), State>,
}

impl World {
    fn deliver(&mut self, from: usize, to: usize) -> bool {
        let state = self.states.entry((from, to)).or_default();
        let Some(msg) = self.docs[from].generate_sync(state) else {
            return false;
        };
        let state = self.states.entry((to, from)).or_default();
        let doc = &mut self.docs[to];
        match sender(from, to) {
            Some(s) => doc
                .receive_checked(state, &msg, s)
                .expect("honest replicas never violate ownership"),
            None => doc.receive_trusted(state, &msg).expect("receive"),
        }
        true
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn replicas_converge_and_lose_no_edit(steps in proptest::collection::vec(step(), 1..60)) {
        let dept: DepartmentCode = "GA-330902".parse().unwrap();
        let keys: Vec<NodeKey> = (0..3u8).map(|i| NodeKey::from_seed([i + 1; 32])).collect();
        let mut world = World {
            docs: keys.iter().map(|k| CatalogDoc::new(&dept, &k.id()).unwrap()).collect(),
            states: BTreeMap::new(),
        };
        // The department's last write of each field, and the last review of
        // each entry by each platform replica.
        let mut written: BTreeMap<(usize, usize), String> = BTreeMap::new();
        let mut reviewed: BTreeMap<(usize, usize), Review> = BTreeMap::new();
        let mut clock = 0;
        for s in &steps {
            clock += 1;
            match s {
                Step::Edit { code, field, value } => {
                    let doc = &mut world.docs[0];
                    let mut e = doc.entry(CODES[*code]).unwrap_or_else(|| CatalogEntry { code: CODES[*code].into(), ..Default::default() });
                    shuyuan_protocol::catalog::form::set_field(&mut e, FIELDS[*field], value).unwrap();
                    doc.put_entry(&e).unwrap();
                    written.insert((*code, *field), value.trim().to_string());
                }
                Step::Review { replica, code, approve, remarks } => {
                    let r = Review {
                        status: if *approve { ReviewStatus::Approved } else { ReviewStatus::Returned },
                        reviewer: format!("reviewer-{replica}"),
                        remarks: remarks.clone(),
                        reviewed_at: UnixMillis(clock),
                    };
                    world.docs[*replica].put_review(CODES[*code], &r).unwrap();
                    reviewed.insert((*replica, *code), r);
                }
                Step::Sync { from, to } => {
                    world.deliver(*from, *to);
                }
            }
        }
        // Sync every pair until nobody has anything to say.
        let mut rounds = 0;
        loop {
            let mut any = false;
            for (a, b) in LINKS {
                any |= world.deliver(a, b);
            }
            rounds += 1;
            prop_assert!(rounds < 100, "sync does not settle");
            if !any {
                break;
            }
        }
        let heads: Vec<_> = world.docs.iter_mut().map(|d| { let mut h = d.heads(); h.sort(); h }).collect();
        prop_assert_eq!(&heads[0], &heads[1]);
        prop_assert_eq!(&heads[1], &heads[2]);
        let entries = world.docs[0].entries();
        let reviews = world.docs[0].reviews();
        for d in &world.docs[1..] {
            prop_assert_eq!(&d.entries(), &entries);
            prop_assert_eq!(&d.reviews(), &reviews);
        }
        // Only the department writes entries: its last write of each field wins.
        for ((code, field), value) in &written {
            let e = &entries[CODES[*code]];
            let got = match FIELDS[*field] {
                "name" => &e.name,
                "summary" => &e.summary,
                "share_conditions" => &e.share_conditions,
                _ => &e.legal_basis,
            };
            prop_assert_eq!(got, value);
        }
        // A review written by only one platform replica survives whole;
        // concurrent reviews of one entry settle on one of the written ones.
        for (code, code_text) in CODES.iter().enumerate() {
            let mine: Vec<&Review> = (1..3).filter_map(|r| reviewed.get(&(r, code))).collect();
            match (mine.as_slice(), reviews.get(*code_text)) {
                ([], got) => prop_assert!(got.is_none()),
                ([only], got) => prop_assert_eq!(got, Some(*only)),
                (_, got) => {
                    let got = got.expect("a review");
                    prop_assert!(mine.iter().any(|r| r.status == got.status));
                    prop_assert!(mine.iter().any(|r| r.reviewer == got.reviewer));
                }
            }
        }
    }
}
