//! The folder takes exactly what the API server takes: each document below is read by the folder
//! loader and validated against the CRD's schema (the openAPIV3Schema of `agent/crd/machine.yaml`,
//! with format validation on, as the API server validates `format: ipv4`), and both must agree,
//! and agree with the verdict written beside it.
//!
//! Every document is otherwise servable (an address of the subnet, one machine per folder), so
//! only what the schema decides can reject it. The object name is not in the CRD's schema: the
//! API server checks every object's name itself (a lower-case RFC 1123 DNS name), and the test
//! adds that rule to the schema it validates with.
//!
//! Unknown fields: the API server prunes what a structural schema does not name, and refuses it
//! instead under strict field validation, which `kubectl apply` asks for by default
//! (`--validate=strict`: `strict decoding error: unknown field "spec.hostnme"`). The folder
//! refuses too (a misspelt key would otherwise be dropped without a word), so the test's API
//! server is the strict one: `additionalProperties: false` on every object of the schema (a
//! structural schema may not say so itself). Only a bare `kubectl create --validate=false`
//! differs: it would store the Machine without the unknown field.

use std::path::Path;

use super::folder::{load_dir, API_VERSION};
use super::AddressRules;

const CRD: &str = include_str!("../../crd/machine.yaml");

/// apimachinery's `IsDNS1123Subdomain`, the API server's rule for object names.
const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// OpenAPI's `nullable: true` as JSON Schema says it: `null` is one more allowed type (the API
/// server accepts `hostname: null`; a JSON Schema validator reading `type: string` would not).
fn allow_null(schema: &mut serde_json::Value) {
    match schema {
        serde_json::Value::Object(map) => {
            if map.get("nullable") == Some(&serde_json::Value::Bool(true)) {
                if let Some(serde_json::Value::String(kind)) = map.get("type").cloned() {
                    map.insert("type".into(), serde_json::json!([kind, "null"]));
                }
            }
            map.values_mut().for_each(allow_null);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(allow_null),
        _ => {}
    }
}

/// Strict field validation: no key but those a schema's `properties` name.
fn strict(schema: &mut serde_json::Value) {
    match schema {
        serde_json::Value::Object(map) => {
            if map.contains_key("properties") {
                map.insert("additionalProperties".into(), false.into());
            }
            map.values_mut().for_each(strict);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(strict),
        _ => {}
    }
}

/// The committed CRD's schema, as the API server applies it to a Machine being created with
/// strict field validation (kubectl's default).
fn api_server() -> jsonschema::Validator {
    let crd: serde_json::Value = serde_yaml::from_str(CRD).expect("the CRD is YAML");
    let mut schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
    allow_null(&mut schema);
    schema["properties"]["apiVersion"] = serde_json::json!({"type": "string"});
    schema["properties"]["kind"] = serde_json::json!({"type": "string"});
    strict(&mut schema);
    schema["properties"]["metadata"] = serde_json::json!({
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "maxLength": 253, "pattern": NAME_PATTERN}},
    });
    schema["required"] = serde_json::json!(["spec", "metadata"]);
    jsonschema::draft4::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("the schema compiles")
}

/// Whether the folder serves the one Machine of `document`.
fn folder_serves(document: &str) -> bool {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("machine.yaml"), document).expect("write");
    let rules = AddressRules {
        subnet: "10.77.0.0/24".parse().expect("cidr"),
        reserved: vec![],
    };
    let snapshot = load_dir(Path::new(dir.path()), &rules).expect("load");
    snapshot.served.len() == 1
}

/// A Machine document with `spec` lines (two-space indented) and the name `name`.
fn document(name: &str, spec: &str) -> String {
    format!("apiVersion: {API_VERSION}\nkind: Machine\nmetadata:\n  name: {name}\nspec:\n{spec}")
}

const MAC: &str = "  macAddress: \"52:54:00:12:34:56\"\n";
const IP: &str = "  ipAddress: 10.77.0.20\n";
const SHA256: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

#[test]
fn the_folder_accepts_what_the_crd_schema_accepts() {
    let base = format!("{MAC}{IP}");
    let image = |url: &str, sha256: &str| {
        format!("{base}  image: {{url: \"{url}\", sha256: \"{sha256}\"}}\n")
    };
    // (what, name, spec lines, accepted)
    let cases: Vec<(&str, &str, String, bool)> = vec![
        ("a plain Machine", "node2", base.clone(), true),
        (
            "an upper-case MAC",
            "node2",
            format!("  macAddress: AA:BB:CC:DD:EE:0F\n{IP}"),
            true,
        ),
        (
            "an unquoted MAC",
            "node2",
            format!("  macAddress: 52:54:00:12:34:56\n{IP}"),
            true,
        ),
        (
            "a hyphenated MAC",
            "node2",
            format!("  macAddress: 52-54-00-12-34-56\n{IP}"),
            false,
        ),
        (
            "a dotted MAC",
            "node2",
            format!("  macAddress: 5254.0012.3456\n{IP}"),
            false,
        ),
        (
            "a short MAC",
            "node2",
            format!("  macAddress: \"52:54:00:12:34\"\n{IP}"),
            false,
        ),
        (
            "a MAC with a g",
            "node2",
            format!("  macAddress: \"52:54:00:12:34:5g\"\n{IP}"),
            false,
        ),
        (
            "a MAC as a number",
            "node2",
            format!("  macAddress: 525400123456\n{IP}"),
            false,
        ),
        (
            "a null MAC",
            "node2",
            format!("  macAddress: null\n{IP}"),
            false,
        ),
        ("no MAC", "node2", IP.to_string(), false),
        ("no IP", "node2", MAC.to_string(), false),
        (
            "an IP octet of 256",
            "node2",
            format!("{MAC}  ipAddress: 10.77.0.256\n"),
            false,
        ),
        (
            "three octets",
            "node2",
            format!("{MAC}  ipAddress: \"10.77.0\"\n"),
            false,
        ),
        (
            "a leading zero",
            "node2",
            format!("{MAC}  ipAddress: 10.77.0.020\n"),
            false,
        ),
        (
            "an IPv6 address",
            "node2",
            format!("{MAC}  ipAddress: \"fe80::1\"\n"),
            false,
        ),
        (
            "a host name",
            "node2",
            format!("{base}  hostname: node2.lab.example\n"),
            true,
        ),
        (
            "an upper-case host name",
            "node2",
            format!("{base}  hostname: Node-2\n"),
            true,
        ),
        (
            "a null host name",
            "node2",
            format!("{base}  hostname: null\n"),
            true,
        ),
        (
            "a host name starting with -",
            "node2",
            format!("{base}  hostname: \"-node\"\n"),
            false,
        ),
        (
            "an empty host name",
            "node2",
            format!("{base}  hostname: \"\"\n"),
            false,
        ),
        (
            "a host name with _",
            "node2",
            format!("{base}  hostname: node_2\n"),
            false,
        ),
        (
            "a 254-character host name",
            "node2",
            format!("{base}  hostname: {}\n", ["a"; 127].join(".") + "a"),
            false,
        ),
        (
            "reimage as a string",
            "node2",
            format!("{base}  reimage: \"2\"\n"),
            true,
        ),
        (
            "reimage null",
            "node2",
            format!("{base}  reimage: null\n"),
            true,
        ),
        (
            "reimage as a number",
            "node2",
            format!("{base}  reimage: 2\n"),
            false,
        ),
        (
            "reimage as a boolean",
            "node2",
            format!("{base}  reimage: true\n"),
            false,
        ),
        (
            "reimage as a list",
            "node2",
            format!("{base}  reimage: [a]\n"),
            false,
        ),
        (
            "a role (not a field any more)",
            "node2",
            format!("{base}  role: worker\n"),
            false,
        ),
        (
            "an image",
            "node2",
            image("http://10.77.0.1:8080/node.raw.zst", SHA256),
            true,
        ),
        (
            "an image of another scheme",
            "node2",
            image("ftp://images.example/node.raw", SHA256),
            false,
        ),
        (
            "an https image (stage2 has no TLS)",
            "node2",
            image("https://images.example/node.raw", SHA256),
            false,
        ),
        (
            "an image URL with ${",
            "node2",
            image("http://h/${x}", SHA256),
            false,
        ),
        (
            "an image URL without a host",
            "node2",
            image("http:///node.raw", SHA256),
            false,
        ),
        (
            "an image with its size",
            "node2",
            format!("{base}  image: {{url: \"http://h/x\", sha256: \"{SHA256}\", size: 4096}}\n"),
            true,
        ),
        (
            "an image of size 0",
            "node2",
            format!("{base}  image: {{url: \"http://h/x\", sha256: \"{SHA256}\", size: 0}}\n"),
            false,
        ),
        (
            "an unknown image field",
            "node2",
            format!("{base}  image: {{url: \"http://h/x\", sha256: \"{SHA256}\", sha512: x}}\n"),
            false,
        ),
        (
            "a relative image URL",
            "node2",
            image("/node.raw.zst", SHA256),
            false,
        ),
        (
            "an image URL with a space",
            "node2",
            image("http://host/a b", SHA256),
            false,
        ),
        (
            "an upper-case sha256",
            "node2",
            image("http://h/x", &SHA256.to_uppercase()),
            false,
        ),
        (
            "a short sha256",
            "node2",
            image("http://h/x", &SHA256[1..]),
            false,
        ),
        (
            "an image without sha256",
            "node2",
            format!("{base}  image: {{url: \"http://h/x\"}}\n"),
            false,
        ),
        (
            "disk hints",
            "node2",
            format!("{base}  rootDevice: {{path: /dev/sda, serial: S1, minSizeBytes: 1}}\n"),
            true,
        ),
        (
            "null disk hints",
            "node2",
            format!("{base}  rootDevice: {{model: null, minSizeBytes: null}}\n"),
            true,
        ),
        (
            "a serial and a model with blanks",
            "node2",
            format!("{base}  rootDevice: {{serial: \"S 1\", model: QEMU HARDDISK}}\n"),
            true,
        ),
        (
            "a by-id path",
            "node2",
            format!("{base}  rootDevice: {{path: \"/dev/disk/by-id/virtio-B:1\"}}\n"),
            true,
        ),
        (
            "a path outside /dev",
            "node2",
            format!("{base}  rootDevice: {{path: vda}}\n"),
            false,
        ),
        (
            "a path with a blank",
            "node2",
            format!("{base}  rootDevice: {{path: \"/dev/disk/by-id/a b\"}}\n"),
            false,
        ),
        (
            "a serial iPXE reads as a comment",
            "node2",
            format!("{base}  rootDevice: {{serial: \"disk #2\"}}\n"),
            false,
        ),
        (
            "a model with a command separator",
            "node2",
            format!("{base}  rootDevice: {{model: \"a || b\"}}\n"),
            false,
        ),
        (
            "a model with two blanks",
            "node2",
            format!("{base}  rootDevice: {{model: \"a  b\"}}\n"),
            false,
        ),
        (
            "a serial with a double quote",
            "node2",
            format!("{base}  rootDevice: {{serial: \"a\\\"b\"}}\n"),
            false,
        ),
        (
            "an empty serial",
            "node2",
            format!("{base}  rootDevice: {{serial: \"\"}}\n"),
            false,
        ),
        (
            "an unknown disk hint",
            "node2",
            format!("{base}  rootDevice: {{wwn: x}}\n"),
            false,
        ),
        (
            "a minimum size of 0",
            "node2",
            format!("{base}  rootDevice: {{minSizeBytes: 0}}\n"),
            false,
        ),
        (
            "a negative minimum size",
            "node2",
            format!("{base}  rootDevice: {{minSizeBytes: -1}}\n"),
            false,
        ),
        (
            "a minimum size as text",
            "node2",
            format!("{base}  rootDevice: {{minSizeBytes: \"10\"}}\n"),
            false,
        ),
        (
            "a fractional minimum size",
            "node2",
            format!("{base}  rootDevice: {{minSizeBytes: 1.5}}\n"),
            false,
        ),
        (
            "an unknown spec field",
            "node2",
            format!("{base}  rack: r1\n"),
            false,
        ),
        (
            "a misspelt spec field",
            "node2",
            format!("{base}  hostnme: node2\n"),
            false,
        ),
        ("an upper-case name", "Node2", base.clone(), false),
        ("a name with _", "node_2", base.clone(), false),
        ("a dotted name", "node2.lab", base.clone(), true),
    ];
    let api_server = api_server();
    let mut wrong = Vec::new();
    for (what, name, spec, accepted) in &cases {
        let text = document(name, spec);
        let json: serde_json::Value = serde_yaml::from_str(&text).expect("the document is YAML");
        let by_schema = api_server.is_valid(&json);
        let by_folder = folder_serves(&text);
        if by_schema != *accepted || by_folder != *accepted {
            wrong.push(format!(
                "{what}: expected {accepted}, the CRD's schema said {by_schema}, the folder {by_folder}"
            ));
        }
    }
    // No spec at all, or a null one.
    for text in [
        format!("apiVersion: {API_VERSION}\nkind: Machine\nmetadata: {{name: node2}}\n"),
        format!(
            "apiVersion: {API_VERSION}\nkind: Machine\nmetadata: {{name: node2}}\nspec: null\n"
        ),
    ] {
        let json: serde_json::Value = serde_yaml::from_str(&text).expect("YAML");
        if api_server.is_valid(&json) || folder_serves(&text) {
            wrong.push(format!("accepted: {text}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {} documents:\n{}",
        wrong.len(),
        cases.len(),
        wrong.join("\n")
    );
}
