//! Skipping reads that can only say "not yet".
//!
//! A connection's task is woken for many reasons besides its socket: the upstream answered, a
//! response body frame came, a timer. Each time, the HTTP/1.1 server and client look at the socket
//! again (for a client that left, for a response that came), and through TLS a read that finds
//! nothing still goes down every layer: tokio-rustls, rustls's deframer, tokio's socket. Profiles
//! of the keep-alive benchmark showed two such reads per request and TLS side, about 450
//! instructions each.
//!
//! [`ReadReadiness::poll_read_hint`] answers the same question from the socket's readiness flag
//! alone, once nothing waits decrypted above the socket. It is asked only when the last read of the
//! stream left it drained ([`Drained`]): it returned `Pending`, or fewer bytes than it had room for.
//! A short read means that the stream below ran out: tokio-rustls reads on until its plaintext runs
//! out or the socket has nothing more, and tokio clears a socket's readiness after a short read.
//! The one thing a short read can leave behind is an error that tokio-rustls keeps for the next
//! read. A socket error leaves the socket ready, so the next read reports it; a TLS error (a
//! corrupt record right behind good ones) is reported when the peer, which was sent an alert,
//! closes, or when the connection's time limits end it.

use std::io;
use std::task::{Context, Poll};

use tokio::net::TcpStream;

/// What a stream's reader keeps between reads: whether the last read left the stream drained (it
/// returned `Pending`, or fewer bytes than it had room for), so that the next asks
/// [`ReadReadiness::poll_read_hint`] first.
#[derive(Debug, Default)]
pub(crate) struct Drained(bool);

impl Drained {
    /// Whether the next read can be skipped: the stream was drained and nothing new came (the
    /// task's waker is then registered for the socket's readiness).
    pub(crate) fn skip(&self, io: &impl ReadReadiness, cx: &mut Context<'_>) -> bool {
        self.0 && io.poll_read_hint(cx).is_pending()
    }

    /// Notes what a read returned (its bytes and the room it had) and passes on the bytes' count.
    pub(crate) fn after(
        &mut self,
        read: Poll<io::Result<(usize, usize)>>,
    ) -> Poll<io::Result<usize>> {
        self.0 = match read {
            Poll::Pending => true,
            Poll::Ready(Ok((n, room))) => 0 < n && n < room,
            Poll::Ready(Err(_)) => false,
        };
        read.map_ok(|(n, _)| n)
    }
}

/// A stream that can tell, cheaply, that a read would return `Pending`.
pub(crate) trait ReadReadiness {
    /// `Pending` when a read would certainly return `Pending`, with the task's waker registered
    /// for the socket's next readiness (as a read would register it); `Ready` when a read may make
    /// progress. To be asked only after a read that left the stream [`Drained`].
    fn poll_read_hint(&self, cx: &mut Context<'_>) -> Poll<()>;
}

impl<T: ReadReadiness + ?Sized> ReadReadiness for Box<T> {
    fn poll_read_hint(&self, cx: &mut Context<'_>) -> Poll<()> {
        (**self).poll_read_hint(cx)
    }
}

impl ReadReadiness for TcpStream {
    fn poll_read_hint(&self, cx: &mut Context<'_>) -> Poll<()> {
        // An error is a kind of readiness: the read reports it.
        self.poll_read_ready(cx).map(|_| ())
    }
}

/// Through TLS: plaintext that rustls already decrypted (or a close_notify it received) is read
/// without the socket; otherwise only new bytes on the socket can make progress. rustls processes
/// every complete record as soon as it is read, so no complete record waits undecrypted.
fn tls_read_hint(
    io: &impl ReadReadiness,
    conn: &rustls::CommonState,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if conn.wants_read() {
        io.poll_read_hint(cx)
    } else {
        Poll::Ready(())
    }
}

impl<IO: ReadReadiness> ReadReadiness for tokio_rustls::server::TlsStream<IO> {
    fn poll_read_hint(&self, cx: &mut Context<'_>) -> Poll<()> {
        let (io, conn) = self.get_ref();
        tls_read_hint(io, conn, cx)
    }
}

impl<IO: ReadReadiness> ReadReadiness for tokio_rustls::client::TlsStream<IO> {
    fn poll_read_hint(&self, cx: &mut Context<'_>) -> Poll<()> {
        let (io, conn) = self.get_ref();
        tls_read_hint(io, conn, cx)
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::sync::Arc;
    use std::time::Duration;

    use futures_util::FutureExt;
    use rustls_pki_types::ServerName;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::tls;

    /// Whether the hint is ready at once (without waiting).
    fn hint_now(stream: &impl ReadReadiness) -> bool {
        poll_fn(|cx| stream.poll_read_hint(cx))
            .now_or_never()
            .is_some()
    }

    /// Waits, with the hint's waker, until the hint is ready; false after a second.
    async fn hint_wakes(stream: &impl ReadReadiness) -> bool {
        tokio::time::timeout(
            Duration::from_secs(1),
            poll_fn(|cx| stream.poll_read_hint(cx)),
        )
        .await
        .is_ok()
    }

    #[tokio::test]
    async fn the_hint_sees_new_bytes_plaintext_waiting_in_rustls_and_the_end() {
        let _ = tls::crypto_provider().install_default();
        let cert = rcgen::generate_simple_self_signed(vec!["test.invalid".to_owned()]).unwrap();
        let (cert, key) = (cert.cert.pem(), cert.signing_key.serialize_pem());
        let resolver = tls::CertResolver::new();
        resolver.set_default(tls::certified_key_from_pem(&cert, &key).unwrap());
        let acceptor = tokio_rustls::TlsAcceptor::from(tls::server_config(resolver, None));
        let roots = Arc::new(tls::roots_from_pem(&cert).unwrap());
        let connector = tokio_rustls::TlsConnector::from(tls::client_config(roots, &[], None));

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let name = ServerName::try_from("test.invalid").unwrap();
        let (client, server) = tokio::join!(
            async {
                connector
                    .connect(name, TcpStream::connect(addr).await.unwrap())
                    .await
            },
            async { acceptor.accept(listener.accept().await.unwrap().0).await },
        );
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        let mut buf = [0u8; 5];

        // Nothing sent: a read finds nothing, and so does the hint.
        assert!(server.read(&mut buf).now_or_never().is_none());
        assert!(!hint_now(&server));

        // New bytes wake it.
        client.write_all(b"hello world").await.unwrap();
        client.flush().await.unwrap();
        assert!(hint_wakes(&server).await, "new bytes on the socket");

        // A short read leaves plaintext in rustls and nothing on the socket: the socket alone
        // says "not yet", the TLS stream says "ready".
        server.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello");
        assert!(!hint_now(server.get_ref().0), "the socket was drained");
        assert!(hint_now(&server), "decrypted bytes wait in rustls");
        let mut rest = [0u8; 6];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b" world");
        assert!(server.read(&mut buf).now_or_never().is_none());
        assert!(!hint_now(&server));

        // The other way, and then the end of the stream.
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        assert!(hint_wakes(&client).await);
        let mut pong = [0u8; 4];
        client.read_exact(&mut pong).await.unwrap();
        assert_eq!(&pong, b"pong");
        // (The session tickets came before the pong: nothing is left for the client.)
        assert!(client.read(&mut buf).now_or_never().is_none());
        assert!(!hint_now(&client));
        client.shutdown().await.unwrap();
        drop(client);
        assert!(hint_wakes(&server).await, "the end is a readiness too");
        assert_eq!(server.read(&mut buf).await.unwrap(), 0);
    }
}
