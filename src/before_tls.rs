//! A TLS connection before its handshake: its place under the connection caps is taken here,
//! and its ClientHello must arrive within `server.header_timeout`. pingora handshakes before
//! the application sees a stream (and gives each handshake 60 s), so without this a client
//! that opens connections and sends nothing would hold a descriptor each for a minute, outside
//! every cap. The place taken here waits, by the connection's descriptor, for the stream the
//! handshake yields ([`Handshaking`]).

use crate::conn_limit::Handshaking;
use crate::edge_stream::EdgeLimits;
use async_trait::async_trait;
use pingora::listeners::PreTlsProcess;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::UniqueID;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncReadExt;

/// The most bytes of a TLS record (RFC 8446 §5.2: 2^14 plus expansion).
const MAX_RECORD: usize = 16_384 + 2_048;

/// How long pingora 0.9.1 lets a TLS handshake take (`services/listening.rs`), a second more.
const TLS_HANDSHAKE_LIMIT: Duration = Duration::from_secs(61);

/// pingora's pre-TLS hook on the public TLS listener.
pub(crate) struct BeforeHandshake {
    pub(crate) timeout: Duration,
    pub(crate) limits: Arc<dyn EdgeLimits>,
    /// Every connection starts with a PROXY protocol header, read first.
    pub(crate) proxy_protocol: bool,
    pub(crate) handshaking: Arc<Handshaking>,
}

fn refused(why: impl Into<String>) -> Box<pingora::Error> {
    pingora::Error::explain(pingora::ErrorType::AcceptError, why.into())
}

#[async_trait]
impl PreTlsProcess for BeforeHandshake {
    async fn process(&self, stream: &mut L4Stream) -> pingora::Result<()> {
        let mut early = None;
        self.handshaking.sweep();
        if self.proxy_protocol {
            // Its own place for an untrusted peer, a global one for a balancer's connection
            // while the header is read (the client is not known yet).
            let Some(place) = crate::edge_stream::HeaderPlace::take(&*self.limits, stream) else {
                return Err(refused("over a connection cap"));
            };
            let trusts = |ip| self.limits.trusts(ip);
            crate::proxy_protocol::accept(stream, self.timeout, trusts)
                .await
                .map_err(|why| {
                    self.limits.proxy_header_refused(&why);
                    refused(why.to_string())
                })?;
            early = place.client();
        }
        let peer = crate::proxy_protocol::peer_ip(stream);
        let Some(permit) = early.or_else(|| self.limits.admit_peer(peer)) else {
            return Err(refused("over a connection cap"));
        };
        let hello = tokio::time::timeout(self.timeout, first_record(stream))
            .await
            .map_err(|_| refused("no ClientHello within server.header_timeout"))?
            .map_err(|e| refused(format!("reading the ClientHello: {e}")))?;
        // The handshake reads it again.
        stream.rewind(&hello);
        // The rest of the handshake keeps its place for as long as pingora lets it take (or
        // until its socket closes): a handshake stalled after its ClientHello holds a socket,
        // which must count under the caps. Where its socket cannot be watched (no `/proc`), a
        // failed handshake's place would stay that long: `header_timeout` then.
        self.handshaking
            .hold(stream.id(), permit, TLS_HANDSHAKE_LIMIT, self.timeout);
        Ok(())
    }
}

/// Reads the connection's first TLS record whole (a ClientHello's: the handshake judges it).
async fn first_record(stream: &mut L4Stream) -> std::io::Result<Vec<u8>> {
    let mut record = vec![0u8; 5];
    stream.read_exact(&mut record).await?;
    // A handshake record (22) of TLS (3.x): anything else (plain HTTP to the TLS port) is
    // refused at once, not waited on for a length it never meant.
    if record[0] != 22 || record[1] != 3 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "not a TLS handshake record",
        ));
    }
    let len = usize::from(u16::from_be_bytes([record[3], record[4]])).min(MAX_RECORD);
    record.resize(5 + len, 0);
    stream.read_exact(&mut record[5..]).await?;
    Ok(record)
}
