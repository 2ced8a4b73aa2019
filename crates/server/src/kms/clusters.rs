//! The configured clusters: their settings and trust anchors, replaced as a whole when the
//! configuration is reloaded.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use anyhow::Context;

use crate::config::ClusterSettings;
use model::states::{ClusterState, HsmState};

/// A configured cluster: its settings and its trust anchor.
pub struct Cluster {
    pub settings: ClusterSettings,
    /// The trust anchor certificate in DER, for comparison with what callers present.
    pub trust_anchor_der: Vec<u8>,
    pub trust_anchor_pem: String,
}

impl Cluster {
    /// `None` if `trust_anchor_pem` holds no certificate.
    pub fn new(settings: ClusterSettings, trust_anchor_pem: String) -> Option<Cluster> {
        Some(Cluster {
            settings,
            trust_anchor_der: pem_der(&trust_anchor_pem)?,
            trust_anchor_pem,
        })
    }

    pub fn active_hsms(&self) -> usize {
        self.settings
            .hsms
            .iter()
            .filter(|h| h.state == HsmState::Active)
            .count()
    }

    /// AWS asks for at least two active HSMs in different availability zones.
    pub fn has_two_zones(&self) -> bool {
        let zones: std::collections::HashSet<&str> = self
            .settings
            .hsms
            .iter()
            .filter(|h| h.state == HsmState::Active)
            .map(|h| h.availability_zone.as_str())
            .collect();
        zones.len() >= 2
    }

    pub fn is_active(&self) -> bool {
        self.settings.state == ClusterState::Active
    }

    /// The crypto user's name when the PKCS#11 module takes it in the PIN.
    pub fn pin_user(&self) -> Option<&str> {
        (self.settings.pin_format == crate::config::PinFormat::UserPassword)
            .then_some(self.settings.crypto_user.as_str())
    }
}

/// The cluster table.
#[derive(Default)]
pub struct Clusters {
    by_id: RwLock<Arc<HashMap<String, Arc<Cluster>>>>,
}

impl Clusters {
    pub fn new(clusters: impl IntoIterator<Item = Cluster>) -> Clusters {
        let by_id = clusters
            .into_iter()
            .map(|c| (c.settings.id.clone(), Arc::new(c)))
            .collect();
        Clusters {
            by_id: RwLock::new(Arc::new(by_id)),
        }
    }

    /// Reads each cluster's trust anchor file.
    pub fn load(settings: &[ClusterSettings]) -> anyhow::Result<Clusters> {
        let mut clusters = Vec::new();
        for c in settings {
            let pem_text = std::fs::read_to_string(&c.trust_anchor_file).with_context(|| {
                format!(
                    "reading trust anchor {} of {}",
                    c.trust_anchor_file.display(),
                    c.id
                )
            })?;
            let cluster = Cluster::new(c.clone(), pem_text).with_context(|| {
                format!(
                    "trust anchor {} of {} is not a PEM certificate",
                    c.trust_anchor_file.display(),
                    c.id
                )
            })?;
            clusters.push(cluster);
        }
        Ok(Clusters::new(clusters))
    }

    pub fn get(&self, id: &str) -> Option<Arc<Cluster>> {
        self.by_id
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    /// Every cluster, by id.
    pub fn all(&self) -> Vec<Arc<Cluster>> {
        let by_id = Arc::clone(&self.by_id.read().unwrap_or_else(|p| p.into_inner()));
        let mut all: Vec<_> = by_id.values().cloned().collect();
        all.sort_by(|a, b| a.settings.id.cmp(&b.settings.id));
        all
    }

    /// Takes the clusters of `other` in place of these.
    pub fn replace_with(&self, other: Clusters) {
        let new = other.by_id.into_inner().unwrap_or_else(|p| p.into_inner());
        *self.by_id.write().unwrap_or_else(|p| p.into_inner()) = new;
    }
}

/// The DER of the first certificate in a PEM text.
pub fn pem_der(text: &str) -> Option<Vec<u8>> {
    pem::parse_many(text)
        .ok()?
        .into_iter()
        .find(|p| p.tag() == "CERTIFICATE")
        .map(|p| p.into_contents())
}
