//! TLS settings from PEM files (rustls underneath, through tonic).

use std::path::{Path, PathBuf};

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
        let identity =
            Identity::from_pem(read(&self.cert, "certificate")?, read(&self.key, "key")?);
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &self.client_ca {
            config = config.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
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
            .ca_certificate(Certificate::from_pem(read(ca, "CA")?))
            .domain_name(host);
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(
                read(cert, "client certificate")?,
                read(key, "client key")?,
            ));
        }
        Ok(Some(config))
    }
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| {
        Error::Config(format!(
            "cannot read the TLS {what} '{}': {e}",
            path.display()
        ))
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(Error::Config(format!(
            "the TLS {what} '{}' is not a PEM file",
            path.display()
        )));
    }
    Ok(bytes)
}
