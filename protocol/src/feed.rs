//! Feed identity: a feed is one department resource.
//!
//! Codes are short, printable and unambiguous in logs and file names:
//! 1 to 64 characters from `A-Z a-z 0-9 . _ - /`. The slash is allowed because
//! national resource codes separate their classification part from the
//! sequence number with one (前段码/后段码).

use std::fmt;

use serde::{Deserialize, Serialize};

/// The longest code accepted.
pub const MAX_CODE_LEN: usize = 64;

/// A code failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is not valid: {reason}")]
pub struct CodeError {
    pub what: &'static str,
    pub value: String,
    pub reason: &'static str,
}

fn check_code(what: &'static str, value: &str) -> Result<(), CodeError> {
    let fail = |reason| {
        Err(CodeError {
            what,
            value: value.to_string(),
            reason,
        })
    };
    if value.is_empty() {
        return fail("it is empty");
    }
    if value.len() > MAX_CODE_LEN {
        return fail("it is longer than 64 characters");
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
    {
        return fail("only A-Z, a-z, 0-9 and . _ - / are allowed");
    }
    Ok(())
}

macro_rules! code_type {
    ($(#[$doc:meta])* $name:ident, $what:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Validates and wraps a code.
            pub fn new(value: impl Into<String>) -> Result<Self, CodeError> {
                let value = value.into();
                check_code($what, &value)?;
                Ok(Self(value))
            }

            /// The code as text.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = CodeError;
            fn try_from(value: String) -> Result<Self, CodeError> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(code: $name) -> String {
                code.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = CodeError;
            fn from_str(s: &str) -> Result<Self, CodeError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
    };
}

code_type!(
    /// A department's code (for example its unified social credit code or the
    /// platform's department number).
    DepartmentCode,
    "department code"
);
code_type!(
    /// A data resource's code (信息资源代码), unique within its department.
    ResourceCode,
    "resource code"
);

/// One feed: the change stream of one resource of one department. Binary
/// encodings carry the two codes; human-readable ones (JSON) the text form
/// `DEPARTMENT:RESOURCE`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FeedId {
    pub department: DepartmentCode,
    pub resource: ResourceCode,
}

#[derive(Serialize, Deserialize)]
#[serde(rename = "FeedId")]
struct FeedIdFields {
    department: DepartmentCode,
    resource: ResourceCode,
}

impl Serialize for FeedId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.collect_str(self)
        } else {
            FeedIdFields {
                department: self.department.clone(),
                resource: self.resource.clone(),
            }
            .serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for FeedId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            let text = String::deserialize(deserializer)?;
            text.parse().map_err(serde::de::Error::custom)
        } else {
            let f = FeedIdFields::deserialize(deserializer)?;
            Ok(FeedId::new(f.department, f.resource))
        }
    }
}

impl FeedId {
    pub fn new(department: DepartmentCode, resource: ResourceCode) -> Self {
        FeedId {
            department,
            resource,
        }
    }
}

impl fmt::Display for FeedId {
    /// `department:resource`; the colon never occurs inside a code.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.department, self.resource)
    }
}

impl fmt::Debug for FeedId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FeedId({self})")
    }
}

impl std::str::FromStr for FeedId {
    type Err = CodeError;
    fn from_str(s: &str) -> Result<Self, CodeError> {
        let (dept, res) = s.split_once(':').ok_or_else(|| CodeError {
            what: "feed",
            value: s.to_string(),
            reason: "expected DEPARTMENT:RESOURCE",
        })?;
        Ok(FeedId::new(dept.parse()?, res.parse()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::{decode, encode};

    #[test]
    fn codes_are_validated_on_decode_too() {
        assert!(ResourceCode::new("330900/00012").is_ok());
        assert!(ResourceCode::new("").is_err());
        assert!(ResourceCode::new("a:b").is_err());
        assert!(ResourceCode::new("户籍").is_err());
        let bytes = encode("a b").unwrap();
        assert!(decode::<ResourceCode>(&bytes).is_err());
    }

    #[test]
    fn json_uses_text_forms_and_binary_stays_compact() {
        let f: FeedId = "GA:A01/0001".parse().unwrap();
        assert_eq!(serde_json::to_string(&f).unwrap(), "\"GA:A01/0001\"");
        assert_eq!(
            serde_json::from_str::<FeedId>("\"GA:A01/0001\"").unwrap(),
            f
        );
        assert!(serde_json::from_str::<FeedId>("\"GA\"").is_err());
        let bytes = encode(&f).unwrap();
        assert_eq!(bytes, b"\x02GA\x08A01/0001");
        assert_eq!(decode::<FeedId>(&bytes).unwrap(), f);
        let id = crate::NodeKey::from_seed([1; 32]).id();
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{id}\""));
        assert_eq!(serde_json::from_str::<crate::NodeId>(&json).unwrap(), id);
        assert_eq!(encode(&id).unwrap().len(), 33);
    }

    #[test]
    fn feed_text_form() {
        let f: FeedId = "GA-330902:A01/0001".parse().unwrap();
        assert_eq!(f.department.as_str(), "GA-330902");
        assert_eq!(f.to_string(), "GA-330902:A01/0001");
    }
}
