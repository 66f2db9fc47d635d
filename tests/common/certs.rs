//! Certificates made on the spot for tests that bring their own (`--tls-certificate-path`).

use rustls::pki_types::CertificateDer;

/// A throwaway CA named `name`: its certificate, and the issuer that signs with it.
pub fn test_ca(name: &str) -> (rcgen::Certificate, rcgen::Issuer<'static, rcgen::KeyPair>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    (ca, rcgen::Issuer::new(ca_params, ca_key))
}

/// A certificate for `host` from a throwaway CA, 3 hours long with 1 hour left.
pub fn short_lived_certificate(host: &str) -> (String, String, CertificateDer<'static>) {
    let (ca, issuer) = test_ca("berth test short-lived CA");
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![host.to_string()]).unwrap();
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(2);
    params.not_after = now + time::Duration::hours(1);
    let cert = params.signed_by(&key, &issuer).unwrap();
    (cert.pem(), key.serialize_pem(), ca.der().clone())
}

/// A short-lived certificate for a host, written to PEM files, with the `deploy` flags that
/// serve it and the root that verifies it.
pub struct CertificateFiles {
    _dir: tempfile::TempDir,
    pub root: CertificateDer<'static>,
    pub flags: [String; 2],
}

pub fn certificate_files(host: &str) -> CertificateFiles {
    let (cert_pem, key_pem, root) = short_lived_certificate(host);
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, cert_pem).unwrap();
    std::fs::write(&key, key_pem).unwrap();
    CertificateFiles {
        flags: [
            format!("--tls-certificate-path={}", cert.display()),
            format!("--tls-private-key-path={}", key.display()),
        ],
        root,
        _dir: dir,
    }
}
