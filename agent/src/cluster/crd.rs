//! The `Machine` custom resource (`provisioner.dev/v1alpha1`), defined by these Rust types. The
//! CRD manifest is generated from them (`provisioner crd`) and committed as
//! `agent/crd/machine.yaml`; a test fails when the two differ.
//!
//! The schema does what the API server can check on its own (MAC and IPv4 formats, host name,
//! image URL and sha256, disk hints); what needs context (the IP inside the provisioning subnet, duplicates) is the
//! controller's job, because the API server knows neither the subnet nor the other Machines.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Six colon-separated hex octets, either case: what `netboot::MacAddr` parses.
pub const MAC_PATTERN: &str = "^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$";
/// RFC 1123 host name (dot-separated labels of letters, digits and inner hyphens).
pub const HOSTNAME_PATTERN: &str =
    "^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$";
pub const SHA256_PATTERN: &str = "^[0-9a-f]{64}$";
/// An `http://` URL with a host, without blanks, `"` or `$`: what stage2 fetches (it has no
/// TLS; the sha256 guards the image) and what iPXE carries on the kernel command line as is.
pub const IMAGE_URL_PATTERN: &str = "^http://[^\\s\"$/][^\\s\"$]*$";
/// A device path: `/dev/` and printable ASCII without blanks, `"` or `$`.
pub const DEVICE_PATH_PATTERN: &str = "^/dev/[!#%-~]+$";
/// A disk serial or model as the kernel command line carries it: printable ASCII words
/// separated by single blanks, no `"` or `$`, and no word starting with `#`, `&`, `;` or `|`
/// (iPXE reads those as a comment or a command separator).
pub const DISK_WORDS_PATTERN: &str = "^[!%'-:<-{}~][!#%-~]*( [!%'-:<-{}~][!#%-~]*)*$";

/// A machine to network-boot, image and join to the cluster.
// clippy reads the repeated `printcolumn(type_ = …)` keys as duplicated attributes.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "provisioner.dev",
    version = "v1alpha1",
    kind = "Machine",
    plural = "machines",
    shortname = "mach",
    status = "MachineStatus",
    doc = "A machine that provisioner netboot PXE-boots, images and joins to the cluster.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "IP", type_ = "string", json_path = ".spec.ipAddress"),
    printcolumn(name = "MAC", type_ = "string", json_path = ".spec.macAddress"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(name = "Progress", type_ = "integer", json_path = ".status.progress"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    // Priority 1: shown by `kubectl get machines -o wide` only (a sentence would stretch
    // every line of the plain listing).
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.message",
        priority = 1
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MachineSpec {
    /// MAC address of the NIC that PXE-boots, e.g. `52:54:00:12:34:56`.
    #[schemars(regex(pattern = MAC_PATTERN))]
    pub mac_address: String,
    /// IPv4 address reserved for the machine in the provisioning subnet, e.g. `10.0.0.5`.
    #[schemars(extend("format" = "ipv4"))]
    pub ip_address: String,
    /// Host name given by DHCP and cloud-init; defaults to the object's name. The Node of the
    /// same name marks the machine Ready.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253), regex(pattern = HOSTNAME_PATTERN))]
    pub hostname: Option<String>,
    /// The disk image to write, instead of the agent's configured `image:`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageSpec>,
    /// Which disk to write when the machine has several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root_device: Option<RootDeviceHints>,
    /// Reimage request: set or change this token to have the machine imaged again on its next
    /// boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reimage: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageSpec {
    /// `http://` URL of the raw (optionally zstd/xz/gzip-compressed) disk image.
    #[schemars(extend("format" = "uri"), regex(pattern = IMAGE_URL_PATTERN))]
    pub url: String,
    /// sha256 of the decompressed image, lower-case hex.
    #[schemars(regex(pattern = SHA256_PATTERN))]
    pub sha256: String,
    /// Decompressed size in bytes, when known (stage2 checks the disk is large enough first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub size: Option<u64>,
}

/// Hints to pick the disk (stage2's disk choice); every given hint must match.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootDeviceHints {
    /// Device path, e.g. `/dev/disk/by-path/pci-0000:00:1f.2-ata-1` or `/dev/nvme0n1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DEVICE_PATH_PATTERN))]
    pub path: Option<String>,
    /// The disk's serial number as sysfs shows it (`/sys/block/NAME/serial` or
    /// `device/serial`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DISK_WORDS_PATTERN))]
    pub serial: Option<String>,
    /// The disk's model (`/sys/block/NAME/device/model`), compared without case.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = DISK_WORDS_PATTERN))]
    pub model: Option<String>,
    /// Smallest acceptable disk size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub min_size_bytes: Option<u64>,
}

/// Written by the agent (server-side apply, field manager `provisioner`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MachineStatus {
    /// Pending, PXEBooting, Imaging, Imaged, Joining, Ready or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// Percent of the image written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub progress: Option<u8>,
    /// What happened last; the reason when Failed or not served.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Served (in the netboot table), Conflict (MAC or IP claimed by another Machine),
    /// NodeReady (the Node of the machine's host name).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// When netboot last heard from the machine (DHCP, TFTP, HTTP, stage2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<Time>,
    /// The `metadata.generation` this status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The Node the machine became.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
}

/// The CRD manifest as YAML (what `provisioner crd` prints and `agent/crd/machine.yaml` holds).
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    let body = serde_yaml::to_string(&Machine::crd())?;
    Ok(format!(
        "# Generated by `provisioner crd` from agent/src/cluster/crd.rs: do not edit.\n{body}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const COMMITTED: &str = include_str!("../../crd/machine.yaml");

    #[test]
    fn committed_crd_matches_the_types() {
        let generated = crd_yaml().expect("CRD serialises");
        assert!(
            generated == COMMITTED,
            "agent/crd/machine.yaml is out of date; regenerate it with:\n  \
             cargo run -q -p agent -- crd > agent/crd/machine.yaml"
        );
    }

    #[test]
    fn crd_is_cluster_scoped_with_status_and_columns() {
        let crd = Machine::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.group, "provisioner.dev");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1alpha1");
        assert!(version
            .subresources
            .as_ref()
            .and_then(|s| s.status.as_ref())
            .is_some());
        let columns: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            columns,
            ["Phase", "IP", "MAC", "Node", "Progress", "Age", "Message"]
        );
        let wide_only: Vec<&str> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .filter(|c| c.priority.unwrap_or(0) > 0)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(wide_only, ["Message"], "only Message waits for -o wide");
    }

    /// The openAPIV3Schema of the generated CRD, checked by a JSON Schema validator with format
    /// validation on (as the API server validates `format: ipv4`).
    fn validator() -> jsonschema::Validator {
        let crd = serde_json::to_value(Machine::crd()).expect("CRD as JSON");
        let schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone();
        jsonschema::draft4::options()
            .should_validate_formats(true)
            .build(&schema)
            .expect("the schema compiles")
    }

    fn machine(mac: &str, ip: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "provisioner.dev/v1alpha1",
            "kind": "Machine",
            "metadata": {"name": "node2"},
            "spec": {"macAddress": mac, "ipAddress": ip, "hostname": "node2"},
        })
    }

    #[test]
    fn schema_accepts_good_addresses() {
        let v = validator();
        for (mac, ip) in [
            ("52:54:00:12:34:56", "10.0.0.5"),
            ("AA:BB:CC:DD:EE:0F", "192.168.100.254"),
        ] {
            let errors: Vec<String> = v
                .iter_errors(&machine(mac, ip))
                .map(|e| e.to_string())
                .collect();
            assert!(errors.is_empty(), "{mac} {ip}: {errors:?}");
        }
    }

    #[test]
    fn schema_rejects_bad_macs_and_ips() {
        let v = validator();
        for mac in [
            "52:54:00:12:34",
            "52-54-00-12-34-56",
            "5254.0012.3456",
            "52:54:00:12:34:5g",
            "",
        ] {
            assert!(
                !v.is_valid(&machine(mac, "10.0.0.5")),
                "accepted MAC {mac:?}"
            );
        }
        for ip in ["10.0.0", "10.0.0.256", "node2", "fe80::1", ""] {
            assert!(
                !v.is_valid(&machine("52:54:00:12:34:56", ip)),
                "accepted IP {ip:?}"
            );
        }
        let mut bad_host = machine("52:54:00:12:34:56", "10.0.0.5");
        bad_host["spec"]["hostname"] = "-node".into();
        assert!(!v.is_valid(&bad_host));
    }
}
