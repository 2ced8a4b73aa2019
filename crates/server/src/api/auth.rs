//! Who is calling: the principal of a request, from its TLS client certificate (an `arn:`
//! URI subject alternative name, else the configured principal of its subject common name),
//! or the configured plaintext principal when plaintext on loopback is allowed.
//!
//! TLS itself (the client CA, validity dates) is checked by rustls before a request arrives;
//! this only names the caller.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::config::Settings;
use model::error::{ErrorKind, KmsError, KmsResult};
use model::principal::Principal;

/// Distinct client certificates remembered; past it, the cache starts over.
const CACHE_LIMIT: usize = 10_000;

pub struct Authenticator {
    tls: bool,
    plaintext: Option<Arc<Principal>>,
    by_common_name: HashMap<String, Arc<Principal>>,
    /// Certificate DER -> principal (or the reason it has none).
    cache: Mutex<HashMap<Vec<u8>, Named>>,
}

/// A certificate's principal, or why it names none.
type Named = Result<Arc<Principal>, String>;

impl Authenticator {
    pub fn new(settings: &Settings) -> anyhow::Result<Authenticator> {
        let parse = |arn: &str| {
            Principal::parse(arn)
                .map(Arc::new)
                .ok_or_else(|| anyhow::anyhow!("{arn} is not an IAM principal ARN"))
        };
        let plaintext = if settings.auth.allow_plaintext_loopback && !settings.tls.enabled() {
            Some(match &settings.auth.plaintext_principal {
                Some(p) => parse(p)?,
                None => Arc::new(Principal::root(
                    &settings.account.partition,
                    &settings.account.account_id,
                )),
            })
        } else {
            None
        };
        let mut by_common_name = HashMap::new();
        for c in &settings.auth.certificate_principals {
            by_common_name.insert(c.common_name.clone(), parse(&c.principal)?);
        }
        Ok(Authenticator {
            tls: settings.tls.enabled(),
            plaintext,
            by_common_name,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The caller's principal; AccessDeniedException when there is none.
    pub fn principal(&self, leaf_certificate: Option<&[u8]>) -> KmsResult<Arc<Principal>> {
        match (leaf_certificate, &self.plaintext) {
            (Some(der), _) if self.tls => self.of_certificate(der),
            (None, Some(p)) if !self.tls => Ok(Arc::clone(p)),
            _ => Err(KmsError::new(
                ErrorKind::AccessDenied,
                "The request carries no client certificate",
            )),
        }
    }

    fn of_certificate(&self, der: &[u8]) -> KmsResult<Arc<Principal>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let found = match cache.get(der) {
            Some(r) => r.clone(),
            None => {
                let r = self.name(der);
                if cache.len() >= CACHE_LIMIT {
                    cache.clear();
                }
                cache.insert(der.to_vec(), r.clone());
                r
            }
        };
        found.map_err(|why| KmsError::new(ErrorKind::AccessDenied, why))
    }

    fn name(&self, der: &[u8]) -> Result<Arc<Principal>, String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|_| "The client certificate cannot be parsed".to_string())?;
        let san = cert
            .subject_alternative_name()
            .map_err(|_| "The client certificate's subject alternative names are malformed")?;
        let uris = san.into_iter().flat_map(|ext| {
            ext.value.general_names.iter().filter_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => Some(*u),
                _ => None,
            })
        });
        let arns: Vec<&str> = uris.filter(|u| u.starts_with("arn:")).collect();
        match arns[..] {
            [arn] => {
                return Principal::parse(arn).map(Arc::new).ok_or_else(|| {
                    format!(
                        "The client certificate names {}, which is not an IAM principal ARN",
                        model::error::quoted(arn)
                    )
                })
            }
            [] => {}
            _ => return Err("The client certificate names more than one principal".into()),
        }
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|c| c.as_str().ok())
            .unwrap_or_default();
        self.by_common_name.get(cn).cloned().ok_or_else(|| {
            format!(
                "The client certificate (CN={}) names no principal: give it an arn: URI \
                 subject alternative name, or map its common name in auth.certificate_principals",
                model::error::quoted(cn)
            )
        })
    }
}
