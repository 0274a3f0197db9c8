//! Events as JSON objects (`hvctl watch` prints one per line). Addresses
//! are hex strings, as people read them; numbers that are counts stay numbers.

use hv_control::{EventKind, access_bits};
use serde_json::{Value, json};

use crate::client::EventRecord;
use crate::{access_name, client::command_name};

fn hex(v: u64) -> Value {
    Value::String(format!("{v:#x}"))
}

/// `rwx`-style letters of attempted-access bits.
pub fn access_letters(bits: u8) -> String {
    [
        (access_bits::READ, 'r'),
        (access_bits::WRITE, 'w'),
        (access_bits::EXECUTE, 'x'),
    ]
    .iter()
    .filter(|(bit, _)| bits & bit != 0)
    .map(|&(_, c)| c)
    .collect()
}

/// One event as a JSON object.
pub fn event(record: &EventRecord) -> Value {
    let e = &record.event;
    let c = &e.context;
    let mut v = json!({
        "seq": record.seq,
        "event": command_name(e.id()),
        "vcpu": c.vcpu,
        "view": c.view,
        "rip": hex(c.rip),
        "cr3": hex(c.cr3),
    });
    let extra = match e.kind {
        EventKind::MemAccess {
            gpa,
            gla,
            access,
            entry,
        } => json!({
            "gpa": hex(gpa),
            "gla": gla.map(hex),
            "access": access_letters(access),
            "entry": access_name(entry),
        }),
        EventKind::Breakpoint { gpa, gla } => json!({ "gpa": hex(gpa), "gla": hex(gla) }),
        EventKind::Cr3Write { old, new } => json!({ "old": hex(old), "new": hex(new) }),
        EventKind::SingleStep => json!({}),
        EventKind::Ve { gpa, gla, access } => json!({
            "gpa": hex(gpa),
            "gla": gla.map(hex),
            "access": access_letters(access),
        }),
    };
    if let (Value::Object(map), Value::Object(more)) = (&mut v, extra) {
        map.extend(more);
    }
    v
}
