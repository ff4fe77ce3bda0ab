//! An installation's identity: a self-signed certificate made on first use.
//! Peers pin each other by the SHA-256 fingerprint of the certificate.

use super::QuicError;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};
use std::path::Path;

pub struct Identity {
    pub cert: CertificateDer<'static>,
    key: Vec<u8>,
    pub fingerprint: String,
}

/// `sha256:<hex>` of a certificate's DER bytes.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let mut s = String::from("sha256:");
    for b in digest {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl Identity {
    pub fn load_or_create(dir: &Path) -> Result<Self, QuicError> {
        let err = |message: String| QuicError::Identity {
            path: dir.display().to_string(),
            message,
        };
        let cert_path = dir.join("identity.crt.der");
        let key_path = dir.join("identity.key.der");
        if !cert_path.exists() || !key_path.exists() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
            let made = rcgen::generate_simple_self_signed(vec!["arca".to_owned()])
                .map_err(|e| err(e.to_string()))?;
            let key = made.signing_key.serialize_der();
            write_private(&key_path, &key).map_err(|e| err(e.to_string()))?;
            std::fs::write(&cert_path, made.cert.der().as_ref()).map_err(|e| err(e.to_string()))?;
        }
        let cert = std::fs::read(&cert_path).map_err(|e| err(e.to_string()))?;
        let key = std::fs::read(&key_path).map_err(|e| err(e.to_string()))?;
        Ok(Self {
            fingerprint: fingerprint(&cert),
            cert: CertificateDer::from(cert),
            key,
        })
    }

    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}
