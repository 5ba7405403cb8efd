//! nginx over TLS, serving and accepting files: the peer of the files
//! workload. Uploads are WebDAV `PUT`s (nginx writes the body to a
//! temporary file and renames it into place, without fsync); downloads are
//! plain `GET`s. One worker process, pinned like Umbra; TLS 1.3 with a
//! self-signed ECDSA P-256 certificate (the key type Umbra's own is), which
//! the generator pins as a device pins Umbra's.
//!
//! The generator's HTTP/1.1 client is the subset the workload needs: one
//! request at a time on a kept-alive connection, `Content-Length` bodies.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use umbra_proto::CertFingerprint;

use crate::files::{FileServer, Slot, Stored};
use crate::umbra::{pinned_command, wait_listening};

/// Where Debian installs it.
const NGINX: &str = "/usr/sbin/nginx";
/// Body bytes per write, as Umbra's device uploads (four sealed segments).
const WRITE: usize = 4 * umbra_proto::blobs::SEALED_SEGMENT;
/// Longest response head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// A running nginx (master and worker).
pub struct Nginx {
    dir: PathBuf,
    address: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    master: Child,
    worker: u32,
}

impl std::fmt::Debug for Nginx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nginx")
            .field("address", &self.address)
            .field("worker", &self.worker)
            .finish_non_exhaustive()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.master.kill();
        let _ = self.master.wait();
        // The worker leaves when its master is gone; the files it took go
        // with the working directory.
        let _ = std::process::Command::new("kill")
            .arg("-KILL")
            .arg(self.worker.to_string())
            .status();
        let _ = std::fs::remove_dir_all(self.dir.join("www"));
    }
}

/// Starts nginx in a fresh directory under `work`, pinned to `cpu`.
pub async fn start(work: &Path, cpu: Option<u32>) -> Result<Nginx> {
    if !Path::new(NGINX).exists() {
        bail!("{NGINX} is missing: install Debian's nginx-core (scripts/bench does)");
    }
    let dir = work.join("nginx");
    if dir.exists() {
        std::fs::remove_dir_all(&dir)?;
    }
    for sub in ["www/files", "tmp", "logs"] {
        std::fs::create_dir_all(dir.join(sub))?;
    }
    // nginx takes relative paths from its prefix: every path is absolute.
    let dir = dir.canonicalize()?;
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .context("generating nginx's certificate")?;
    std::fs::write(dir.join("cert.pem"), certified.cert.pem())?;
    std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem())?;
    let pin = CertFingerprint::of_der(certified.cert.der());
    let tls = Arc::new(umbra_client::pinned_tls_config(pin)?);

    let address = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let config = config(&dir, address);
    std::fs::write(dir.join("nginx.conf"), config)?;
    let log = std::fs::File::create(dir.join("logs/stderr.log"))?;
    let master = pinned_command(Path::new(NGINX), cpu)
        .arg("-p")
        .arg(&dir)
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .arg("-e")
        .arg(dir.join("logs/error.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting nginx")?;
    let mut nginx = Nginx {
        dir,
        address,
        tls,
        master,
        worker: 0,
    };
    wait_listening(address, Duration::from_secs(30))
        .await
        .with_context(|| {
            format!(
                "nginx did not start; see {}",
                nginx.dir.join("logs").display()
            )
        })?;
    nginx.worker = worker_of(nginx.master.id())?;
    Ok(nginx)
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn config(dir: &Path, address: SocketAddr) -> String {
    let dir = dir.display();
    // As root, nginx would hand its worker to "nobody", who cannot write
    // here: keep the user the bench runs as.
    let user = if is_root() { "user root;\n" } else { "" };
    format!(
        "{user}daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    error_log {dir}/logs/error.log warn;
    client_body_temp_path {dir}/tmp;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    client_body_timeout 300s;
    send_timeout 300s;
    server {{
        listen {address} ssl;
        ssl_certificate {dir}/cert.pem;
        ssl_certificate_key {dir}/key.pem;
        ssl_protocols TLSv1.3;
        client_max_body_size 0;
        location /files/ {{
            root {dir}/www;
            dav_methods PUT DELETE;
            dav_access user:rw;
        }}
    }}
}}
"
    )
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().next().map(|uid| uid == "0"))
        })
        .unwrap_or(false)
}

/// The one worker of master `pid` (its child), once it is there.
fn worker_of(pid: u32) -> Result<u32> {
    for _ in 0..100 {
        let children = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
            .with_context(|| {
                format!("reading nginx's children (/proc/{pid}/task/{pid}/children)")
            })?;
        if let Some(worker) = children.split_whitespace().find_map(|c| c.parse().ok()) {
            return Ok(worker);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("nginx started no worker")
}

#[async_trait::async_trait]
impl FileServer for Nginx {
    fn name(&self) -> String {
        "nginx (TLS)".into()
    }

    fn pids(&self) -> Vec<u32> {
        vec![self.master.id(), self.worker]
    }

    fn durability(&self) -> String {
        "WebDAV PUT: the body is written to a temporary file and renamed into place \
         when complete, never fsynced; GET reads it back"
            .into()
    }

    async fn open(&self, slot: u32) -> Result<Box<dyn Slot>> {
        Ok(Box::new(NginxSlot {
            slot,
            next: 0,
            conn: Https::connect(self.address, &self.tls).await?,
        }))
    }
}

/// One transfer slot: its own kept-alive connection, its own file names.
struct NginxSlot {
    slot: u32,
    next: u64,
    conn: Https,
}

#[async_trait::async_trait]
impl Slot for NginxSlot {
    async fn upload(&mut self, bytes: &[u8]) -> Result<Stored> {
        let path = format!("/files/{}-{}", self.slot, self.next);
        self.next += 1;
        self.conn.put(&path, bytes).await?;
        Ok(Stored(path.into_bytes()))
    }

    async fn download(&mut self, stored: &Stored, expect: &[u8]) -> Result<()> {
        let path = std::str::from_utf8(&stored.0)?;
        self.conn.get(path, expect).await
    }
}

/// An HTTP/1.1 connection over TLS.
struct Https {
    stream: TlsStream<TcpStream>,
    /// Bytes read past the last response head.
    buffer: Vec<u8>,
}

impl Https {
    async fn connect(address: SocketAddr, tls: &Arc<rustls::ClientConfig>) -> Result<Https> {
        let tcp = TcpStream::connect(address).await?;
        tcp.set_nodelay(true)?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(tls))
            .connect(name, tcp)
            .await
            .context("TLS handshake with nginx")?;
        Ok(Https {
            stream,
            buffer: Vec::with_capacity(MAX_HEAD),
        })
    }

    async fn put(&mut self, path: &str, body: &[u8]) -> Result<()> {
        let head = format!(
            "PUT {path} HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        self.stream.write_all(head.as_bytes()).await?;
        for piece in body.chunks(WRITE) {
            self.stream.write_all(piece).await?;
        }
        self.stream.flush().await?;
        let (status, length) = self.head().await?;
        ensure!(
            status == 201 || status == 204,
            "nginx answered PUT {path} with {status}"
        );
        self.skip(length).await
    }

    /// Reads `path` and checks it is `expect`, byte for byte.
    async fn get(&mut self, path: &str, expect: &[u8]) -> Result<()> {
        let head = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n");
        self.stream.write_all(head.as_bytes()).await?;
        self.stream.flush().await?;
        let (status, length) = self.head().await?;
        ensure!(status == 200, "nginx answered GET {path} with {status}");
        ensure!(
            length == expect.len(),
            "nginx sent {length} bytes of {path}, not {}",
            expect.len()
        );
        let mut have = self.buffer.len().min(length);
        ensure!(
            self.buffer.get(..have) == expect.get(..have),
            "nginx sent other bytes for {path}"
        );
        self.buffer.drain(..have);
        let mut chunk = vec![0u8; WRITE];
        while have < length {
            let want = (length - have).min(chunk.len());
            let read = self.stream.read(&mut chunk[..want]).await?;
            ensure!(
                read > 0,
                "nginx closed the connection in the middle of {path}"
            );
            ensure!(
                chunk.get(..read) == expect.get(have..have + read),
                "nginx sent other bytes for {path}"
            );
            have += read;
        }
        Ok(())
    }

    /// Reads a response head: its status and `Content-Length` (0 if none).
    async fn head(&mut self) -> Result<(u16, usize)> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut response = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(end) = response.parse(&self.buffer)? {
                let status = response.code.context("response without a status")?;
                let length = response
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| std::str::from_utf8(h.value).map(|v| v.trim().parse::<usize>()))
                    .transpose()?
                    .transpose()?
                    .unwrap_or(0);
                self.buffer.drain(..end);
                return Ok((status, length));
            }
            ensure!(
                self.buffer.len() < MAX_HEAD,
                "nginx's response head is too long"
            );
            let mut chunk = [0u8; 4096];
            let read = self.stream.read(&mut chunk).await?;
            ensure!(read > 0, "nginx closed the connection");
            self.buffer.extend_from_slice(&chunk[..read]);
        }
    }

    /// Reads and drops a body of `length` bytes.
    async fn skip(&mut self, length: usize) -> Result<()> {
        let buffered = self.buffer.len().min(length);
        self.buffer.drain(..buffered);
        let mut left = length - buffered;
        let mut chunk = [0u8; 4096];
        while left > 0 {
            let read = self.stream.read(&mut chunk[..left.min(4096)]).await?;
            ensure!(read > 0, "nginx closed the connection");
            left -= read;
        }
        Ok(())
    }
}
