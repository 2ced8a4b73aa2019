//! Test support, by concern: processes (the harness and replicas), tokens, gRPC and AWS
//! protocol clients, audit trails, and the replicas' database and balancer. Real `hsm-kms`
//! processes on real SoftHSM2 tokens, one fresh token directory per harness.
// Each test binary uses part of this support: the rest is neither dead nor an unused import.
#![allow(dead_code, unused_imports)]

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, OnceLock};
use std::time::Duration;

use aws_sdk_kms::config::{BehaviorVersion, Credentials, Region};
use aws_sdk_kms::error::ProvideErrorMetadata;
use hsm_kms::config::{
    AdminSettings, AuditSettings, AuthSettings, ClusterSettings, GcmIvMode, HsmEntry, HsmSettings,
    LifecycleSettings, PinFormat, SecuritySettings, ServerSettings, Settings, StorageSettings,
    ThrottlingSettings,
};
pub use hsm_kms::model::states::{ClusterState, HsmState};
use hsm_kms::proto::key_management_service_client::KeyManagementServiceClient;
use hsm_kms::proto::*;
use tonic::transport::Channel;
use tonic_types::StatusExt;

pub type Client = KeyManagementServiceClient<Channel>;

pub const SO_PIN: &str = "so-pin-1234";
pub const PASSWORD: &str = "kmsuser-Passw0rd";

mod audit;
mod aws;
mod database;
mod grpc;
mod pki;
mod process;
mod tokens;

pub use audit::*;
pub use aws::*;
pub use database::*;
pub use grpc::*;
pub use pki::*;
pub use process::*;
pub use tokens::*;

/// A check this machine cannot make (it needs root, say). Under CI, which must make every
/// check, that is a failure; elsewhere the test says loudly that it skipped the check and
/// why (docs/TESTING.md).
pub fn cannot_check(why: &str) {
    if std::env::var_os("CI").is_some() {
        panic!("CI must make this check, and cannot here: {why}");
    }
    eprintln!("SKIPPED (this machine cannot make this check; CI must): {why}");
}
