//! The check a hub applies to a peer's catalog sync message
//! (`CatalogDoc::receive_checked`, called by the hub's catalog for each
//! `Catalog` message): every new change may write only what the sender
//! owns, or nothing of the message is applied.
//!
//! Two kinds of input: raw bytes received as a sync message, and a list of
//! edits that a peer's replica makes (anywhere in the document, under any
//! actor) and then syncs to the hub message by message. Beyond "no panic":
//! an accepted message left every part of the document the sender does not
//! own exactly as it was (every value and conflict, read independently of
//! the check), a refused one left the document and the sync state as they
//! were, and edits only of what the sender owns are always accepted.
#![no_main]

use std::collections::BTreeMap;
use std::sync::OnceLock;

use arbitrary::{Arbitrary, Unstructured};
use automerge::sync::{self, SyncDoc};
use automerge::transaction::Transactable;
use automerge::{ActorId, AutoCommit, ObjId, ObjType, ROOT, ReadDoc, ScalarValue, Value};
use libfuzzer_sys::fuzz_target;
use shuyuan_fuzz::{CatalogInput, CatalogSender, DEPARTMENT, hub_key, populated_hub};
use shuyuan_protocol::catalog::doc::{CatalogDoc, Sender};

fuzz_target!(
    init: {
        // libfuzzer-sys aborts on every panic, even one the product catches:
        // `receive_checked` contains automerge's panics on hostile changes
        // and refuses the message. With the default hook back, a panic that
        // escapes still aborts (libfuzzer-sys's own catch_unwind does it).
        drop(std::panic::take_hook());
    },
    |data: &[u8]| one_input(data)
);

fn one_input(data: &[u8]) {
    let Some(input) = CatalogInput::parse(data) else {
        return;
    };
    let mut hub = hub_doc(input.populated);
    let mut state = sync::State::new();
    if !input.edits {
        receive(&mut hub, &mut state, input.rest, input.sender);
        return;
    }
    let Ok(peer) = PeerEdits::arbitrary_take_rest(Unstructured::new(input.rest)) else {
        return;
    };
    let mut replica = AutoCommit::load(&hub.save()).expect("the hub's document loads");
    replica.set_actor(peer.actor.id());
    let forbidden = peer.apply(&mut replica, allowed(input.sender));
    let mut peer_state = sync::State::new();
    for _ in 0..12 {
        let to_hub = replica.sync().generate_sync_message(&mut peer_state);
        if let Some(m) = &to_hub {
            let accepted = receive(&mut hub, &mut state, &m.clone().encode(), input.sender);
            assert!(accepted || forbidden, "edits of owned fields were refused");
            if !accepted {
                return;
            }
        }
        let to_peer = hub.generate_sync(&mut state);
        if let Some(m) = &to_peer {
            let m = sync::Message::decode(m).expect("the hub's own message decodes");
            replica
                .sync()
                .receive_sync_message(&mut peer_state, m)
                .expect("the peer takes the hub's changes");
        }
        if to_hub.is_none() && to_peer.is_none() {
            assert_eq!(hub.heads(), replica.get_heads(), "sync ended apart");
            return;
        }
    }
}

/// The top-level maps each sender owns.
fn allowed(sender: CatalogSender) -> &'static [&'static str] {
    match sender {
        CatalogSender::Department => &["entries"],
        CatalogSender::Platform => &["reviews"],
        CatalogSender::Federation => &["entries", "reviews"],
    }
}

fn hub_doc(populated: bool) -> CatalogDoc {
    static POPULATED: OnceLock<Vec<u8>> = OnceLock::new();
    let hub = hub_key().id();
    if populated {
        let saved = POPULATED.get_or_init(|| populated_hub().save());
        CatalogDoc::load(saved, &hub).expect("the saved document loads")
    } else {
        let department = DEPARTMENT.parse().expect("a valid department code");
        CatalogDoc::new(&department, &hub).expect("a new document")
    }
}

/// The hub receives one message; checks what it may have changed. Returns
/// whether it was accepted.
fn receive(
    hub: &mut CatalogDoc,
    state: &mut sync::State,
    message: &[u8],
    from: CatalogSender,
) -> bool {
    let sender = match from {
        CatalogSender::Department => Sender::Department,
        CatalogSender::Platform => Sender::Platform,
        CatalogSender::Federation => Sender::Federation,
    };
    let before = snapshot(hub);
    let heads = hub.heads();
    let state_before = state.encode();
    match hub.receive_checked(state, message, sender) {
        Ok(()) => {
            let mut after = snapshot(hub);
            let mut before = before;
            for owned in allowed(from) {
                before.remove(*owned);
                after.remove(*owned);
            }
            assert_eq!(
                before, after,
                "an accepted message wrote what {from:?} does not own"
            );
            true
        }
        Err(_) => {
            assert_eq!(hub.heads(), heads, "a refused message changed the document");
            assert_eq!(
                state.encode(),
                state_before,
                "a refused message changed the sync state"
            );
            assert_eq!(snapshot(hub), before);
            false
        }
    }
}

/// Every top-level key of the document with everything under it, every
/// conflicting value and each object's id, read from the saved bytes.
fn snapshot(doc: &mut CatalogDoc) -> BTreeMap<String, String> {
    let doc = AutoCommit::load(&doc.save()).expect("a saved document loads");
    doc.keys(ROOT)
        .map(|k| {
            let dump = dump_prop(&doc, &ROOT, automerge::Prop::Map(k.clone()));
            (k, dump)
        })
        .collect()
}

fn dump_prop(doc: &AutoCommit, obj: &ObjId, prop: automerge::Prop) -> String {
    let values = doc.get_all(obj, prop).expect("a listed key reads");
    let mut out = String::from("[");
    for (value, id) in values {
        match value {
            Value::Scalar(s) => out.push_str(&format!("{s:?}@{id}")),
            Value::Object(t) => out.push_str(&format!("{t:?}@{id}{{{}}}", dump_obj(doc, &id))),
        }
        out.push(',');
    }
    out.push(']');
    out
}

fn dump_obj(doc: &AutoCommit, obj: &ObjId) -> String {
    match doc.object_type(obj) {
        Ok(ObjType::Map | ObjType::Table) => doc
            .keys(obj)
            .map(|k| {
                format!(
                    "{k:?}:{}",
                    dump_prop(doc, obj, automerge::Prop::Map(k.clone()))
                )
            })
            .collect::<Vec<_>>()
            .join(","),
        Ok(ObjType::Text) => format!("{:?}", doc.text(obj).unwrap_or_default()),
        Ok(ObjType::List) => (0..doc.length(obj))
            .map(|i| dump_prop(doc, obj, automerge::Prop::Seq(i)))
            .collect::<Vec<_>>()
            .join(","),
        Err(e) => format!("unreadable: {e}"),
    }
}

/// Which actor the peer writes as.
#[derive(Arbitrary, Debug)]
enum Actor {
    Department,
    Hub,
    /// The actor of the department's genesis change.
    Genesis,
    Other([u8; 4]),
}

impl Actor {
    fn id(&self) -> ActorId {
        match self {
            Actor::Department => {
                shuyuan_protocol::catalog::doc::actor(&shuyuan_fuzz::test_key().id())
            }
            Actor::Hub => shuyuan_protocol::catalog::doc::actor(&hub_key().id()),
            Actor::Genesis => {
                ActorId::from(format!("shuyuan/catalog/genesis/{DEPARTMENT}").as_bytes())
            }
            Actor::Other(b) => ActorId::from(b.as_slice()),
        }
    }
}

/// Where an edit lands.
#[derive(Arbitrary, Debug, Clone, Copy)]
enum Place {
    Root,
    Entries,
    Reviews,
    /// An object the peer made earlier in its edits.
    Made(u8),
}

#[derive(Arbitrary, Debug)]
enum Name {
    Field(u8, u8),
    Text(String),
}

impl Name {
    fn key(&self) -> String {
        const CODES: [&str; 3] = ["101001/00001", "101001/00002", ""];
        const FIELDS: [&str; 5] = [
            "name",
            "summary",
            "status",
            "reviewer",
            "item\u{1f}id\u{1f}data_type",
        ];
        match self {
            Name::Field(c, f) => format!(
                "{}\u{1f}{}",
                CODES[usize::from(*c) % CODES.len()],
                FIELDS[usize::from(*f) % FIELDS.len()]
            ),
            Name::Text(s) => s.clone(),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Scalar {
    Str(String),
    Int(i64),
    Bool(bool),
    Null,
    /// Small, like the increments: the peer's own replica panics when its
    /// counter overflows (a hostile peer would not use one), and overflows
    /// at the hub are covered by raw messages.
    Counter(i32),
}

impl Scalar {
    fn value(&self) -> ScalarValue {
        match self {
            Scalar::Str(s) => ScalarValue::Str(s.as_str().into()),
            Scalar::Int(i) => ScalarValue::Int(*i),
            Scalar::Bool(b) => ScalarValue::Boolean(*b),
            Scalar::Null => ScalarValue::Null,
            Scalar::Counter(c) => ScalarValue::counter(i64::from(*c)),
        }
    }
}

#[derive(Arbitrary, Debug)]
enum Edit {
    Put(Place, Name, Scalar),
    Make(Place, Name, u8),
    Delete(Place, Name),
    Increment(Place, Name, i8),
    Insert(Place, u8, Scalar),
    Splice(Place, u8, i8, String),
    Commit,
}

#[derive(Arbitrary, Debug)]
struct PeerEdits {
    actor: Actor,
    edits: Vec<Edit>,
}

impl PeerEdits {
    /// Makes the edits on `doc`; returns whether any edit that took effect
    /// landed outside the `allowed` top-level maps.
    fn apply(&self, doc: &mut AutoCommit, allowed: &[&str]) -> bool {
        let mut made: Vec<(ObjId, Option<String>)> = Vec::new();
        let mut forbidden = false;
        for edit in &self.edits {
            let place = match edit {
                Edit::Commit => {
                    doc.commit();
                    continue;
                }
                Edit::Put(p, ..)
                | Edit::Make(p, ..)
                | Edit::Delete(p, ..)
                | Edit::Increment(p, ..)
                | Edit::Insert(p, ..)
                | Edit::Splice(p, ..) => *p,
            };
            let Some((obj, top)) = resolve(doc, &made, place) else {
                continue;
            };
            let done = match edit {
                Edit::Put(_, name, v) => doc.put(&obj, name.key(), v.value()).is_ok(),
                Edit::Make(_, name, kind) => {
                    let kind = [ObjType::Map, ObjType::List, ObjType::Text][usize::from(*kind) % 3];
                    let key = name.key();
                    let list = matches!(doc.object_type(&obj), Ok(ObjType::List));
                    let created = if list {
                        doc.insert_object(&obj, 0, kind)
                    } else {
                        doc.put_object(&obj, key.as_str(), kind)
                    };
                    if let Ok(id) = created {
                        made.push((id, top.clone().or(Some(key))));
                        true
                    } else {
                        false
                    }
                }
                Edit::Delete(_, name) => doc.delete(&obj, name.key()).is_ok(),
                Edit::Increment(_, name, by) => {
                    doc.increment(&obj, name.key(), i64::from(*by)).is_ok()
                }
                Edit::Insert(_, at, v) => {
                    let at = usize::from(*at).min(doc.length(&obj));
                    doc.insert(&obj, at, v.value()).is_ok()
                }
                Edit::Splice(_, at, del, text) => {
                    let at = usize::from(*at).min(doc.length(&obj));
                    doc.splice_text(&obj, at, isize::from(*del), text).is_ok()
                }
                Edit::Commit => false,
            };
            let owned = top.as_deref().is_some_and(|t| allowed.contains(&t));
            forbidden |= done && !owned;
        }
        doc.commit();
        forbidden
    }
}

/// The object a place names and the top-level key it lies under (`None`
/// for the root itself).
fn resolve(
    doc: &AutoCommit,
    made: &[(ObjId, Option<String>)],
    place: Place,
) -> Option<(ObjId, Option<String>)> {
    let top = |key: &str| match doc.get(ROOT, key) {
        Ok(Some((Value::Object(_), id))) => Some((id, Some(key.to_string()))),
        _ => None,
    };
    match place {
        Place::Root => Some((ROOT, None)),
        Place::Entries => top("entries"),
        Place::Reviews => top("reviews"),
        Place::Made(i) if !made.is_empty() => Some(made[usize::from(i) % made.len()].clone()),
        Place::Made(_) => None,
    }
}
