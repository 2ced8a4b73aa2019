//! hsm-kms: the AWS KMS custom key store model over PKCS#11 HSMs.
//!
//! Data flows one way: `api` (gRPC) -> `kms` (the domain) -> (`hsm`, `metadata`).

pub mod api;
pub mod audit;
pub mod bench;
pub mod config;
pub mod dev;
pub mod hsm;
pub mod kms;
pub mod limits;
pub mod logging;
pub mod metadata;
pub mod metrics;
pub mod proto;
pub mod server;
pub mod transport;

/// The shared vocabulary (operations, states, ids, principals, errors), a crate of its own.
pub use model;
