//! Where cloud-init on an imaged machine gets its configuration: stage2 writes this URL as
//! NoCloud's `seedfrom`; netboot serves `/nocloud/{token}/meta-data` and `user-data` under it.
//! The token sits in the path because NoCloud's `seedfrom` cannot send headers.

/// The URL stage2 writes as cloud-init NoCloud's `seedfrom`: cloud-init appends `meta-data`,
/// `user-data` and `vendor-data` to it.
pub fn nocloud_seed_url(netboot_url: &str, token: &str) -> String {
    format!("{}/nocloud/{token}/", netboot_url.trim_end_matches('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_url() {
        assert_eq!(
            nocloud_seed_url("http://10.77.0.1/", "tok"),
            "http://10.77.0.1/nocloud/tok/"
        );
    }
}
