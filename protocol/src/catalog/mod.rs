//! The data resource catalog (数据资源目录), in the national core-metadata
//! form (政务信息资源目录编制指南, core metadata per GB/T 21063.3).
//!
//! A department describes each resource it shares in a [`CatalogEntry`];
//! the platform's review of an entry is a separate [`Review`], owned by the
//! hub. Entries may be incomplete while they are drafts; submitting one for
//! review requires [`CatalogEntry::problems`] to be empty, and every broken
//! rule is reported on its own, naming the field.
//!
//! [`doc`] keeps a department's catalog as an automerge document (a CRDT, so
//! department and hub edit it concurrently and offline), [`form`] reads and
//! writes the fill-in form as CSV with the Chinese headers departments use,
//! and as TOML.

pub mod doc;
pub mod form;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::cycle::UpdateCycle;
use crate::feed::ResourceCode;
use crate::time::UnixMillis;

/// A value of one of the catalog's enumerations could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{value:?} is not a valid {what}: use one of {choices}")]
pub struct ChoiceError {
    pub what: &'static str,
    pub value: String,
    pub choices: String,
}

/// Declares an enumeration with English and Chinese names; parsing accepts
/// either, serde uses the English one.
macro_rules! choice {
    ($(#[$doc:meta])* $name:ident, $what:literal, { $($variant:ident => ($en:literal, $zh:literal $(, $alias:literal)*)),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The English name (as in TOML and JSON).
            pub fn english(self) -> &'static str {
                match self { $($name::$variant => $en),+ }
            }

            /// The Chinese term used on the national forms.
            pub fn chinese(self) -> &'static str {
                match self { $($name::$variant => $zh),+ }
            }
        }

        impl FromStr for $name {
            type Err = ChoiceError;
            fn from_str(s: &str) -> Result<Self, ChoiceError> {
                let t = s.trim();
                $(
                    if t.eq_ignore_ascii_case($en) || t == $zh $(|| t == $alias)* {
                        return Ok($name::$variant);
                    }
                )+
                Err(ChoiceError {
                    what: $what,
                    value: t.to_string(),
                    choices: [$(concat!($en, " (", $zh, ")")),+].join(", "),
                })
            }
        }

        impl TryFrom<String> for $name {
            type Error = ChoiceError;
            fn try_from(s: String) -> Result<Self, ChoiceError> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.english().to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.english())
            }
        }
    };
}

choice!(
    /// The catalog class, which is also the first digit of the resource code.
    ResourceClass, "resource class", {
        Base => ("base", "基础信息资源", "基础"),
        Thematic => ("thematic", "主题信息资源", "主题"),
        Department => ("department", "部门信息资源", "部门"),
    }
);

impl ResourceClass {
    /// The class digit (类) that opens the resource code.
    pub fn digit(self) -> char {
        match self {
            ResourceClass::Base => '1',
            ResourceClass::Thematic => '2',
            ResourceClass::Department => '3',
        }
    }
}

choice!(
    /// The resource's format (信息资源格式).
    ResourceFormat, "resource format", {
        Table => ("table", "数据库表", "数据库"),
        File => ("file", "电子文件", "文件"),
        Spreadsheet => ("spreadsheet", "电子表格"),
        Image => ("image", "图形图像"),
        Interface => ("interface", "接口", "服务接口"),
        Streaming => ("streaming", "流媒体"),
        Other => ("other", "其他"),
    }
);

choice!(
    /// The share type (共享类型).
    ShareType, "share type", {
        Unconditional => ("unconditional", "无条件共享", "普遍共享"),
        Conditional => ("conditional", "有条件共享", "按需共享"),
        NotShared => ("not-shared", "不予共享", "不共享"),
    }
);

choice!(
    /// How consumers get the data (共享方式).
    ShareMethod, "share method", {
        Verification => ("verification", "比对验证"),
        Query => ("query", "查询引用"),
        BulkCopy => ("bulk-copy", "批量复制"),
        TableSharing => ("table-sharing", "库表共享"),
    }
);

choice!(
    /// Whether the resource is open to the public (开放属性).
    OpenType, "open attribute", {
        Unconditional => ("unconditional", "无条件开放"),
        Conditional => ("conditional", "有条件开放"),
        NotOpen => ("not-open", "不予开放", "不开放"),
    }
);

choice!(
    /// The department's own status of an entry.
    Lifecycle, "status", {
        Draft => ("draft", "草稿"),
        Submitted => ("submitted", "已提交", "提交审核"),
        Withdrawn => ("withdrawn", "已撤销", "撤销"),
    }
);

choice!(
    /// The platform's verdict on an entry.
    ReviewStatus, "review status", {
        Approved => ("approved", "审核通过", "通过"),
        Returned => ("returned", "退回修改", "退回"),
    }
);

/// One data item (信息项): a column of the shared table.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataItem {
    /// 信息项名称
    pub name: String,
    /// 数据类型, as the source declares it
    pub data_type: String,
    /// 数据长度, when the type declares one
    pub length: Option<u32>,
    /// 信息项描述
    pub description: String,
    /// 是否敏感: sensitive items are masked before sharing
    pub sensitive: bool,
}

/// A department's description of one resource. The department owns every
/// field; the hub never writes one.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    /// 信息资源代码: classification (类 1 digit, 项 2, 目 3, 细目 any) `/`
    /// sequence number, e.g. `101001/00001`.
    pub code: String,
    /// 信息资源分类
    pub resource_class: Option<ResourceClass>,
    /// 信息资源名称
    pub name: String,
    /// 信息资源摘要
    pub summary: String,
    /// 信息资源提供方
    pub provider: String,
    /// 信息资源提供方代码
    pub provider_code: String,
    /// 信息资源格式
    pub format: Option<ResourceFormat>,
    /// 信息项信息, in column order
    pub data_items: Vec<DataItem>,
    /// 共享类型
    pub share_type: Option<ShareType>,
    /// 共享条件
    pub share_conditions: String,
    /// The law or regulation a conditional or not-shared entry rests on.
    pub legal_basis: String,
    /// 共享方式
    pub share_methods: Vec<ShareMethod>,
    /// 开放属性
    pub open_type: Option<OpenType>,
    /// 开放条件
    pub open_conditions: String,
    /// 更新周期
    pub update_cycle: Option<UpdateCycle>,
    /// 关联资源代码
    pub related: Vec<String>,
    pub status: Option<Lifecycle>,
    /// Why the entry was withdrawn (required when it is).
    pub withdraw_reason: String,
    /// When the department last submitted the entry for review.
    pub submitted_at: Option<UnixMillis>,
    /// When the shared table's structure last changed; starts the clock
    /// within which the updated entry must be published.
    pub resource_changed_at: Option<UnixMillis>,
    /// When the department last edited the entry.
    pub updated_at: Option<UnixMillis>,
}

/// The platform's review of an entry. The hub owns every field.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Review {
    pub status: ReviewStatus,
    /// 审核人
    pub reviewer: String,
    /// 审核意见
    pub remarks: String,
    pub reviewed_at: UnixMillis,
}

/// Where an entry stands, from the department's status and the review.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryState {
    /// 草稿
    Draft,
    /// 待审核: submitted, not yet reviewed since.
    Submitted,
    /// 已发布: approved after its last submission.
    Published,
    /// 已退回: returned after its last submission; the department must edit
    /// and submit again.
    Returned,
    /// 已撤销
    Withdrawn,
}

impl EntryState {
    /// The entry's state: a review counts only if it is newer than the
    /// last submission.
    pub fn of(entry: &CatalogEntry, review: Option<&Review>) -> EntryState {
        match entry.status.unwrap_or(Lifecycle::Draft) {
            Lifecycle::Draft => EntryState::Draft,
            Lifecycle::Withdrawn => EntryState::Withdrawn,
            Lifecycle::Submitted => match review {
                Some(r) if entry.submitted_at.is_none_or(|s| r.reviewed_at >= s) => {
                    match r.status {
                        ReviewStatus::Approved => EntryState::Published,
                        ReviewStatus::Returned => EntryState::Returned,
                    }
                }
                _ => EntryState::Submitted,
            },
        }
    }

    pub fn chinese(self) -> &'static str {
        match self {
            EntryState::Draft => "草稿",
            EntryState::Submitted => "待审核",
            EntryState::Published => "已发布",
            EntryState::Returned => "已退回",
            EntryState::Withdrawn => "已撤销",
        }
    }

    pub fn english(self) -> &'static str {
        match self {
            EntryState::Draft => "draft",
            EntryState::Submitted => "submitted",
            EntryState::Published => "published",
            EntryState::Returned => "returned",
            EntryState::Withdrawn => "withdrawn",
        }
    }
}

/// One broken rule of an entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    /// The field's English key (as in TOML and `catalog set`).
    pub field: String,
    /// The field's Chinese form header.
    pub label: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.label, self.field, self.message)
    }
}

/// The English keys of the department's fields, with their form headers.
pub const FIELDS: &[(&str, &str)] = &[
    ("code", "信息资源代码"),
    ("resource_class", "信息资源分类"),
    ("name", "信息资源名称"),
    ("summary", "信息资源摘要"),
    ("provider", "信息资源提供方"),
    ("provider_code", "信息资源提供方代码"),
    ("format", "信息资源格式"),
    ("data_items", "信息项信息"),
    ("share_type", "共享类型"),
    ("share_conditions", "共享条件"),
    ("legal_basis", "共享依据"),
    ("share_methods", "共享方式"),
    ("open_type", "开放属性"),
    ("open_conditions", "开放条件"),
    ("update_cycle", "更新周期"),
    ("related", "关联资源代码"),
    ("status", "状态"),
    ("withdraw_reason", "撤销原因"),
];

/// The form header of a field.
pub fn label(field: &str) -> &'static str {
    FIELDS
        .iter()
        .find(|(f, _)| *f == field)
        .map_or("", |(_, l)| *l)
}

/// Checks the national form of a resource code: class digit (1-3), item
/// (2 digits), category (3 digits), optional sub-category digits, `/`, and
/// a sequence number.
pub fn check_code(code: &str) -> Result<(), String> {
    let bad = || {
        Err(format!(
            "{code:?} does not have the national form 类(1)项(2)目(3)[细目]/顺序号, for example 101001/00001"
        ))
    };
    let Some((front, seq)) = code.split_once('/') else {
        return bad();
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(front)
        || !digits(seq)
        || front.len() < 6
        || !matches!(front.as_bytes()[0], b'1'..=b'3')
    {
        return bad();
    }
    Ok(())
}

/// Whether a cycle is one the national guide names (not a test duration).
pub fn is_national_cycle(c: UpdateCycle) -> bool {
    !matches!(c, UpdateCycle::Every(_))
}

impl CatalogEntry {
    /// A draft for a shared table, as the agent creates it.
    pub fn draft(code: &ResourceCode, name: &str, provider_code: &str) -> Self {
        CatalogEntry {
            code: code.to_string(),
            name: name.to_string(),
            provider_code: provider_code.to_string(),
            format: Some(ResourceFormat::Table),
            status: Some(Lifecycle::Draft),
            ..CatalogEntry::default()
        }
    }

    /// Every rule the entry breaks, one problem per rule. An entry must have
    /// none to be submitted; a draft may have many.
    pub fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut add = |field: &str, message: String| {
            out.push(Problem {
                field: field.to_string(),
                label: label(field).to_string(),
                message,
            })
        };
        if let Err(m) = check_code(&self.code) {
            add("code", m);
        }
        match self.resource_class {
            None => add(
                "resource_class",
                "is required (base 基础, thematic 主题 or department 部门)".into(),
            ),
            Some(c) => {
                if self
                    .code
                    .chars()
                    .next()
                    .is_some_and(|d| d.is_ascii_digit() && d != c.digit())
                {
                    add(
                        "resource_class",
                        format!(
                            "{} ({}) resources have codes starting with {}, but the code is {}",
                            c.english(),
                            c.chinese(),
                            c.digit(),
                            self.code
                        ),
                    );
                }
            }
        }
        for (field, value) in [
            ("name", &self.name),
            ("summary", &self.summary),
            ("provider", &self.provider),
            ("provider_code", &self.provider_code),
        ] {
            if value.trim().is_empty() {
                add(field, "is required".into());
            }
        }
        if self.format.is_none() {
            add("format", "is required".into());
        }
        if self.data_items.is_empty() {
            add(
                "data_items",
                "at least one data item (信息项) is required".into(),
            );
        }
        for (i, item) in self.data_items.iter().enumerate() {
            if item.name.trim().is_empty() || item.data_type.trim().is_empty() {
                add(
                    "data_items",
                    format!("item {} needs a name and a data type", i + 1),
                );
            }
        }
        match self.share_type {
            None => add("share_type", "is required".into()),
            Some(ShareType::Conditional) => {
                if self.share_conditions.trim().is_empty() {
                    add(
                        "share_conditions",
                        "a conditional share (有条件共享) must state its conditions".into(),
                    );
                }
                if self.legal_basis.trim().is_empty() {
                    add(
                        "legal_basis",
                        "a conditional share (有条件共享) must cite its legal basis".into(),
                    );
                }
            }
            Some(ShareType::NotShared) => {
                if self.legal_basis.trim().is_empty() {
                    add(
                        "legal_basis",
                        "a resource that is not shared (不予共享) must cite its legal basis".into(),
                    );
                }
            }
            Some(ShareType::Unconditional) => {}
        }
        if self.share_type != Some(ShareType::NotShared) && self.share_methods.is_empty() {
            add(
                "share_methods",
                "name at least one share method (比对验证, 查询引用, 批量复制, 库表共享)".into(),
            );
        }
        match self.open_type {
            None => add("open_type", "is required".into()),
            Some(OpenType::Conditional) if self.open_conditions.trim().is_empty() => {
                add(
                    "open_conditions",
                    "a conditional opening (有条件开放) must state its conditions".into(),
                );
            }
            Some(_) => {}
        }
        match self.update_cycle {
            None => add("update_cycle", "is required".into()),
            Some(c) if !is_national_cycle(c) => add(
                "update_cycle",
                format!(
                    "{c} is not a national update cycle: use realtime, daily, weekly, monthly, quarterly, half-yearly, yearly or irregular"
                ),
            ),
            Some(_) => {}
        }
        for r in &self.related {
            if let Err(m) = check_code(r) {
                add("related", m);
            }
        }
        if self.status == Some(Lifecycle::Withdrawn) && self.withdraw_reason.trim().is_empty() {
            add(
                "withdraw_reason",
                "a withdrawn entry must give its reason".into(),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete() -> CatalogEntry {
        CatalogEntry {
            code: "101001/00001".into(),
            resource_class: Some(ResourceClass::Base),
            name: "常住人口登记".into(),
            summary: "辖区常住人口的户籍登记信息".into(),
            provider: "定海区公安分局".into(),
            provider_code: "GA-330902".into(),
            format: Some(ResourceFormat::Table),
            data_items: vec![DataItem {
                name: "id_number".into(),
                data_type: "TEXT".into(),
                length: Some(18),
                description: "公民身份号码".into(),
                sensitive: true,
            }],
            share_type: Some(ShareType::Unconditional),
            share_methods: vec![ShareMethod::Query],
            open_type: Some(OpenType::NotOpen),
            update_cycle: Some(UpdateCycle::Daily),
            status: Some(Lifecycle::Draft),
            ..CatalogEntry::default()
        }
    }

    #[test]
    fn a_complete_entry_has_no_problems() {
        assert_eq!(complete().problems(), vec![]);
    }

    #[test]
    fn one_message_per_broken_rule() {
        let mut e = complete();
        e.share_type = Some(ShareType::Conditional);
        let p = e.problems();
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].field, "share_conditions");
        assert_eq!(p[1].field, "legal_basis");
        assert!(
            p[1].to_string().starts_with(
                "共享依据 (legal_basis): a conditional share (有条件共享) must cite its legal basis"
            ),
            "{}",
            p[1]
        );

        let mut e = complete();
        e.resource_class = Some(ResourceClass::Thematic);
        e.code = "1010/1".into();
        e.update_cycle = Some(UpdateCycle::Every(std::time::Duration::from_secs(3)));
        e.status = Some(Lifecycle::Withdrawn);
        let fields: Vec<String> = e.problems().into_iter().map(|p| p.field).collect();
        assert_eq!(
            fields,
            vec!["code", "resource_class", "update_cycle", "withdraw_reason"]
        );
    }

    #[test]
    fn choices_read_english_and_chinese() {
        assert_eq!(
            "有条件共享".parse::<ShareType>().unwrap(),
            ShareType::Conditional
        );
        assert_eq!(
            "not-shared".parse::<ShareType>().unwrap(),
            ShareType::NotShared
        );
        assert_eq!(
            "库表共享".parse::<ShareMethod>().unwrap(),
            ShareMethod::TableSharing
        );
        let e = "maybe".parse::<ShareType>().unwrap_err().to_string();
        assert!(e.contains("unconditional (无条件共享)"), "{e}");
    }

    #[test]
    fn state_follows_submission_and_review() {
        let mut e = complete();
        assert_eq!(EntryState::of(&e, None), EntryState::Draft);
        e.status = Some(Lifecycle::Submitted);
        e.submitted_at = Some(UnixMillis(100));
        assert_eq!(EntryState::of(&e, None), EntryState::Submitted);
        let mut r = Review {
            status: ReviewStatus::Approved,
            reviewer: "李审核".into(),
            remarks: String::new(),
            reviewed_at: UnixMillis(200),
        };
        assert_eq!(EntryState::of(&e, Some(&r)), EntryState::Published);
        e.submitted_at = Some(UnixMillis(300));
        assert_eq!(
            EntryState::of(&e, Some(&r)),
            EntryState::Submitted,
            "resubmitted after the review"
        );
        r.status = ReviewStatus::Returned;
        r.reviewed_at = UnixMillis(400);
        assert_eq!(EntryState::of(&e, Some(&r)), EntryState::Returned);
    }
}
