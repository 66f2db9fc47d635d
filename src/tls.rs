//! Wires the certificates (`berth-acme`) into the data plane (certificates for handshakes,
//! answers to challenges) and the control plane (checks and status), which know nothing of
//! each other.

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use berth_acme::{Certificates, OnDemand, TlsSource};
use berth_control::protocol::{CertStoreStatus, CertificateStatus};
use berth_control::TlsProvider;
use berth_proxy::config::ServiceConfig;
use berth_proxy::pipeline::ChallengeResponder;
use berth_proxy::CertificateSource;
use rustls::sign::CertifiedKey;

pub struct TlsBridge {
    pub certificates: Arc<Certificates>,
    /// The host whose certificate a client that sends no server name gets: the first TLS
    /// service's first host, by service name (kamal-proxy shows its first TLS service's).
    default_host: std::sync::RwLock<Option<String>>,
    /// Hosts served with automatic HTTPS even when deployed without `--tls` (`--tls-hosts`).
    tls_hosts: Vec<String>,
}

impl TlsBridge {
    pub fn new(certificates: Arc<Certificates>) -> Self {
        Self {
            certificates,
            default_host: std::sync::RwLock::new(None),
            tls_hosts: Vec::new(),
        }
    }

    pub fn with_tls_hosts(mut self, hosts: Vec<String>) -> Self {
        self.tls_hosts = hosts;
        self
    }

    /// The host whose certificate a client that sends no server name gets.
    fn default_host(&self) -> Option<String> {
        self.default_host
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether `config` is for a host named by `--tls-hosts` and takes TLS settings (a root
    /// path service: path services follow their root's).
    fn wants_automatic_tls(&self, config: &ServiceConfig) -> bool {
        let root = config.path_prefixes.is_empty() || config.path_prefixes.iter().any(|p| p == "/");
        root && config
            .hosts
            .iter()
            .any(|host| self.tls_hosts.iter().any(|h| h.eq_ignore_ascii_case(host)))
    }
}

impl CertificateSource for TlsBridge {
    fn acme_challenge_certificate(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        self.certificates.tls_alpn_certificate(server_name)
    }

    fn certificate_ready(&self, server_name: &str) -> Option<Arc<CertifiedKey>> {
        if server_name.is_empty() {
            return self.certificates.certificate_ready(&self.default_host()?);
        }
        self.certificates
            .certificate_ready(server_name)
            .or_else(|| {
                self.certificates
                    .certificate_ready(&wildcard_for(server_name)?)
            })
    }

    fn certificate_for<'a>(
        &'a self,
        server_name: &'a str,
    ) -> Pin<Box<dyn Future<Output = Option<Arc<CertifiedKey>>> + Send + 'a>> {
        Box::pin(async move {
            if server_name.is_empty() {
                return self
                    .certificates
                    .certificate_for(&self.default_host()?)
                    .await;
            }
            if let Some(found) = self.certificates.certificate_for(server_name).await {
                return Some(found);
            }
            self.certificates
                .certificate_for(&wildcard_for(server_name)?)
                .await
        })
    }
}

impl ChallengeResponder for TlsBridge {
    fn answer<'a>(
        &'a self,
        path: &'a str,
    ) -> Pin<Box<dyn Future<Output = Option<String>> + Send + 'a>> {
        Box::pin(self.certificates.challenge_answer(path))
    }
}

impl TlsProvider for TlsBridge {
    fn complete(&self, config: &mut ServiceConfig) {
        if !config.tls.enabled && self.wants_automatic_tls(config) {
            // As a deploy with --tls would: HTTPS, and X-Forwarded-* from clients not believed
            // (the balancer in front is named with --trusted-proxies).
            config.tls.enabled = true;
            config.forward_headers = false;
        }
        let settings = self.certificates.settings();
        if config.tls.acme_directory.is_none() {
            config.tls.acme_directory = Some(settings.directory_key().to_string());
        }
        if config.tls.acme_cache_path.is_none() {
            config.tls.acme_cache_path = Some(settings.cache.display().to_string());
        }
    }

    fn check(&self, config: &ServiceConfig) -> Result<(), String> {
        match (&config.tls.certificate_path, &config.tls.private_key_path) {
            (Some(certificate), Some(key)) => {
                Certificates::check_files(certificate, key).map_err(|e| e.to_string())
            }
            _ => Ok(()),
        }
    }

    fn services_changed(&self, configs: &[&ServiceConfig]) {
        let settings = self.certificates.settings();
        let default_host = configs
            .iter()
            .filter(|c| c.tls.enabled)
            .find_map(|c| c.hosts.iter().find(|h| !h.starts_with("*.")))
            .cloned();
        *self.default_host.write().unwrap_or_else(|e| e.into_inner()) = default_host;
        let mut wanted = HashMap::new();
        let mut on_demand = None;
        for config in configs.iter().filter(|c| c.tls.enabled) {
            let source = match (&config.tls.certificate_path, &config.tls.private_key_path) {
                (Some(certificate), Some(private_key)) => TlsSource::Files {
                    certificate: certificate.clone(),
                    private_key: private_key.clone(),
                },
                _ => TlsSource::Acme {
                    directory: config
                        .tls
                        .acme_directory
                        .clone()
                        .unwrap_or_else(|| settings.directory_key().to_string()),
                    cache: config
                        .tls
                        .acme_cache_path
                        .as_ref()
                        .map(PathBuf::from)
                        .unwrap_or_else(|| settings.cache.clone()),
                },
            };
            if let (Some(url), TlsSource::Acme { directory, cache }) =
                (&config.tls.on_demand_url, &source)
            {
                on_demand = Some(OnDemand {
                    url: url.clone(),
                    directory: directory.clone(),
                    cache: cache.clone(),
                });
            }
            for host in &config.hosts {
                wanted.insert(host.clone(), source.clone());
            }
        }
        self.certificates.sync(wanted, on_demand);
    }

    fn certificate_status(&self, host: &str) -> Option<CertificateStatus> {
        let info = self.certificates.info(host)?;
        Some(CertificateStatus {
            state: info.state,
            issuer: info.issuer,
            expires: info
                .not_after
                .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
            ordered_by: info.ordered_by,
            ordered_at: info
                .ordered_at
                .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
        })
    }

    fn store_status(&self) -> Option<CertStoreStatus> {
        let status = self.certificates.store_status()?;
        Some(CertStoreStatus {
            location: status.location,
            instance: status.instance,
            reachable: status.reachable,
            last_error: status.last_error,
            errors: status.errors,
            lock_waits: status.lock_waits,
        })
    }
}

/// The custom wildcard certificate's name that would cover `server_name` (one label below
/// its domain).
fn wildcard_for(server_name: &str) -> Option<String> {
    let (_, domain) = server_name.split_once('.')?;
    Some(format!("*.{domain}"))
}
