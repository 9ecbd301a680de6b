//! iroh endpoints that stay offline: no relay, no address lookup, no port mapping, no probing
//! of the internet. Peers are dialled only at the addresses we are given.

use std::net::SocketAddr;

use iroh::endpoint::{presets, PortmapperConfig};
use iroh::{Endpoint, NetReportConfig, RelayMode, SecretKey};

/// Binds an endpoint on `bind` that never talks to anything but the peers it is told about.
pub async fn offline_endpoint(
    bind: SocketAddr,
    secret: Option<SecretKey>,
    alpns: Vec<Vec<u8>>,
) -> Result<Endpoint, EndpointError> {
    offline_builder(bind, secret, alpns)?
        .bind()
        .await
        .map_err(|e| EndpointError::Bind(bind, format!("{e:#}")))
}

/// The builder [`offline_endpoint`] binds, for callers that add hooks or transport limits.
pub fn offline_builder(
    bind: SocketAddr,
    secret: Option<SecretKey>,
    alpns: Vec<Vec<u8>>,
) -> Result<iroh::endpoint::Builder, EndpointError> {
    let mut builder = Endpoint::builder(presets::Minimal)
        .relay_mode(RelayMode::Disabled)
        .clear_address_lookup()
        .clear_ip_transports()
        .portmapper_config(PortmapperConfig::Disabled)
        .net_report_config(NetReportConfig::minimal())
        .alpns(alpns);
    builder = builder
        .bind_addr(bind)
        .map_err(|e| EndpointError::Address(bind, e.to_string()))?;
    if let Some(secret) = secret {
        builder = builder.secret_key(secret);
    }
    Ok(builder)
}

/// Why an endpoint could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    #[error("invalid bind address {0}: {1}")]
    Address(SocketAddr, String),
    #[error("cannot bind {0}: {1}")]
    Bind(SocketAddr, String),
}

/// The address a client should bind to reach `peers`: loopback if they are all on loopback
/// (the local case, and every test), any interface otherwise.
pub fn client_bind_addr<'a>(peers: impl IntoIterator<Item = &'a SocketAddr>) -> SocketAddr {
    let mut any_v6 = false;
    let mut all_loopback = true;
    for p in peers {
        all_loopback &= p.ip().is_loopback();
        any_v6 |= p.is_ipv6();
    }
    match (all_loopback, any_v6) {
        (true, false) => "127.0.0.1:0".parse().expect("valid"),
        (true, true) => "[::1]:0".parse().expect("valid"),
        (false, false) => "0.0.0.0:0".parse().expect("valid"),
        (false, true) => "[::]:0".parse().expect("valid"),
    }
}
