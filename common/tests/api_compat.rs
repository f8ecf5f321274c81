//! The `baton.v1` protos against the descriptor set checked in at
//! `proto/baton/v1.binpb`: a change that would break a client or agent built against
//! the baseline (a field, enum value, message, service or method removed, renumbered,
//! renamed or given another type) fails here. Additions pass.
//!
//! After an additive change, refresh the baseline with
//! `BATON_UPDATE_API_BASELINE=1 cargo test -p baton-common --test api_compat`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use prost::Message;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorSet, ServiceDescriptorProto};

fn baseline_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../proto/baton/v1.binpb")
}

/// The baton.v1 part of a descriptor set, without source info (comments may change).
fn ours(bytes: &[u8]) -> FileDescriptorSet {
    let mut set = FileDescriptorSet::decode(bytes).expect("a descriptor set");
    set.file.retain(|f| f.package() == "baton.v1");
    for f in &mut set.file {
        f.source_code_info = None;
    }
    set.file.sort_by(|a, b| a.name().cmp(b.name()));
    set
}

/// Messages (nested ones as `Outer.Inner`), enums and services by full name.
#[derive(Default)]
struct Index<'a> {
    messages: BTreeMap<String, &'a DescriptorProto>,
    enums: BTreeMap<String, &'a EnumDescriptorProto>,
    services: BTreeMap<String, &'a ServiceDescriptorProto>,
}

fn index(set: &FileDescriptorSet) -> Index<'_> {
    fn walk<'a>(ix: &mut Index<'a>, prefix: &str, m: &'a DescriptorProto) {
        let name = format!("{prefix}.{}", m.name());
        for n in &m.nested_type {
            walk(ix, &name, n);
        }
        for e in &m.enum_type {
            ix.enums.insert(format!("{name}.{}", e.name()), e);
        }
        ix.messages.insert(name, m);
    }
    let mut ix = Index::default();
    for f in &set.file {
        let prefix = format!(".{}", f.package());
        for m in &f.message_type {
            walk(&mut ix, &prefix, m);
        }
        for e in &f.enum_type {
            ix.enums.insert(format!("{prefix}.{}", e.name()), e);
        }
        for s in &f.service {
            ix.services.insert(format!("{prefix}.{}", s.name()), s);
        }
    }
    ix
}

/// What in `new` breaks what `old` promised.
fn breaks(old: &FileDescriptorSet, new: &FileDescriptorSet) -> Vec<String> {
    let (old, new) = (index(old), index(new));
    let mut out = Vec::new();
    for (name, m) in &old.messages {
        let Some(n) = new.messages.get(name) else {
            out.push(format!("message {name} removed"));
            continue;
        };
        for f in &m.field {
            match n.field.iter().find(|x| x.number() == f.number()) {
                None => out.push(format!("{name}: field {} ({}) removed", f.name(), f.number())),
                Some(x) if x.name() != f.name() => out.push(format!(
                    "{name}: field {} renamed {} (JSON clients use names)",
                    f.number(),
                    x.name()
                )),
                Some(x) if x.r#type() != f.r#type() || x.type_name() != f.type_name() => out.push(format!(
                    "{name}.{}: type {:?} {} became {:?} {}",
                    f.name(),
                    f.r#type(),
                    f.type_name(),
                    x.r#type(),
                    x.type_name()
                )),
                Some(x) if x.label() != f.label() || x.oneof_index.is_some() != f.oneof_index.is_some() => {
                    out.push(format!("{name}.{}: cardinality or oneof changed", f.name()))
                }
                Some(_) => {}
            }
        }
    }
    for (name, e) in &old.enums {
        let Some(n) = new.enums.get(name) else {
            out.push(format!("enum {name} removed"));
            continue;
        };
        for v in &e.value {
            if !n.value.iter().any(|x| x.number() == v.number() && x.name() == v.name()) {
                out.push(format!("enum {name}: value {} = {} removed or renumbered", v.name(), v.number()));
            }
        }
    }
    for (name, s) in &old.services {
        let Some(n) = new.services.get(name) else {
            out.push(format!("service {name} removed"));
            continue;
        };
        for m in &s.method {
            match n.method.iter().find(|x| x.name() == m.name()) {
                None => out.push(format!("{name}: rpc {} removed", m.name())),
                Some(x)
                    if x.input_type() != m.input_type()
                        || x.output_type() != m.output_type()
                        || x.client_streaming() != m.client_streaming()
                        || x.server_streaming() != m.server_streaming() =>
                {
                    out.push(format!("{name}: rpc {} changed its request, response or streaming", m.name()))
                }
                Some(_) => {}
            }
        }
    }
    out
}

#[test]
fn the_api_keeps_what_the_baseline_promised() {
    let current = ours(baton_common::pb::FILE_DESCRIPTOR_SET);
    if std::env::var_os("BATON_UPDATE_API_BASELINE").is_some() {
        std::fs::write(baseline_path(), current.encode_to_vec()).expect("write the baseline");
        return;
    }
    let bytes = std::fs::read(baseline_path()).expect("proto/baton/v1.binpb (see this file's doc)");
    let baseline = ours(&bytes);
    let broken = breaks(&baseline, &current);
    assert!(broken.is_empty(), "breaking changes to baton.v1:\n{}", broken.join("\n"));
}

#[test]
fn the_check_catches_removed_renumbered_and_retyped_fields() {
    let base = ours(baton_common::pb::FILE_DESCRIPTOR_SET);
    let edit = |f: &dyn Fn(&mut FileDescriptorSet)| {
        let mut s = base.clone();
        f(&mut s);
        breaks(&base, &s)
    };
    fn run(s: &mut FileDescriptorSet) -> &mut DescriptorProto {
        s.file.iter_mut().flat_map(|f| f.message_type.iter_mut()).find(|m| m.name() == "Run").expect("Run")
    }
    assert!(edit(&|_| {}).is_empty(), "no change breaks nothing");
    let removed = edit(&|s| run(s).field.retain(|f| f.name() != "reason"));
    assert!(removed.iter().any(|b| b.contains("field reason (4) removed")), "{removed:?}");
    let renumbered = edit(&|s| {
        if let Some(f) = run(s).field.iter_mut().find(|f| f.name() == "reason") {
            f.number = Some(99);
        }
    });
    assert!(renumbered.iter().any(|b| b.contains("field reason (4) removed")), "{renumbered:?}");
    let retyped = edit(&|s| {
        if let Some(f) = run(s).field.iter_mut().find(|f| f.name() == "last_seq") {
            f.r#type = Some(prost_types::field_descriptor_proto::Type::String as i32);
        }
    });
    assert!(retyped.iter().any(|b| b.contains("Run.last_seq: type")), "{retyped:?}");
    let added = edit(&|s| {
        let mut f = run(s).field[0].clone();
        f.name = Some("new_field".into());
        f.number = Some(100);
        run(s).field.push(f);
    });
    assert!(added.is_empty(), "adding a field is not a break: {added:?}");
}
