//! The gRPC API as a documented contract: every service, RPC, message, field, enum and
//! enum value in `proto/baton/v1` has a comment, and `docs/api.md` is the reference
//! generated from those comments, with the role each RPC needs from the controller's
//! table of RPCs. After changing a proto, regenerate it with
//! `BATON_UPDATE_DOCS=1 cargo test -p baton-controller --test api_reference`.

use std::fmt::Write;

use prost::Message;
use prost_types::source_code_info::Location;
use prost_types::{DescriptorProto, EnumDescriptorProto, FileDescriptorProto, FileDescriptorSet};

// Field numbers in descriptor.proto, the steps of a source location's path.
const FILE_MESSAGE: i32 = 4;
const FILE_ENUM: i32 = 5;
const FILE_SERVICE: i32 = 6;
const MESSAGE_FIELD: i32 = 2;
const MESSAGE_NESTED: i32 = 3;
const MESSAGE_ENUM: i32 = 4;
const MESSAGE_ONEOF: i32 = 8;
const ENUM_VALUE: i32 = 2;
const SERVICE_METHOD: i32 = 2;

const PACKAGE: &str = "baton.v1";

fn descriptors() -> Vec<FileDescriptorProto> {
    let set = FileDescriptorSet::decode(baton_common::pb::FILE_DESCRIPTOR_SET).expect("descriptor set");
    let mut files: Vec<_> = set.file.into_iter().filter(|f| f.package() == PACKAGE).collect();
    files.sort_by(|a, b| a.name().cmp(b.name()));
    files
}

/// The comments of one file, by element path.
struct Comments<'a>(Vec<&'a Location>);

impl<'a> Comments<'a> {
    fn of(file: &'a FileDescriptorProto) -> Comments<'a> {
        Comments(file.source_code_info.as_ref().map(|s| s.location.iter().collect()).unwrap_or_default())
    }

    /// The element's leading comment (else its trailing one) as one paragraph per
    /// blank-line-separated block.
    fn get(&self, path: &[i32]) -> String {
        let Some(loc) = self.0.iter().find(|l| l.path == path) else { return String::new() };
        let text = loc.leading_comments.as_deref().or(loc.trailing_comments.as_deref()).unwrap_or("");
        text.split("\n\n")
            .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|p| !p.is_empty())
            .collect::<Vec<_>>()
            .join("\n\n")
    }

    /// A comment that fits a table cell.
    fn cell(&self, path: &[i32]) -> String {
        self.get(path).replace("\n\n", "<br>").replace('|', "\\|")
    }
}

fn short(type_name: &str) -> &str {
    type_name.strip_prefix(&format!(".{PACKAGE}.")).unwrap_or(type_name.trim_start_matches('.'))
}

fn link(type_name: &str) -> String {
    let name = short(type_name);
    if type_name.starts_with(&format!(".{PACKAGE}.")) {
        format!("[{name}](#{})", name.to_lowercase().replace('.', ""))
    } else {
        format!("`{name}`")
    }
}

/// A field's type as a reader writes it in a .proto: `repeated Step`, `map<string, string>`.
fn field_type(msg: &DescriptorProto, f: &prost_types::FieldDescriptorProto) -> String {
    use prost_types::field_descriptor_proto::{Label, Type};
    let base = |f: &prost_types::FieldDescriptorProto| match f.r#type() {
        Type::Message | Type::Enum => link(f.type_name()),
        t => format!("`{}`", t.as_str_name().trim_start_matches("TYPE_").to_lowercase()),
    };
    if f.r#type() == Type::Message
        && let Some(entry) = msg.nested_type.iter().find(|n| {
            n.options.as_ref().is_some_and(|o| o.map_entry())
                && f.type_name().ends_with(&format!(".{}", n.name()))
        })
    {
        return format!("map<{}, {}>", base(&entry.field[0]), base(&entry.field[1]));
    }
    match f.label() {
        Label::Repeated => format!("repeated {}", base(f)),
        _ if f.proto3_optional() => format!("optional {}", base(f)),
        _ => base(f),
    }
}

/// What a caller needs to make the RPC at `path`, from the controller's table.
fn need(path: &str) -> String {
    use baton_controller::auth::table::{Need, need_of};
    match need_of(path) {
        Some(Need::Public) => "nothing".into(),
        Some(Need::Authenticated) => "any credential".into(),
        Some(Need::Role(r)) => format!("role {r}"),
        Some(Need::JoinToken) => "a join token".into(),
        None => "(refused: not in the table)".into(),
    }
}

/// What the walk found: the reference, and the elements without a comment.
#[derive(Default)]
struct Walk {
    md: String,
    undocumented: Vec<String>,
}

impl Walk {
    fn doc(&mut self, c: &Comments, path: &[i32], what: String) -> String {
        let text = c.get(path);
        if text.is_empty() {
            self.undocumented.push(what);
        }
        text
    }

    fn file(&mut self, f: &FileDescriptorProto) {
        let c = Comments::of(f);
        let name = f.name().rsplit('/').next().unwrap_or(f.name());
        let _ = writeln!(self.md, "## {name}\n");
        // The file's comment is the one on its `package` line (field 2).
        let about = self.doc(&c, &[2], format!("file {name}"));
        let _ = writeln!(self.md, "{about}\n");
        for (i, s) in f.service.iter().enumerate() {
            let path = [FILE_SERVICE, i as i32];
            let _ = writeln!(self.md, "### {}\n", s.name());
            let about = self.doc(&c, &path, format!("service {}", s.name()));
            let _ = writeln!(
                self.md,
                "{about}\n\n| RPC | Request | Response | Caller needs | Description |\n|---|---|---|---|---|"
            );
            for (j, m) in s.method.iter().enumerate() {
                let mpath = [FILE_SERVICE, i as i32, SERVICE_METHOD, j as i32];
                let _ = self.doc(&c, &mpath, format!("rpc {}.{}", s.name(), m.name()));
                let stream = |yes: bool| if yes { "stream " } else { "" };
                let _ = writeln!(
                    self.md,
                    "| `{}` | {}{} | {}{} | {} | {} |",
                    m.name(),
                    stream(m.client_streaming()),
                    link(m.input_type()),
                    stream(m.server_streaming()),
                    link(m.output_type()),
                    need(&format!("/{PACKAGE}.{}/{}", s.name(), m.name())),
                    c.cell(&mpath)
                );
            }
            self.md.push('\n');
        }
        for (i, m) in f.message_type.iter().enumerate() {
            self.message(&c, m, vec![FILE_MESSAGE, i as i32], m.name().to_string());
        }
        for (i, e) in f.enum_type.iter().enumerate() {
            self.enumeration(&c, e, vec![FILE_ENUM, i as i32], e.name().to_string());
        }
    }

    fn message(&mut self, c: &Comments, m: &DescriptorProto, path: Vec<i32>, name: String) {
        if m.options.as_ref().is_some_and(|o| o.map_entry()) {
            return;
        }
        let _ = writeln!(self.md, "### {name}\n");
        let about = self.doc(c, &path, format!("message {name}"));
        let _ = writeln!(self.md, "{about}\n");
        if !m.field.is_empty() {
            let _ = writeln!(self.md, "| Field | Type | Description |\n|---|---|---|");
        }
        for (j, f) in m.field.iter().enumerate() {
            let fpath = [path.clone(), vec![MESSAGE_FIELD, j as i32]].concat();
            let _ = self.doc(c, &fpath, format!("field {name}.{}", f.name()));
            let mut cell = c.cell(&fpath);
            if let Some(o) = f.oneof_index
                && !f.proto3_optional()
            {
                let oneof = m.oneof_decl.get(o as usize).map(|d| d.name()).unwrap_or_default();
                cell = format!("One of `{oneof}`. {cell}");
            }
            let _ =
                writeln!(self.md, "| `{}` = {} | {} | {} |", f.name(), f.number(), field_type(m, f), cell);
        }
        if !m.field.is_empty() {
            self.md.push('\n');
        }
        for (j, o) in m.oneof_decl.iter().enumerate() {
            // Synthetic oneofs of `optional` fields carry no comment of their own.
            let synthetic = m.field.iter().any(|f| f.oneof_index == Some(j as i32) && f.proto3_optional());
            if !synthetic {
                let opath = [path.clone(), vec![MESSAGE_ONEOF, j as i32]].concat();
                let _ = self.doc(c, &opath, format!("oneof {name}.{}", o.name()));
            }
        }
        for (j, n) in m.nested_type.iter().enumerate() {
            let npath = [path.clone(), vec![MESSAGE_NESTED, j as i32]].concat();
            self.message(c, n, npath, format!("{name}.{}", n.name()));
        }
        for (j, e) in m.enum_type.iter().enumerate() {
            let epath = [path.clone(), vec![MESSAGE_ENUM, j as i32]].concat();
            self.enumeration(c, e, epath, format!("{name}.{}", e.name()));
        }
    }

    fn enumeration(&mut self, c: &Comments, e: &EnumDescriptorProto, path: Vec<i32>, name: String) {
        let _ = writeln!(self.md, "### {name}\n");
        let about = self.doc(c, &path, format!("enum {name}"));
        let _ = writeln!(self.md, "{about}\n\n| Value | Number | Description |\n|---|---|---|");
        for (j, v) in e.value.iter().enumerate() {
            let vpath = [path.clone(), vec![ENUM_VALUE, j as i32]].concat();
            // The zero value of an enum is by convention "not set".
            let cell = if v.number() == 0 && v.name().ends_with("_UNSPECIFIED") {
                let text = c.cell(&vpath);
                if text.is_empty() { "Not set.".to_string() } else { text }
            } else {
                let _ = self.doc(c, &vpath, format!("enum value {name}.{}", v.name()));
                c.cell(&vpath)
            };
            let _ = writeln!(self.md, "| `{}` | {} | {} |", v.name(), v.number(), cell);
        }
        self.md.push('\n');
    }
}

fn walk() -> Walk {
    let mut w = Walk::default();
    w.md.push_str(
        "# Baton API reference (`baton.v1`)\n\n\
         Generated from the comments in `proto/baton/v1/*.proto` by \
         `controller/tests/api_reference.rs`; do not edit by hand. Regenerate with \
         `BATON_UPDATE_DOCS=1 cargo test -p baton-controller --test api_reference`.\n\n\
         A caller proves who it is with a bearer token (`authorization: Bearer TOKEN`) or \
         a client certificate; a role includes the ones below it (reader < submitter < \
         operator < admin). A controller without authentication (loopback only) lets \
         every call through. JSON forms of these messages (the CLI's `-o json`) follow the \
         protobuf JSON mapping with the field names as written here.\n\n",
    );
    for f in descriptors() {
        w.file(&f);
    }
    w.md = w.md.trim_end().to_string() + "\n";
    w
}

#[test]
fn every_element_of_the_api_has_a_comment() {
    let w = walk();
    assert!(w.undocumented.is_empty(), "without a comment in proto/baton/v1: {:#?}", w.undocumented);
}

#[test]
fn the_api_reference_in_docs_is_generated_from_the_protos() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/api.md");
    let md = walk().md;
    if std::env::var_os("BATON_UPDATE_DOCS").is_some() {
        std::fs::write(path, &md).expect("write docs/api.md");
        return;
    }
    let committed = std::fs::read_to_string(path).unwrap_or_default();
    assert!(
        committed == md,
        "docs/api.md is not what the protos say; regenerate it with \
         BATON_UPDATE_DOCS=1 cargo test -p baton-controller --test api_reference"
    );
}

#[test]
fn the_reference_names_every_rpc_of_every_service() {
    let md = walk().md;
    for f in descriptors() {
        for s in &f.service {
            assert!(md.contains(&format!("### {}\n", s.name())), "{}", s.name());
            for m in &s.method {
                assert!(md.contains(&format!("| `{}` |", m.name())), "{}", m.name());
            }
        }
    }
}
