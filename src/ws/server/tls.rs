//! TLS for `wss://`: the certificate chain and key, loaded once when the listener binds, and the
//! handshake that wraps each accepted TCP stream before the upgrade, within the connection's one
//! handshake deadline.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::pending::{until_deadline, Handshake};

/// Loads a PEM certificate chain and private key for `wss://`.
pub fn load_tls(cert: &Path, key: &Path) -> Result<TlsAcceptor, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("cannot read TLS_CERT_FILE {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "TLS_CERT_FILE {} holds no certificate",
            cert.display()
        ));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read TLS_KEY_FILE {}: {e}", key.display()))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| format!("TLS setup failed: {e}"))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| format!("TLS certificate and key do not fit: {e}"))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Runs the TLS handshake of an accepted connection; `None` when it failed (logged at debug),
/// or the deadline passed or the connection was cancelled first.
pub(super) async fn handshake(
    tls: &TlsAcceptor,
    stream: TcpStream,
    handshake: &Handshake,
    cancel: &CancellationToken,
) -> Option<TlsStream<TcpStream>> {
    let accepted = until_deadline(tls.accept(stream), handshake, cancel).await?;
    match accepted {
        Ok(stream) => Some(stream),
        Err(e) => {
            debug!(addr = %handshake.addr, error = %e, "TLS handshake failed");
            None
        }
    }
}
