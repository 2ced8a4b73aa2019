//! Aliases: friendly names for keys, with the AWS rules (`alias/` prefix, reserved
//! `alias/aws/`, `[a-zA-Z0-9:/_-]`, 256 characters, unique per account, 50 per key).

use uuid::Uuid;

use super::gate::Authorized;
use super::{decode_marker, page_limit, Kms, Page};
use crate::metadata::{AliasRecord, Failure, Precondition, Unique};
use model::error::{quoted, ErrorKind, KmsError, KmsResult};
use model::op::Op;
use model::states::KeyState;

pub const MAX_ALIASES_PER_KEY: usize = 50;

/// What ListAliases says of one alias.
#[derive(Clone, Debug)]
pub struct AliasView {
    pub name: String,
    pub arn: String,
    pub target_key_id: Uuid,
    pub creation_date_ms: i64,
    pub last_updated_ms: i64,
}

/// Checks an alias name: the model's length and characters (ValidationException), then the
/// alias rules (InvalidAliasNameException).
pub fn check_alias_name(name: &str) -> KmsResult<()> {
    if name.is_empty() || name.len() > 256 {
        return Err(KmsError::validation(
            "AliasName must be 1 to 256 characters long",
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b":/_-".contains(&b))
    {
        return Err(KmsError::validation(format!(
            "AliasName {} may contain only letters, digits, and : / _ -",
            quoted(name)
        )));
    }
    let invalid = |why: &str| {
        Err(KmsError::new(
            ErrorKind::InvalidAliasName,
            format!("Alias name {} is not valid: {why}", quoted(name)),
        ))
    };
    match name.strip_prefix("alias/") {
        // AWS answers a name without the prefix as a validation failure, in these words.
        None => Err(KmsError::validation(
            "Alias must start with the prefix \"alias/\". Please see \
             https://docs.aws.amazon.com/kms/latest/developerguide/kms-alias.html",
        )),
        Some("") => invalid("it needs a name after alias/"),
        // AWS reserves the prefix whatever its case (alias/AWS/x is refused as alias/aws/x),
        // with NotAuthorizedException (its message is not recorded: these words are ours).
        Some(rest)
            if rest
                .get(..4)
                .is_some_and(|p| p.eq_ignore_ascii_case("aws/")) =>
        {
            Err(KmsError::new(
                ErrorKind::NotAuthorized,
                format!(
                    "Alias name {} uses the prefix alias/aws/, which is reserved for AWS managed \
                     keys",
                    quoted(name)
                ),
            ))
        }
        Some(_) => Ok(()),
    }
}

impl Kms {
    fn alias_view(&self, a: AliasRecord) -> AliasView {
        AliasView {
            arn: self.scope.alias_arn(&a.name),
            name: a.name,
            target_key_id: a.key_id,
            creation_date_ms: a.creation_date_ms,
            last_updated_ms: a.last_updated_ms,
        }
    }

    /// The key an alias points to; NotFoundException if there is no such alias.
    pub(super) async fn alias_target(&self, name: &str) -> KmsResult<Uuid> {
        self.meta
            .alias(name)
            .await?
            .map(|a| a.key_id)
            .ok_or_else(|| self.alias_not_found(name))
    }

    fn alias_not_found(&self, name: &str) -> KmsError {
        KmsError::new(
            ErrorKind::NotFound,
            format!(
                "Alias {} is not found.",
                self.scope.alias_arn(&quoted(name))
            ),
        )
    }

    /// The exception for a refused alias change of `op` that names `key`.
    fn alias_refused(&self, op: Op, name: &str, key: &Uuid, f: Failure) -> KmsError {
        match f {
            Failure::Taken(Unique::AliasName) => KmsError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "An alias with the name {} already exists",
                    self.scope.alias_arn(&quoted(name))
                ),
            ),
            // The key was looked up just before; what is missing now is the alias.
            Failure::NotFound if op != Op::CreateAlias => self.alias_not_found(name),
            Failure::Precondition(Precondition::Limit(n)) => KmsError::new(
                ErrorKind::LimitExceeded,
                format!(
                    "{} already has {n} aliases, the most a key may have",
                    self.scope.key_arn(key)
                ),
            ),
            other => self.refused(op, key, other),
        }
    }

    /// CreateAlias: `auth.key()` is the target (see `gate::Subject::Alias`).
    pub async fn create_alias(&self, auth: &Authorized<'_>, name: &str) -> KmsResult<()> {
        let op = Op::CreateAlias;
        let key = auth.key()?.id;
        self.meta
            .create_alias(
                name,
                &key,
                KeyState::accepted_by(op),
                self.now(),
                MAX_ALIASES_PER_KEY,
            )
            .await
            .map_err(|f| self.alias_refused(op, name, &key, f))?;
        tracing::info!(alias = name, key_arn = %self.scope.key_arn(&key), "created alias");
        Ok(())
    }

    /// UpdateAlias: `auth.key()` is the current target, `auth.other_key()` the new one.
    pub async fn update_alias(&self, auth: &Authorized<'_>, name: &str) -> KmsResult<()> {
        let op = Op::UpdateAlias;
        let key = auth.other_key()?.id;
        self.meta
            .update_alias(
                name,
                &key,
                KeyState::accepted_by(op),
                self.now(),
                MAX_ALIASES_PER_KEY,
            )
            .await
            .map_err(|f| self.alias_refused(op, name, &key, f))?;
        tracing::info!(alias = name, key_arn = %self.scope.key_arn(&key), "updated alias");
        Ok(())
    }

    /// DeleteAlias: `auth.key()` is the current target.
    pub async fn delete_alias(&self, auth: &Authorized<'_>, name: &str) -> KmsResult<()> {
        let op = Op::DeleteAlias;
        let current = auth.key()?.id;
        self.meta
            .delete_alias(name)
            .await
            .map_err(|f| self.alias_refused(op, name, &current, f))?;
        tracing::info!(alias = name, "deleted alias");
        Ok(())
    }

    pub async fn list_aliases(
        &self,
        auth: &Authorized<'_>,
        key_ref: Option<&str>,
        limit: Option<i32>,
        marker: Option<&str>,
    ) -> KmsResult<Page<AliasView>> {
        let limit = page_limit(limit, 100, 50)?;
        let key = match key_ref {
            Some(k) => Some(self.key_record(auth.caller(), k).await?.id),
            None => None,
        };
        let after = marker.map(decode_marker).transpose()?;
        let rows = self
            .meta
            .list_aliases(key.as_ref(), after.as_deref(), limit + 1)
            .await?;
        Ok(Page::of(
            rows,
            limit,
            |a| a.name.clone(),
            |a| self.alias_view(a),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alias_names() {
        assert!(check_alias_name("alias/app-1:blue/x_y").is_ok());
        assert_eq!(
            check_alias_name("app").unwrap_err().kind,
            ErrorKind::Validation
        );
        assert_eq!(
            check_alias_name("alias/").unwrap_err().kind,
            ErrorKind::InvalidAliasName
        );
        for reserved in ["alias/aws/s3", "alias/AWS/s3", "alias/Aws/x"] {
            assert_eq!(
                check_alias_name(reserved).unwrap_err().kind,
                ErrorKind::NotAuthorized,
                "{reserved}"
            );
        }
        assert!(check_alias_name("alias/awsome").is_ok());
        assert_eq!(
            check_alias_name("alias/a b").unwrap_err().kind,
            ErrorKind::Validation
        );
        assert_eq!(
            check_alias_name(&format!("alias/{}", "a".repeat(251)))
                .unwrap_err()
                .kind,
            ErrorKind::Validation
        );
        assert!(check_alias_name(&format!("alias/{}", "a".repeat(250))).is_ok());
    }
}
