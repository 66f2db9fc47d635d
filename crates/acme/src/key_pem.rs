//! Keys and chains in the PEM forms Go's autocert writes and reads, so kamal-proxy can use
//! what Berth stores and Berth what kamal-proxy stored.
//!
//! autocert writes ECDSA keys as SEC1 (`EC PRIVATE KEY`, with the curve named); instant-acme
//! and rcgen work in PKCS#8. A cache file must hold nothing but PEM blocks: autocert treats any
//! other byte as a corrupt file and orders a new certificate.

use p256::elliptic_curve::sec1::ToEncodedPoint;
use p256::pkcs8::{AssociatedOid, DecodePrivateKey, EncodePrivateKey};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use sec1::der::Encode;

const SEC1_TAG: &str = "EC PRIVATE KEY";
const PKCS8_TAG: &str = "PRIVATE KEY";
const PKCS1_TAG: &str = "RSA PRIVATE KEY";

fn encode(blocks: &[pem::Pem]) -> String {
    pem::encode_many_config(
        blocks,
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

/// A P-256 key as SEC1 DER with its curve named, as Go writes it (Go cannot read one that
/// leaves the curve out, which is how the `p256` crate writes it).
fn p256_sec1_der(secret: &p256::SecretKey) -> Option<Vec<u8>> {
    let private_key = secret.to_bytes();
    let public_key = secret.public_key().to_encoded_point(false);
    sec1::EcPrivateKey {
        private_key: &private_key,
        parameters: Some(sec1::EcParameters::NamedCurve(p256::NistP256::OID)),
        public_key: Some(public_key.as_bytes()),
    }
    .to_der()
    .ok()
}

/// A private key as autocert would write it: a P-256 key as SEC1, any other as it is.
fn private_key_block(key: PrivateKeyDer<'_>) -> pem::Pem {
    match key {
        PrivateKeyDer::Pkcs8(pkcs8) => {
            match p256::SecretKey::from_pkcs8_der(pkcs8.secret_pkcs8_der())
                .ok()
                .and_then(|secret| p256_sec1_der(&secret))
            {
                Some(sec1) => pem::Pem::new(SEC1_TAG, sec1),
                None => pem::Pem::new(PKCS8_TAG, pkcs8.secret_pkcs8_der()),
            }
        }
        PrivateKeyDer::Sec1(sec1) => pem::Pem::new(SEC1_TAG, sec1.secret_sec1_der()),
        PrivateKeyDer::Pkcs1(pkcs1) => pem::Pem::new(PKCS1_TAG, pkcs1.secret_pkcs1_der()),
        other => pem::Pem::new(PKCS8_TAG, other.secret_der()),
    }
}

/// The contents of a host's cache file: its private key, then its chain (leaf first).
pub fn cache_file(key_pem: &str, chain_pem: &str) -> Result<String, String> {
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| format!("invalid private key PEM: {e}"))?
        .ok_or("no private key")?;
    let mut blocks = vec![private_key_block(key)];
    for certificate in rustls_pemfile::certs(&mut chain_pem.as_bytes()) {
        let certificate = certificate.map_err(|e| format!("invalid certificate PEM: {e}"))?;
        blocks.push(pem::Pem::new("CERTIFICATE", certificate.as_ref()));
    }
    if blocks.len() == 1 {
        return Err("no certificate".into());
    }
    Ok(encode(&blocks))
}

/// The ACME account key (`acme_account+key`) as instant-acme takes it: PKCS#8.
pub fn account_key_from_pem(text: &str) -> Result<PrivatePkcs8KeyDer<'static>, String> {
    match rustls_pemfile::private_key(&mut text.as_bytes()) {
        Ok(Some(PrivateKeyDer::Pkcs8(pkcs8))) => Ok(pkcs8),
        Ok(Some(PrivateKeyDer::Sec1(sec1))) => {
            let secret = p256::SecretKey::from_sec1_der(sec1.secret_sec1_der())
                .map_err(|e| format!("not a P-256 key: {e}"))?;
            let pkcs8 = secret.to_pkcs8_der().map_err(|e| e.to_string())?;
            Ok(PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec()))
        }
        Ok(Some(_)) => Err("the account key is not an ECDSA key".into()),
        Ok(None) => Err("no private key".into()),
        Err(error) => Err(format!("invalid PEM: {error}")),
    }
}

/// The ACME account key as autocert writes it (SEC1, `EC PRIVATE KEY`).
pub fn account_key_to_pem(key: &PrivatePkcs8KeyDer<'_>) -> Result<String, String> {
    let block = private_key_block(PrivateKeyDer::Pkcs8(key.clone_key()));
    if block.tag() != SEC1_TAG {
        return Err("the account key is not a P-256 key".into());
    }
    Ok(encode(&[block]))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE_ACCOUNT_KEY: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIDXiaPI1JwnuAig+eds51QE1iIrYb5cUL/g+rc8Gk1t0oAoGCCqGSM49
AwEHoUQDQgAEj24gyvGUPVlpcSh0hjam37IgkJ0LGVt+0c28Gz7VmYM/4w6+Xutn
FfUGXl7QTfYnn74vtVh/CPHdBrYYwa6Cbg==
-----END EC PRIVATE KEY-----
";

    #[test]
    fn a_sec1_account_key_written_by_autocert_round_trips() {
        let pkcs8 = account_key_from_pem(FIXTURE_ACCOUNT_KEY).unwrap();
        // instant-acme accepts it.
        instant_acme::Key::from_pkcs8_der(pkcs8.clone_key()).unwrap();
        assert_eq!(account_key_to_pem(&pkcs8).unwrap(), FIXTURE_ACCOUNT_KEY);
    }

    #[test]
    fn a_cache_file_is_the_sec1_key_then_the_chain_and_nothing_else() {
        let (chain, key) = crate::certificate::tests::self_signed("a.test", 10, 5);
        assert!(key.starts_with("-----BEGIN PRIVATE KEY-----"));
        let file = cache_file(&key, &format!("\n{chain}\n\n")).unwrap();
        let blocks = pem::parse_many(&file).unwrap();
        let tags: Vec<&str> = blocks.iter().map(|b| b.tag()).collect();
        assert_eq!(tags, [SEC1_TAG, "CERTIFICATE"]);
        assert_eq!(file, encode(&blocks), "only PEM blocks, LF line ends");
        let parsed = crate::Certificate::from_pem(&file, &file).unwrap();
        assert_eq!(parsed.names, ["a.test"]);
    }
}
