//! TLS settings from PEM files (rustls underneath, through tonic).

use std::path::{Path, PathBuf};

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::{Error, Result};

/// An agent's or master's TLS files.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// When given, clients must present a certificate signed by this CA (PEM).
    pub client_ca: Option<PathBuf>,
}

impl ServerTls {
    /// Reads the files now, so that a bad path or a file that is not PEM fails at start.
    pub fn check(&self) -> Result<()> {
        self.config().map(|_| ())
    }

    pub(crate) fn config(&self) -> Result<ServerTlsConfig> {
        let identity = identity((&self.cert, "certificate"), (&self.key, "key"))?;
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(certificates(ca, "client CA")?);
        }
        Ok(config)
    }
}

/// A client's TLS files.
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// The CA that signed the agent's certificate (PEM).
    pub ca: Option<PathBuf>,
    /// A client certificate and key (PEM), for agents that require one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    /// Whether connections use TLS (a CA was given).
    pub fn enabled(&self) -> bool {
        self.ca.is_some()
    }

    pub(crate) fn config(&self, host: &str) -> Result<Option<ClientTlsConfig>> {
        let Some(ca) = &self.ca else {
            if self.identity.is_some() {
                return Err(Error::Config(
                    "a client certificate needs --ca too (the CA of the agent's certificate)"
                        .into(),
                ));
            }
            return Ok(None);
        };
        let mut config = ClientTlsConfig::new()
            .ca_certificate(certificates(ca, "CA")?)
            .domain_name(host);
        if let Some((cert, key)) = &self.identity {
            config = config.identity(identity((cert, "client certificate"), (key, "client key"))?);
        }
        Ok(Some(config))
    }
}

/// A PEM file of certificates (a CA, a chain), checked to hold at least one.
fn certificates(path: &Path, what: &str) -> Result<Certificate> {
    let pem = read(path, what)?;
    parse_certificates(&pem, path, what)?;
    Ok(Certificate::from_pem(pem))
}

fn parse_certificates(pem: &[u8], path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad(path, what, &format!("unreadable PEM ({e})")))?;
    if certs.is_empty() {
        return Err(bad(path, what, "holds no certificate"));
    }
    Ok(certs)
}

/// A certificate chain and its private key, checked with rustls as a TLS handshake would use
/// them (otherwise a key that is not the certificate's shows only when the server starts
/// serving, or at a client's first call, as a bare "transport error").
fn identity((cert, cert_what): (&Path, &str), (key, key_what): (&Path, &str)) -> Result<Identity> {
    let cert_pem = read(cert, cert_what)?;
    let key_pem = read(key, key_what)?;
    let chain = parse_certificates(&cert_pem, cert, cert_what)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
        bad(
            key,
            key_what,
            "holds no private key (PKCS#8, PKCS#1 or SEC1 PEM)",
        )
    })?;
    let provider = rustls::crypto::ring::default_provider();
    match rustls::sign::CertifiedKey::from_der(chain, key_der, &provider) {
        Ok(_) => Ok(Identity::from_pem(cert_pem, key_pem)),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(Error::Config(format!(
                "the TLS {key_what} '{}' is not the key of the {cert_what} '{}'",
                key.display(),
                cert.display()
            )))
        }
        Err(e) => Err(Error::Config(format!(
            "the TLS {cert_what} '{}' and {key_what} '{}' cannot be used: {e}",
            cert.display(),
            key.display()
        ))),
    }
}

fn bad(path: &Path, what: &str, why: &str) -> Error {
    Error::Config(format!("the TLS {what} '{}' {why}", path.display()))
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| {
        Error::Config(format!(
            "cannot read the TLS {what} '{}': {e}",
            path.display()
        ))
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(bad(path, what, "is not a PEM file"));
    }
    Ok(bytes)
}
