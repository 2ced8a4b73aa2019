//! Aliases: friendly names for keys, with the AWS rules (`alias/` prefix, reserved
//! `alias/aws/`, `[a-zA-Z0-9:/_-]`, 256 characters, unique per account, 50 per key).

use uuid::Uuid;

use super::access::{Caller, Facts};
use super::crypto::NO_CONTEXT;
use super::error::{ErrorKind, KmsError, KmsResult};
use super::keystores::Page;
use super::op::Op;
use super::{decode_marker, page_limit, Kms};
use crate::store::{AliasRecord, Refused};

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
            "AliasName {name} may contain only letters, digits, and : / _ -"
        )));
    }
    let invalid = |why: &str| {
        Err(KmsError::new(
            ErrorKind::InvalidAliasName,
            format!("Alias name {name} is not valid: {why}"),
        ))
    };
    match name.strip_prefix("alias/") {
        None => invalid("it must begin with alias/"),
        Some("") => invalid("it needs a name after alias/"),
        Some(_) if name.starts_with("alias/aws/") => {
            invalid("the prefix alias/aws/ is reserved for AWS managed keys")
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
    pub(super) fn alias_target(&self, name: &str) -> KmsResult<Uuid> {
        self.store
            .get_alias(name)?
            .map(|a| a.key_id)
            .ok_or_else(|| {
                KmsError::new(
                    ErrorKind::NotFound,
                    format!("Alias {} is not found", self.scope.alias_arn(name)),
                )
            })
    }

    fn alias_refused(&self, name: &str, key: &Uuid, r: Refused) -> KmsError {
        match r {
            Refused::AliasExists => KmsError::new(
                ErrorKind::AlreadyExists,
                format!(
                    "An alias with the name {} already exists",
                    self.scope.alias_arn(name)
                ),
            ),
            Refused::AliasMissing => KmsError::new(
                ErrorKind::NotFound,
                format!("Alias {} is not found", self.scope.alias_arn(name)),
            ),
            Refused::TooMany(n) => KmsError::new(
                ErrorKind::LimitExceeded,
                format!(
                    "{} already has {n} aliases, the most a key may have",
                    self.scope.key_arn(key)
                ),
            ),
            other => self.refused(key, other),
        }
    }

    /// Alias operations need the permission on the alias (identity policies) and on each
    /// key involved (key policies), as in AWS.
    fn authorize_alias(
        &self,
        caller: &Caller,
        action: &'static str,
        name: &str,
        keys: &[Uuid],
    ) -> KmsResult<()> {
        let facts = Facts::of(&caller.principal);
        self.authorize_account(caller, action, Some(&self.scope.alias_arn(name)), &facts)?;
        for k in keys {
            let key = self.key_by_id(k)?;
            self.authorize_key(caller, action, &key, &NO_CONTEXT, &facts)?;
        }
        Ok(())
    }

    pub fn create_alias(&self, caller: &Caller, name: &str, target: &str) -> KmsResult<()> {
        check_alias_name(name)?;
        let key = self.key_record(caller, target)?.id;
        self.authorize_alias(caller, Op::CreateAlias.action(), name, &[key])?;
        self.store
            .create_alias(name, &key, self.now(), MAX_ALIASES_PER_KEY)?
            .map_err(|r| self.alias_refused(name, &key, r))?;
        tracing::info!(alias = name, key_arn = %self.scope.key_arn(&key), "created alias");
        Ok(())
    }

    pub fn update_alias(&self, caller: &Caller, name: &str, target: &str) -> KmsResult<()> {
        check_alias_name(name)?;
        let key = self.key_record(caller, target)?.id;
        let current = self.alias_target(name)?;
        self.authorize_alias(caller, Op::UpdateAlias.action(), name, &[current, key])?;
        self.store
            .update_alias(name, &key, self.now(), MAX_ALIASES_PER_KEY)?
            .map_err(|r| self.alias_refused(name, &key, r))?;
        tracing::info!(alias = name, key_arn = %self.scope.key_arn(&key), "updated alias");
        Ok(())
    }

    pub fn delete_alias(&self, caller: &Caller, name: &str) -> KmsResult<()> {
        check_alias_name(name)?;
        let current = self.alias_target(name)?;
        self.authorize_alias(caller, Op::DeleteAlias.action(), name, &[current])?;
        self.store
            .delete_alias(name)?
            .map_err(|r| self.alias_refused(name, &Uuid::nil(), r))?;
        tracing::info!(alias = name, "deleted alias");
        Ok(())
    }

    pub fn list_aliases(
        &self,
        caller: &Caller,
        key_ref: Option<&str>,
        limit: Option<i32>,
        marker: Option<&str>,
    ) -> KmsResult<Page<AliasView>> {
        let limit = page_limit(limit, 100, 50)?;
        self.authorize_account(
            caller,
            Op::ListAliases.action(),
            None,
            &Facts::of(&caller.principal),
        )?;
        let key = key_ref
            .map(|k| self.key_record(caller, k))
            .transpose()?
            .map(|k| k.id);
        let after = marker.map(decode_marker).transpose()?;
        let rows = self
            .store
            .list_aliases(key.as_ref(), after.as_deref(), limit + 1)?;
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
            ErrorKind::InvalidAliasName
        );
        assert_eq!(
            check_alias_name("alias/").unwrap_err().kind,
            ErrorKind::InvalidAliasName
        );
        assert_eq!(
            check_alias_name("alias/aws/s3").unwrap_err().kind,
            ErrorKind::InvalidAliasName
        );
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
