//! Cancelling the statement running on a connection of seedkeeper's, the way libpq's
//! `PQcancel` does it: a cancel request on a new socket, which is then kept open until the server
//! (or the pooler) closes it. tokio-postgres's own `cancel_query` closes its socket right after
//! sending the request, and PgBouncer before 1.20 exits (`FATAL … disconnect_client(): bad
//! client state: 0`, pgbouncer/pgbouncer#801, fixed by pgbouncer#846) when a cancel client goes before it
//! has forwarded the request, taking every application's connections with it.
//!
//! Used to stop a run at its deadline ([`crate::reconcile`]): a cancel request goes to the
//! backend that runs the statement, which a pooler knows and seedkeeper does not (a backend pid
//! read earlier may serve another client by now behind a transaction pooler).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::config::Host;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::Client;

use super::tls;
use crate::config::describe_target;
use crate::config::DatabaseSettings;
use crate::error::{Error, Result};

/// A socket whose shutdown waits for the other side to close it, instead of closing first.
struct CloseLast<S>(S);

impl<S: AsyncRead + Unpin> AsyncRead for CloseLast<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for CloseLast<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    /// Reads (and drops) whatever comes until the server closes the socket: it has handled the
    /// cancel request then.
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut scratch = [0u8; 64];
        loop {
            let mut buf = ReadBuf::new(&mut scratch);
            ready!(Pin::new(&mut self.0).poll_read(cx, &mut buf))?;
            if buf.filled().is_empty() {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

/// Sends a cancel request for the statement running on `client` (a connection made with
/// `settings`, to the first host of `database.url`) and waits until the server has handled it.
/// The caller bounds the wait.
pub(crate) async fn cancel_statement(client: &Client, settings: &DatabaseSettings) -> Result<()> {
    let (cfg, tls_params) = settings.connection()?;
    let target = describe_target(&cfg);
    let mut connector = tls::connector(&tls_params)?;
    let port = cfg.get_ports().first().copied().unwrap_or(5432);
    let failed = |e: &dyn std::fmt::Display| {
        Error::Io(format!(
            "cancelling the stopped run's statement at {target}: {e}"
        ))
    };
    let token = client.cancel_token();
    match cfg.get_hosts().first() {
        Some(Host::Tcp(host)) => {
            // A `hostaddr` is where the connection went; the host name is for TLS.
            let socket = match cfg.get_hostaddrs().first() {
                Some(addr) => tokio::net::TcpStream::connect((*addr, port)).await,
                None => tokio::net::TcpStream::connect((host.as_str(), port)).await,
            }
            .map_err(|e| failed(&e))?;
            let made = MakeTlsConnect::<CloseLast<tokio::net::TcpStream>>::make_tls_connect(
                &mut connector,
                host,
            );
            let tls = match made {
                Ok(tls) => tls,
                Err(never) => match never {},
            };
            token
                .cancel_query_raw(CloseLast(socket), tls)
                .await
                .map_err(|e| failed(&e))
        }
        Some(Host::Unix(dir)) => {
            let socket = tokio::net::UnixStream::connect(dir.join(format!(".s.PGSQL.{port}")))
                .await
                .map_err(|e| failed(&e))?;
            // Never TLS over a Unix socket (see `DatabaseSettings::connection`).
            token
                .cancel_query_raw(CloseLast(socket), tokio_postgres::NoTls)
                .await
                .map_err(|e| failed(&e))
        }
        None => Err(failed(&"database.url names no host")),
    }
}
