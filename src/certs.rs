//! Server certificates: loaded from PEM files (chain + key, the key checked against the chain),
//! chosen per handshake by SNI, and replaced on reload for new handshakes while established
//! connections keep theirs. Also the CA bundles upstream certificates are verified against.

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One certificate as served: its chain and key, the names it answers for, when it expires.
#[derive(Debug, Clone)]
pub struct ServerCert {
    pub cert_file: PathBuf,
    /// DNS names (lower case) from the leaf's subject alternative names, else its common name.
    pub names: Vec<String>,
    /// Unix seconds after which the leaf is no longer valid.
    pub not_after: i64,
    key: Arc<CertifiedKey>,
}

/// Why a certificate pair cannot be served.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {}: {source}", .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} holds no PEM certificate", .0.display())]
    NoCertificate(PathBuf),
    #[error("{} holds no PEM private key", .0.display())]
    NoKey(PathBuf),
    #[error("{} is not a certificate this gateway can parse: {why}", .path.display())]
    BadCertificate { path: PathBuf, why: String },
    #[error("the key in {} does not go with the certificate in {}", .key.display(), .cert.display())]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the key in {} cannot be used: {reason}", .key.display())]
    BadKey { key: PathBuf, reason: String },
}

fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    std::fs::read(path).map_err(|source| CertError::Read {
        path: path.to_path_buf(),
        source,
    })
}

impl ServerCert {
    /// Loads a chain (leaf first) and its private key from PEM files.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, CertError> {
        let chain_pem = read(cert_file)?;
        let key_pem = read(key_file)?;
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&chain_pem)
            .collect::<Result<_, _>>()
            .map_err(|e| CertError::BadCertificate {
                path: cert_file.to_path_buf(),
                why: e.to_string(),
            })?;
        let leaf = chain
            .first()
            .ok_or_else(|| CertError::NoCertificate(cert_file.to_path_buf()))?;
        let (names, not_after) = leaf_facts(leaf).map_err(|why| CertError::BadCertificate {
            path: cert_file.to_path_buf(),
            why,
        })?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|_| CertError::NoKey(key_file.to_path_buf()))?;
        let provider = rustls::crypto::ring::default_provider();
        let key = CertifiedKey::from_der(chain, key, &provider).map_err(|e| match e {
            rustls::Error::InconsistentKeys(_) => CertError::KeyMismatch {
                cert: cert_file.to_path_buf(),
                key: key_file.to_path_buf(),
            },
            other => CertError::BadKey {
                key: key_file.to_path_buf(),
                reason: other.to_string(),
            },
        })?;
        Ok(Self {
            cert_file: cert_file.to_path_buf(),
            names,
            not_after,
            key: Arc::new(key),
        })
    }

    /// True when this certificate answers for `server_name` (exactly, or by a `*.` wildcard
    /// covering one label).
    pub fn serves(&self, server_name: &str) -> bool {
        let name = server_name.trim_end_matches('.').to_ascii_lowercase();
        self.names.iter().any(|n| match n.strip_prefix("*.") {
            Some(suffix) => name
                .split_once('.')
                .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
            None => *n == name,
        })
    }
}

/// Loads the CA certificates (PEM, one or more) that an upstream's certificate must chain to.
pub fn load_ca_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = read(path)?;
    let bad = |why: String| CertError::BadCertificate {
        path: path.to_path_buf(),
        why,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate(path.to_path_buf()));
    }
    for cert in &certs {
        x509_parser::parse_x509_certificate(cert).map_err(|e| bad(e.to_string()))?;
    }
    Ok(certs)
}

/// The names and expiry of a leaf certificate.
fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => {
                        Some(d.to_ascii_lowercase())
                    }
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

/// The certificates a TLS listener serves, replaceable at run time.
#[derive(Debug)]
pub struct CertResolver {
    certs: ArcSwap<Vec<ServerCert>>,
}

impl CertResolver {
    /// Serves `certs` (the first is the default for clients that send no matching SNI).
    pub fn new(certs: Vec<ServerCert>) -> Self {
        Self {
            certs: ArcSwap::from_pointee(certs),
        }
    }

    /// New handshakes get `certs` from now on; established connections keep theirs.
    pub fn replace(&self, certs: Vec<ServerCert>) {
        self.certs.store(Arc::new(certs));
    }

    /// What is served now.
    pub fn current(&self) -> Arc<Vec<ServerCert>> {
        self.certs.load_full()
    }

    fn pick(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let certs = self.certs.load();
        server_name
            .and_then(|name| certs.iter().find(|c| c.serves(name)))
            .or_else(|| certs.first())
            .map(|c| c.key.clone())
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(dir: &Path, name: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let cert = rcgen::generate_simple_self_signed(
            names.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.cert.pem()).unwrap();
        std::fs::write(&k, cert.key_pair.serialize_pem()).unwrap();
        (c, k)
    }

    #[test]
    fn certificates_load_and_are_picked_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let (ac, ak) = pair(dir.path(), "a", &["api.example.test"]);
        let (bc, bk) = pair(dir.path(), "b", &["*.console.example.test"]);
        let a = ServerCert::load(&ac, &ak).unwrap();
        let b = ServerCert::load(&bc, &bk).unwrap();
        assert_eq!(a.names, ["api.example.test"]);
        assert!(a.serves("API.example.test."));
        assert!(b.serves("eu.console.example.test"));
        assert!(!b.serves("console.example.test"));
        assert!(!b.serves("a.b.console.example.test"));
        assert!(a.not_after > 1_700_000_000);
        let r = CertResolver::new(vec![a.clone(), b.clone()]);
        let key_of = |c: &ServerCert| c.key.clone();
        assert!(Arc::ptr_eq(
            &r.pick(Some("x.console.example.test")).unwrap(),
            &key_of(&b)
        ));
        assert!(Arc::ptr_eq(
            &r.pick(Some("other.test")).unwrap(),
            &key_of(&a)
        ));
        assert!(Arc::ptr_eq(&r.pick(None).unwrap(), &key_of(&a)));
        r.replace(vec![b.clone()]);
        assert!(Arc::ptr_eq(&r.pick(None).unwrap(), &key_of(&b)));
    }

    #[test]
    fn bad_pairs_are_refused_with_their_reason() {
        let dir = tempfile::tempdir().unwrap();
        let (ac, ak) = pair(dir.path(), "a", &["a.test"]);
        let (_, bk) = pair(dir.path(), "b", &["b.test"]);
        let err = ServerCert::load(&ac, &bk).unwrap_err().to_string();
        assert!(err.starts_with("the key in "), "{err}");
        assert!(err.contains("does not go with the certificate"), "{err}");
        let err = ServerCert::load(&ak, &ak).unwrap_err().to_string();
        assert!(err.ends_with("a.key holds no PEM certificate"), "{err}");
        let err = ServerCert::load(&ac, &ac).unwrap_err().to_string();
        assert!(err.ends_with("a.pem holds no PEM private key"), "{err}");
        let missing = dir.path().join("missing.pem");
        let err = ServerCert::load(&missing, &ak).unwrap_err().to_string();
        assert!(err.starts_with("cannot read "), "{err}");
    }
}
