//! hsm-kms: the AWS KMS custom key store model over PKCS#11 HSMs. This crate is the
//! service itself; the binary (src/main.rs at the workspace root) runs it.
//!
//! Data flows one way, and tests/module_graph.rs fails on an import cycle: the fronts
//! (`api`: gRPC and the AWS protocol) -> `kms` (the domain) -> (`hsm`, `metadata`), all of
//! them on `model` (the shared vocabulary, a crate that imports nothing of the project).

pub mod api;
pub mod audit;
pub mod config;
pub mod dev;
pub mod hsm;
pub mod http;
pub mod iam;
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
