//! The named administrators and the checking of their passwords.
//!
//! Invariant: at most [`CONCURRENT_CHECKS`] argon2 checks run at once; a
//! check beyond that is refused at once ([`Check::Busy`]) rather than
//! queued, so guesses cannot pile up memory or threads. Each check's
//! argon2 memory is its own mapping, returned to the system when the
//! check ends, so a burst of guesses leaves the hub's memory where it was.
//! A name that is not an account costs the same argon2 work as a wrong
//! password, so timing does not tell which names exist.

use std::collections::BTreeMap;
use std::sync::Arc;

use argon2::{Algorithm, Argon2, Block, Params, PasswordHash, Version};
use tokio::sync::Semaphore;

/// Password checks that may run at the same time (each holds argon2's
/// memory, 19 MiB with the default parameters).
pub const CONCURRENT_CHECKS: usize = 2;

/// glibc's largest dynamic mmap threshold (32 MiB on 64-bit): a block of
/// memory reserved beyond it is always its own mapping, unmapped when
/// freed, and freeing it does not raise the threshold. Reserving at least
/// this much (and touching only what argon2 uses) is how a check gives its
/// memory back without `unsafe` allocator tuning.
const OWN_MAPPING_BYTES: usize = 33 << 20;

/// What a password check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// The password is this account's.
    Account(String),
    /// Wrong name or wrong password (the two are not told apart).
    Wrong,
    /// Too many checks are running: try again in a moment.
    Busy,
}

/// Why a name cannot be an administrator's.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.chars().count() > 64 {
        return Err("an administrator's name is 1 to 64 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| c.is_control() || c.is_whitespace() || *c == ':')
    {
        return Err(format!(
            "an administrator's name may not contain {c:?} (no spaces, control characters or ':')"
        ));
    }
    Ok(())
}

/// The configured administrators.
#[derive(Debug)]
pub struct Accounts {
    /// Name -> argon2 PHC string.
    hashes: BTreeMap<String, String>,
    /// Checked against when the name is unknown, so that costs the same.
    decoy: String,
    permits: Arc<Semaphore>,
}

impl Accounts {
    pub fn new(hashes: BTreeMap<String, String>) -> Accounts {
        Accounts {
            // Without accounts no password is ever checked.
            decoy: hashes.values().next().cloned().unwrap_or_default(),
            hashes,
            permits: Arc::new(Semaphore::new(CONCURRENT_CHECKS)),
        }
    }

    /// Whether any administrator is configured (a login is needed).
    pub fn any(&self) -> bool {
        !self.hashes.is_empty()
    }

    /// Checks `password` for `name`, on a blocking thread, or refuses at
    /// once when [`CONCURRENT_CHECKS`] checks are running.
    pub async fn check(&self, name: &str, password: &str) -> Check {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return Check::Busy;
        };
        let (hash, known) = match self.hashes.get(name) {
            Some(h) => (h.clone(), true),
            None => (self.decoy.clone(), false),
        };
        let password = password.to_string();
        let ok = tokio::task::spawn_blocking(move || {
            let ok = verify(&hash, password.as_bytes());
            drop(permit);
            ok
        })
        .await
        .unwrap_or(false);
        if ok && known {
            Check::Account(name.to_string())
        } else {
            Check::Wrong
        }
    }
}

/// Whether `password` matches the PHC string `hash`, in its own memory.
fn verify(hash: &str, password: &[u8]) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    let (Some(expected), Some(salt)) = (parsed.hash, parsed.salt) else {
        return false;
    };
    let Ok(algorithm) = Algorithm::try_from(parsed.algorithm) else {
        return false;
    };
    let Ok(version) = Version::try_from(parsed.version.unwrap_or(0x13)) else {
        return false;
    };
    let Ok(params) = Params::try_from(&parsed) else {
        return false;
    };
    let mut salt_bytes = [0u8; 64];
    let Ok(salt) = salt.decode_b64(&mut salt_bytes) else {
        return false;
    };
    let blocks = params.block_count();
    let mut memory: Vec<Block> =
        Vec::with_capacity(blocks.max(OWN_MAPPING_BYTES / size_of::<Block>()));
    memory.resize(blocks, Block::default());
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(algorithm, version, params);
    if argon
        .hash_password_into_with_memory(password, salt, &mut out, &mut memory[..])
        .is_err()
    {
        return false;
    }
    // `Output`'s equality is constant-time.
    argon2::password_hash::Output::new(&out).is_ok_and(|got| got == expected)
}

/// An argon2id PHC string for `password` (what `[admin.accounts]` holds).
pub fn hash_password(password: &str) -> Result<String, String> {
    use argon2::PasswordHasher;
    use argon2::password_hash::SaltString;
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|e| e.to_string())?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| e.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verify_agrees_with_argon2_and_names_are_checked() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(verify(&hash, b"correct horse battery"));
        assert!(!verify(&hash, b"correct horse batterx"));
        assert!(!verify("not a hash", b"x"));
        // The crate's own verifier agrees on what it accepts.
        use argon2::PasswordVerifier;
        let parsed = PasswordHash::new(&hash).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"correct horse battery", &parsed)
                .is_ok()
        );
        assert!(check_name("zhang.wei").is_ok());
        assert!(check_name("王伟").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("a:b").is_err());
        assert!(check_name("a b").is_err());
        assert!(check_name("a\tb").is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checks_beyond_the_bound_are_refused_at_once() {
        let accounts = Arc::new(Accounts::new(BTreeMap::from([(
            "zhang.wei".to_string(),
            hash_password("correct horse battery").unwrap(),
        )])));
        assert_eq!(
            accounts.check("zhang.wei", "correct horse battery").await,
            Check::Account("zhang.wei".into())
        );
        assert_eq!(accounts.check("zhang.wei", "wrong").await, Check::Wrong);
        assert_eq!(
            accounts.check("nobody", "correct horse battery").await,
            Check::Wrong
        );
        // With every permit taken, a check is refused at once.
        let held = accounts
            .permits
            .clone()
            .try_acquire_many_owned(CONCURRENT_CHECKS as u32)
            .unwrap();
        assert_eq!(
            accounts.check("zhang.wei", "correct horse battery").await,
            Check::Busy
        );
        drop(held);
        assert_eq!(
            accounts.check("zhang.wei", "correct horse battery").await,
            Check::Account("zhang.wei".into())
        );
    }
}
