//! A certificate authority made in the test: server and client certificates for TLS.

/// A certificate authority made in the test, with certificates for the server and callers.
pub struct Pki {
    pub ca_pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = rcgen::KeyPair::generate().unwrap();
        let ca_pem = params.self_signed(&key).unwrap().pem();
        Pki {
            ca_pem,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) signed by this CA.
    pub fn issue(&self, params: rcgen::CertificateParams) -> (String, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    pub fn server(&self) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        p.subject_alt_names
            .push(rcgen::SanType::IpAddress([127, 0, 0, 1].into()));
        self.issue(p)
    }

    /// A client certificate: `arn` as a URI SAN (if any), `cn` as the subject common name.
    pub fn client(&self, arn: Option<&str>, cn: &str) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(rcgen::DnType::CommonName, cn);
        if let Some(a) = arn {
            p.subject_alt_names
                .push(rcgen::SanType::URI(a.try_into().unwrap()));
        }
        self.issue(p)
    }

    pub fn expired_client(&self, arn: &str) -> (String, String) {
        let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "expired");
        p.subject_alt_names
            .push(rcgen::SanType::URI(arn.try_into().unwrap()));
        p.not_before = rcgen::date_time_ymd(2020, 1, 1);
        p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        self.issue(p)
    }
}

/// TLS on every listener of `s`: a server certificate of `pki`, client certificates signed
/// by its CA, and no plaintext.
pub fn use_tls(s: &mut hsm_kms::config::Settings, pki: &Pki) {
    let (cert, key) = pki.server();
    let dir = s.storage.sqlite_path.parent().unwrap().to_path_buf();
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    s.tls.cert_file = Some(write("server.pem", &cert));
    s.tls.key_file = Some(write("server.key", &key));
    s.tls.client_ca_file = Some(write("client-ca.pem", &pki.ca_pem));
    s.auth.allow_plaintext_loopback = false;
}
