//! Who acts and on what: the IAM principal a caller authenticated as, and the resources a
//! request touched (for the audit trail).

/// An authenticated caller: an IAM-style ARN such as `arn:aws:iam::111122223333:user/alice`
/// or `...:role/app` or `...:root`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    pub arn: String,
    pub account: String,
    root: bool,
}

impl Principal {
    /// Parses an IAM principal ARN by IAM's grammar:
    /// `arn:<partition>:iam::<12 digits>:root`, `...:user<path><name>`,
    /// `...:role<path><name>` or `...:assumed-role/<role name>/<session name>`, where a path is
    /// `/` or `/<printable ASCII>/` (at most 512 characters) and names are 1 to 64 of
    /// `[A-Za-z0-9+=,.@_-]` (sessions 2 to 64). Anything else, such as a user whose "name"
    /// ends in `:root`, names no principal.
    pub fn parse(arn: &str) -> Option<Principal> {
        let parts: Vec<&str> = arn.splitn(6, ':').collect();
        let ["arn", partition, "iam", "", account, resource] = parts[..] else {
            return None;
        };
        let partition_ok = partition.starts_with(|c: char| c.is_ascii_lowercase())
            && partition
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !partition_ok || account.len() != 12 || !account.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let root = resource == "root";
        let resource_ok = root
            || resource.strip_prefix("user").is_some_and(path_and_name)
            || resource.strip_prefix("role").is_some_and(path_and_name)
            || resource
                .strip_prefix("assumed-role/")
                .and_then(|r| r.split_once('/'))
                .is_some_and(|(role, session)| iam_name(role, 1) && iam_name(session, 2));
        resource_ok.then(|| Principal {
            arn: arn.to_string(),
            account: account.to_string(),
            root,
        })
    }

    /// The account root of `account` in `partition`.
    pub fn root(partition: &str, account: &str) -> Principal {
        Principal {
            arn: format!("arn:{partition}:iam::{account}:root"),
            account: account.to_string(),
            root: true,
        }
    }

    /// Whether this is exactly `arn:<partition>:iam::<account>:root`.
    #[inline]
    pub fn is_root(&self) -> bool {
        self.root
    }

    /// Whether the caller belongs to the account named by `arn`'s account field.
    #[inline]
    pub fn owns(&self, arn: &str) -> bool {
        arn.split(':').nth(4) == Some(self.account.as_str())
    }
}

/// `/<path/>name` of a user or role: the path is `/` or `/.../` in printable ASCII.
fn path_and_name(rest: &str) -> bool {
    let Some(slash) = rest.rfind('/') else {
        return false;
    };
    let (path, name) = (&rest[..=slash], &rest[slash + 1..]);
    path.starts_with('/')
        && path.len() <= 512
        && path.bytes().all(|b| (0x21..=0x7e).contains(&b))
        && iam_name(name, 1)
}

/// An IAM user, role or session name: `min` to 64 of `[A-Za-z0-9+=,.@_-]`.
fn iam_name(name: &str, min: usize) -> bool {
    (min..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b))
}

/// What a request acted on, for the audit trail: a key (its ARN is written out there, off
/// the request path) or a store id or alias ARN.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Resource {
    Key(uuid::Uuid),
    Named(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE: &str = "arn:aws:iam::111122223333:user/alice";

    #[test]
    fn principals_parse() {
        assert!(Principal::parse(ALICE).is_some());
        assert!(Principal::parse("arn:aws:iam::111122223333:root")
            .unwrap()
            .is_root());
        assert!(Principal::parse("arn:aws:iam::111122223333:role/app").is_some());
        assert!(Principal::parse("arn:aws:iam::111122223333:role/team/app-1").is_some());
        assert!(Principal::parse("arn:aws:iam::111122223333:user/a+b=c,d.e@f_g-h").is_some());
        assert!(Principal::parse("arn:aws:iam::111122223333:assumed-role/app/session-1").is_some());
        assert!(!Principal::parse(ALICE).unwrap().is_root());
        assert!(Principal::root("aws", "111122223333").is_root());
        for bad in [
            "alice",
            "arn:aws:iam::1111:user/alice",
            "arn:aws:kms::111122223333:user/alice",
            "arn:aws:iam::111122223333:user/",
            "arn:aws:iam::111122223333:group/x",
            // Names that end in `:root` are not the root, and not names at all.
            "arn:aws:iam::111122223333:user/mallory:root",
            "arn:aws:iam::111122223333:role/app/x:root",
            "arn:aws:iam::111122223333:assumed-role/app/s:root",
            "arn:aws:iam::111122223333:root:root",
            "arn:aws:iam::111122223333:rooted",
            "arn:aws:iam::111122223333:useralice",
            "arn:aws:iam::111122223333:user/al ice",
            "arn:aws:iam::111122223333:user/al\nice",
            "arn:aws:iam::111122223333:assumed-role/app",
            "arn:aws:iam::111122223333:assumed-role/app/s",
            "arn:AWS:iam::111122223333:root",
            "arn::iam::111122223333:root",
            "arn:aws:iam:us-east-1:111122223333:root",
            "arn:aws:iam::11112222333x:root",
        ] {
            assert!(Principal::parse(bad).is_none(), "{bad}");
        }
        let long_name = format!("arn:aws:iam::111122223333:user/{}", "a".repeat(65));
        assert!(Principal::parse(&long_name).is_none());
    }
}
