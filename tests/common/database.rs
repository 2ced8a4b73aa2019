//! Replicas' shared infrastructure: a throwaway PostgreSQL database, and HAProxy in front.

use super::*;

/// Points `s` at `database`, with a sealing key file made for it (with a database, the
/// service never makes one itself: every replica needs a copy of the same key).
pub fn use_database(s: &mut Settings, database: hsm_kms::config::DatabaseSettings) {
    use std::os::unix::fs::OpenOptionsExt;
    let path = &s.security.sealing_key_file;
    if !path.exists() {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).unwrap();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .unwrap();
        f.write_all(&key).unwrap();
    }
    s.database = Some(database);
}

/// A fresh database on this test process's throwaway PostgreSQL server.
pub async fn postgres_database() -> hsm_kms::config::DatabaseSettings {
    let server = testing::postgres::Server::shared()
        .expect("PostgreSQL for the replica tests (scripts/setup.sh installs it)");
    database_on(server).await
}

/// A fresh database on `server`.
pub async fn database_on(server: &testing::postgres::Server) -> hsm_kms::config::DatabaseSettings {
    hsm_kms::config::DatabaseSettings {
        url: server.fresh_database().await.unwrap(),
        password_file: None,
        password_env: None,
        pool_size: 8,
        tls_ca_file: None,
    }
}

/// HAProxy running deploy/haproxy-replicas.cfg, the configuration scripts/cluster.sh ships,
/// in front of replicas; stopped when dropped.
pub struct Balancer {
    child: Child,
    /// The gRPC front (plaintext HTTP/2) and the AWS front.
    pub grpc: String,
    pub aws: String,
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One replica as the balancer sees it: its gRPC address, its AWS address if it has one,
/// and its admin address (for /readyz).
pub struct Backend {
    pub grpc: String,
    pub aws: Option<String>,
    pub admin: String,
}

impl Balancer {
    /// Starts HAProxy in `dir` with the shipped configuration for `backends`, and waits
    /// until its gRPC front accepts connections.
    pub fn start(dir: &Path, backends: &[Backend]) -> Balancer {
        let (grpc, aws) = (free_port(), free_port());
        let lines = |addr: &dyn Fn(&Backend) -> Option<String>, suffix: &str| -> String {
            backends
                .iter()
                .enumerate()
                .filter_map(|(i, b)| {
                    let admin_port = b.admin.rsplit(':').next().unwrap();
                    addr(b).map(|a| format!("    server r{i} {a} check port {admin_port}{suffix}"))
                })
                .collect::<Vec<_>>()
                .join("\n")
        };
        let template = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/haproxy-replicas.cfg"
        ))
        .unwrap();
        let config = template
            .replace("@BIND@", "127.0.0.1")
            .replace(
                "@ERRORS@",
                concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/haproxy-errors"),
            )
            .replace("@GRPC_PORT@", &grpc.to_string())
            .replace("@AWS_PORT@", &aws.to_string())
            .replace(
                "@GRPC_SERVERS@",
                &lines(&|b| Some(b.grpc.clone()), " proto h2"),
            )
            .replace("@AWS_SERVERS@", &lines(&|b| b.aws.clone(), ""));
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config).unwrap();
        let child = Command::new("haproxy")
            .arg("-db")
            .arg("-f")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("haproxy (scripts/setup.sh installs it)");
        let balancer = Balancer {
            child,
            grpc: format!("127.0.0.1:{grpc}"),
            aws: format!("127.0.0.1:{aws}"),
        };
        for _ in 0..200 {
            if std::net::TcpStream::connect(&balancer.grpc).is_ok() {
                return balancer;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("haproxy did not listen on {}", balancer.grpc);
    }
}
