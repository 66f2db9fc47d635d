//! `proxy run --config proxy.toml`: every run option from a TOML file. Flags win over the
//! environment, which wins over the file, which wins over the defaults. An unknown key or a bad
//! value is an error that names the key and its line.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use berth_proxy::GoDuration;

use crate::cli::{HostList, IpRanges};
use serde::Deserialize;

/// The run options a file may set; absent keys fall through to the defaults.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct RunFile {
    pub http_port: Option<u16>,
    pub https_port: Option<u16>,
    pub metrics_port: Option<u16>,
    pub bind: Option<IpAddr>,
    pub debug: Option<bool>,
    pub http3: Option<bool>,
    pub acme_directory: Option<String>,
    pub acme_ca_root: Option<PathBuf>,
    pub acme_email: Option<String>,
    pub upgrade_drain_timeout: Option<GoDuration>,
    pub header_read_timeout: Option<GoDuration>,
    pub idle_timeout: Option<GoDuration>,
    pub max_header_size: Option<usize>,
    pub max_headers: Option<usize>,
    pub max_connections: Option<usize>,
    pub target_connect_timeout: Option<GoDuration>,
    pub proxy_protocol: Option<bool>,
    /// CIDR ranges, as a list of strings.
    pub trusted_proxies: Option<IpRanges>,
    pub cert_store: Option<String>,
    /// Host names, as a list of strings.
    pub tls_hosts: Option<HostList>,
    pub cert_store_key_file: Option<PathBuf>,
    pub instance_name: Option<String>,
}

impl RunFile {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).map_err(|error| {
            // toml's message names the key and quotes the line; say which file, too.
            anyhow::anyhow!("{}: {}", path.display(), error.to_string().trim_end())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> anyhow::Result<RunFile> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, text)?;
        RunFile::load(&path)
    }

    #[test]
    fn the_example_file_loads() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("proxy.toml.example");
        let file = RunFile::load(&example).unwrap();
        assert_eq!(
            (file.http_port, file.https_port, file.metrics_port),
            (Some(80), Some(443), Some(0))
        );
        assert_eq!(
            file.upgrade_drain_timeout.map(|d| d.to_string()).as_deref(),
            Some("30s")
        );
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let error = parse("http_port = 8080\nhttps_prot = 8443\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("https_prot") && error.contains("line 2"),
            "{error}"
        );
    }

    #[test]
    fn a_bad_value_is_named_with_its_line() {
        let error = parse("debug = true\n\nhttp_port = \"eighty\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("line 3") && error.contains("http_port"),
            "{error}"
        );
        let error = parse("upgrade_drain_timeout = \"soon\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("line 1") && error.contains("soon"),
            "{error}"
        );
    }
}
