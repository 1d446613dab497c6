//! Where the BGP listener binds. Calico runs `bird` for IPv4 and `bird6` for IPv6; bird6
//! connects to a node's IPv6 address, so podroute listens on `[::]` (dual-stack: IPv4 peers
//! arrive as `::ffff:a.b.c.d`) unless told otherwise, and on `0.0.0.0` when the host cannot
//! open an IPv6 socket (IPv6 disabled at boot). Any other failure on `[::]` (the port taken,
//! e.g. by a bird6 that has not stopped yet) is an error, not a silent IPv4-only listener.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use podroute_bgp::{EarlyListener, Speaker, SpeakerConfig, SpeakerError};
use tracing::{info, warn};

/// The addresses to try: the one given with `--bgp-bind`, else `[::]` falling back to
/// `0.0.0.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenCandidates {
    pub primary: SocketAddr,
    pub fallback: Option<SocketAddr>,
}

pub fn listen_candidates(bind: Option<IpAddr>, port: u16) -> ListenCandidates {
    match bind {
        Some(ip) => ListenCandidates {
            primary: SocketAddr::new(ip, port),
            fallback: None,
        },
        None => ListenCandidates {
            primary: SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), port),
            fallback: Some(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)),
        },
    }
}

/// Whether a failure to listen on `[::]` means the host has no IPv6 (so IPv4 alone is right).
pub fn ipv6_unavailable(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

/// Calls `start` with the primary address and, when that fails in a way `may_fall_back`
/// accepts and there is a fallback, with the fallback (the failure is logged).
pub async fn first_that_binds<T, E, F, Fut>(
    candidates: ListenCandidates,
    may_fall_back: impl Fn(&E) -> bool,
    mut start: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut(SocketAddr) -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    match (start(candidates.primary).await, candidates.fallback) {
        (Ok(t), _) => Ok(t),
        (Err(e), Some(next)) if may_fall_back(&e) => {
            warn!(addr = %candidates.primary, error = %e, %next, "cannot listen for BGP there (IPv6 disabled?); listening on IPv4 only");
            start(next).await
        }
        (Err(e), _) => Err(e),
    }
}

fn no_ipv6(e: &SpeakerError) -> bool {
    match e {
        SpeakerError::Listen { source, .. } => ipv6_unavailable(source),
        _ => false,
    }
}

/// Opens the BGP listener before the datastore is read, on the port BGPConfiguration has by
/// default (179): peers that connect meanwhile (they finished reading first) are held, not
/// refused (see [`EarlyListener`]). `None` when it cannot bind (the port taken, e.g. by a
/// BIRD still stopping): the listener then opens after the first state, as before, and
/// reports its own error.
pub async fn early_listener(candidates: ListenCandidates) -> Option<EarlyListener> {
    match first_that_binds(candidates, no_ipv6, |addr| async move {
        EarlyListener::bind(addr)
    })
    .await
    {
        Ok(l) => {
            info!(addr = ?l.local_addr(), "BGP listening before the datastore is read (connections held until the peers are configured)");
            Some(l)
        }
        Err(e) => {
            info!(error = %e, "cannot listen for BGP before the datastore is read; listening after it");
            None
        }
    }
}

/// Starts the speaker listening on the first of `candidates` that binds, or on `early` when
/// it is bound to one of them (the port BGPConfiguration names).
pub async fn start_speaker(
    cfg: SpeakerConfig,
    candidates: ListenCandidates,
    early: Option<EarlyListener>,
) -> Result<(Speaker, podroute_bgp::BestChanges), SpeakerError> {
    if let Some(early) = early {
        let bound = early.local_addr();
        if bound.is_some_and(|a| a == candidates.primary || Some(a) == candidates.fallback) {
            let mut cfg = cfg;
            cfg.listen = bound;
            return Speaker::start_on(cfg, early).await;
        }
        info!(early = ?bound, wanted = %candidates.primary, held = early.held(), "the BGP listener opened early is not on the configured port: closing it");
        early.close().await;
    }
    first_that_binds(candidates, no_ipv6, |addr| {
        let mut cfg = cfg.clone();
        cfg.listen = Some(addr);
        Speaker::start(cfg)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_dual_stack_then_ipv4() {
        let d = listen_candidates(None, 179);
        assert_eq!(d.primary, "[::]:179".parse().unwrap());
        assert_eq!(d.fallback, Some("0.0.0.0:179".parse().unwrap()));
        let e = listen_candidates(Some("10.0.0.5".parse().unwrap()), 1179);
        assert_eq!(e.primary, "10.0.0.5:1179".parse().unwrap());
        assert_eq!(e.fallback, None);
    }

    #[tokio::test]
    async fn a_failed_ipv6_bind_falls_back_to_ipv4() {
        let candidates = listen_candidates(None, 179);
        let mut tried = Vec::new();
        let no_ipv6 = |e: &std::io::Error| ipv6_unavailable(e);
        let got: Result<SocketAddr, std::io::Error> =
            first_that_binds(candidates, no_ipv6, |addr| {
                tried.push(addr);
                async move {
                    if addr.is_ipv6() {
                        Err(std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT))
                    } else {
                        Ok(addr)
                    }
                }
            })
            .await;
        assert_eq!(got.unwrap(), "0.0.0.0:179".parse::<SocketAddr>().unwrap());
        assert_eq!(
            tried,
            vec![candidates.primary, candidates.fallback.unwrap()]
        );
        // An explicit address does not fall back: its error is the answer.
        let explicit = listen_candidates(Some("::".parse().unwrap()), 179);
        let got: Result<SocketAddr, std::io::Error> =
            first_that_binds(explicit, no_ipv6, |_| async {
                Err(std::io::Error::from_raw_os_error(libc::EAFNOSUPPORT))
            })
            .await;
        assert!(got.is_err());
        // [::]:179 taken (a bird6 still running): an error, not an IPv4-only listener.
        let mut tried = Vec::new();
        let got: Result<SocketAddr, std::io::Error> =
            first_that_binds(candidates, no_ipv6, |addr| {
                tried.push(addr);
                async move { Err(std::io::Error::from_raw_os_error(libc::EADDRINUSE)) }
            })
            .await;
        assert_eq!(got.unwrap_err().raw_os_error(), Some(libc::EADDRINUSE));
        assert_eq!(tried, vec![candidates.primary]);
    }

    #[tokio::test]
    async fn the_speaker_listens_dual_stack_by_default() {
        // Port 0 on the default candidates: [::] where the host has IPv6, else 0.0.0.0.
        let cfg = SpeakerConfig::new(64512, "192.0.2.1".parse().unwrap());
        let (speaker, _rx) = start_speaker(cfg, listen_candidates(None, 0), None)
            .await
            .unwrap();
        let addr = speaker.listen_addr().unwrap();
        let host_has_ipv6 = std::net::TcpListener::bind("[::1]:0").is_ok();
        assert_eq!(addr.is_ipv6(), host_has_ipv6, "listening on {addr}");
        speaker.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn an_early_listener_is_taken_over_on_its_port_and_closed_on_another() {
        let early = early_listener(listen_candidates(Some("127.0.0.1".parse().unwrap()), 0))
            .await
            .unwrap();
        let bound = early.local_addr().unwrap();
        let cfg = SpeakerConfig::new(64512, "192.0.2.1".parse().unwrap());
        let candidates = listen_candidates(Some(bound.ip()), bound.port());
        let (speaker, _rx) = start_speaker(cfg.clone(), candidates, Some(early))
            .await
            .unwrap();
        assert_eq!(speaker.listen_addr(), Some(bound));
        speaker.shutdown().await.unwrap();

        // Another port configured: the early listener goes, the speaker binds that port.
        let early = early_listener(listen_candidates(Some("127.0.0.1".parse().unwrap()), 0))
            .await
            .unwrap();
        let early_addr = early.local_addr().unwrap();
        let candidates = listen_candidates(Some("127.0.0.1".parse().unwrap()), 0);
        let (speaker, _rx) = start_speaker(cfg, candidates, Some(early)).await.unwrap();
        let addr = speaker.listen_addr().unwrap();
        assert_ne!(addr, early_addr);
        assert!(
            std::net::TcpStream::connect(early_addr).is_err(),
            "early listener still open"
        );
        speaker.shutdown().await.unwrap();
    }
}
