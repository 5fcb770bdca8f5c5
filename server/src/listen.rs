//! Accepting connections for the gRPC server: at most `max_connections` are open at once (the
//! next one is accepted when one closes, so a flood waits in the kernel's backlog rather than
//! in hookd's memory), and each is wrapped in TLS when a certificate is configured.
//!
//! TLS handshakes run on tasks of their own, so a client that stalls its handshake holds one
//! connection slot for at most [`HANDSHAKE_TIMEOUT`], never the accept loop. The certificate
//! and key are read again on SIGHUP and whenever either file changes (checked every
//! [`RELOAD_CHECK`]); a reload that fails keeps the certificate in use and says why. New
//! connections get the new certificate; open ones keep theirs. This module never logs key
//! material and never reads a request.

use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// Longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate and key files are checked for a change.
pub const RELOAD_CHECK: Duration = Duration::from_secs(5);
/// Connections handed to the server and not yet taken by it.
const ACCEPTED_QUEUE: usize = 64;

/// Where the server's certificate chain and private key are (PEM files).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the TLS certificate chain {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("cannot read the TLS private key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the TLS certificate {cert} and key {key} do not make a server configuration: {reason}")]
    Config { cert: PathBuf, key: PathBuf, reason: String },
}

/// The TLS configuration in use, reloadable.
pub struct Tls {
    files: TlsFiles,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// Modification times of (cert, key) when last loaded.
    loaded: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("files", &self.files).finish_non_exhaustive()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|metadata| metadata.modified()).ok()
}

/// Reads and checks a certificate chain and key into a server configuration speaking HTTP/2.
pub fn server_config(files: &TlsFiles) -> Result<rustls::ServerConfig, TlsError> {
    let cert_error = |reason: String| TlsError::Cert { path: files.cert.clone(), reason };
    let chain = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|error| cert_error(error.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| cert_error(error.to_string()))?;
    if chain.is_empty() {
        return Err(cert_error("it holds no certificate".into()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|error| TlsError::Key { path: files.key.clone(), reason: error.to_string() })?;
    // reqwest is built without a default provider; ring is hookd's (a second install is
    // harmless).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config =
        rustls::ServerConfig::builder().with_no_client_auth().with_single_cert(chain, key).map_err(|error| {
            TlsError::Config { cert: files.cert.clone(), key: files.key.clone(), reason: error.to_string() }
        })?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

impl Tls {
    /// Loads the certificate and key, refusing files that do not make a configuration.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let stamps = (modified(&files.cert), modified(&files.key));
        let config = server_config(&files)?;
        Ok(Arc::new(Self { files, current: RwLock::new(Arc::new(config)), loaded: Mutex::new(stamps) }))
    }

    fn config(&self) -> Arc<rustls::ServerConfig> {
        self.current.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Reads the files again (`force`), or only if either changed since the last load.
    /// Returns whether a new certificate is in use; a failed reload keeps the old one.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let stamps = (modified(&self.files.cert), modified(&self.files.key));
        {
            let mut loaded = self.loaded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if !force && *loaded == stamps {
                return Ok(false);
            }
            // A half-written pair fails below and is tried again at the next change or check.
            *loaded = stamps;
        }
        let config = server_config(&self.files)?;
        *self.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(config);
        Ok(true)
    }

    /// Reloads on SIGHUP and when the files change, until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        #[cfg(unix)]
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(error) => {
                tracing::warn!(%error, "cannot watch SIGHUP; the TLS certificate is reloaded when its files change");
                None
            }
        };
        loop {
            #[cfg(unix)]
            let hung_up = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hung_up = std::future::pending::<Option<()>>();
            let force = tokio::select! {
                _ = hung_up => true,
                () = tokio::time::sleep(RELOAD_CHECK) => false,
                () = shutdown.cancelled() => return,
            };
            match self.reload(force) {
                Ok(true) => tracing::info!(cert = %self.files.cert.display(), "TLS certificate reloaded"),
                Ok(false) => {}
                Err(error) => tracing::error!(%error, "TLS certificate not reloaded; the one in use stays"),
            }
        }
    }
}

/// One accepted connection, holding its place among the open ones until it closes.
pub struct Conn {
    io: ConnIo,
    info: TcpConnectInfo,
    _slot: OwnedSemaphorePermit,
}

enum ConnIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            ConnIo::Plain(io) => Pin::new(io).poll_read(cx, buf),
            ConnIo::Tls(io) => Pin::new(io.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.io {
            ConnIo::Plain(io) => Pin::new(io).poll_write(cx, buf),
            ConnIo::Tls(io) => Pin::new(io.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.io {
            ConnIo::Plain(io) => Pin::new(io).poll_write_vectored(cx, bufs),
            ConnIo::Tls(io) => Pin::new(io.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            ConnIo::Plain(io) => io.is_write_vectored(),
            ConnIo::Tls(io) => io.is_write_vectored(),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            ConnIo::Plain(io) => Pin::new(io).poll_flush(cx),
            ConnIo::Tls(io) => Pin::new(io.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.io {
            ConnIo::Plain(io) => Pin::new(io).poll_shutdown(cx),
            ConnIo::Tls(io) => Pin::new(io.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections `listener` accepts, at most `max_connections` open at once, with TLS when
/// `tls` is given. Accepting stops when the stream is dropped (the server has stopped).
pub fn incoming(
    listener: TcpListener,
    max_connections: usize,
    tls: Option<Arc<Tls>>,
) -> ReceiverStream<io::Result<Conn>> {
    let (accepted, stream) = mpsc::channel(ACCEPTED_QUEUE);
    let slots = Arc::new(Semaphore::new(max_connections.max(1)));
    tokio::spawn(async move {
        loop {
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
                () = accepted.closed() => return,
            };
            let (tcp, remote) = tokio::select! {
                result = listener.accept() => match result {
                    Ok(connection) => connection,
                    Err(error) => {
                        // Out of file descriptors, or the like: pause rather than spin.
                        tracing::warn!(%error, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = accepted.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let info = TcpConnectInfo { local_addr: tcp.local_addr().ok(), remote_addr: Some(remote) };
            match &tls {
                None => {
                    if accepted.send(Ok(Conn { io: ConnIo::Plain(tcp), info, _slot: slot })).await.is_err() {
                        return;
                    }
                }
                Some(tls) => {
                    let acceptor = tokio_rustls::TlsAcceptor::from(tls.config());
                    let accepted = accepted.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                            Ok(Ok(stream)) => {
                                let conn = Conn { io: ConnIo::Tls(Box::new(stream)), info, _slot: slot };
                                let _ = accepted.send(Ok(conn)).await;
                            }
                            Ok(Err(error)) => tracing::debug!(%remote, %error, "TLS handshake failed"),
                            Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(stream)
}
