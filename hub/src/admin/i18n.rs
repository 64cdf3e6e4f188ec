//! The console's two languages: Chinese (the default, with the terms of the
//! national regulations: 信息资源目录, 更新周期, 零更新, 一致性核验 ...) and
//! English. The language comes from `?lang=`, else from the browser's
//! `Accept-Language`; every label the pages show is a [`Text`] translated by
//! [`Lang::t`].

use crate::admin::view::ResourceState;
use crate::apply::audit::AuditKind;
use crate::apply::verification::RunOrigin;

/// A console language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lang {
    Zh,
    En,
}

impl Lang {
    /// A language from a code such as `zh`, `zh-CN`, `zh_Hans`, `en` or
    /// `en-US` (case-insensitive); `None` for any other language.
    pub fn from_code(code: &str) -> Option<Lang> {
        let primary = code.trim().split(['-', '_']).next().unwrap_or_default();
        if primary.eq_ignore_ascii_case("zh") {
            Some(Lang::Zh)
        } else if primary.eq_ignore_ascii_case("en") {
            Some(Lang::En)
        } else {
            None
        }
    }

    /// The language a browser prefers: the Chinese or English tag with the
    /// highest q-value (the first one on a tie). English only when that tag
    /// is English; Chinese otherwise, also when neither is listed.
    pub fn from_accept_language(header: &str) -> Lang {
        let mut best: Option<(f32, Lang)> = None;
        for item in header.split(',') {
            let mut parts = item.split(';');
            let Some(lang) = parts.next().and_then(Lang::from_code) else {
                continue;
            };
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|v| v.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            if q > 0.0 && best.is_none_or(|(b, _)| q > b) {
                best = Some((q, lang));
            }
        }
        best.map_or(Lang::Zh, |(_, lang)| lang)
    }

    /// The code used in `?lang=`.
    pub fn code(self) -> &'static str {
        match self {
            Lang::Zh => "zh",
            Lang::En => "en",
        }
    }

    /// The value of `<html lang>`.
    pub fn html_lang(self) -> &'static str {
        match self {
            Lang::Zh => "zh-CN",
            Lang::En => "en",
        }
    }

    /// One of two given words: the Chinese or the English one (for values
    /// that carry both, such as the catalog's enumerations).
    pub fn pick(self, zh: &'static str, en: &'static str) -> &'static str {
        match self {
            Lang::Zh => zh,
            Lang::En => en,
        }
    }

    /// A label.
    pub fn t(self, key: Text) -> &'static str {
        let (zh, en) = key.words();
        self.pick(zh, en)
    }

    /// The name of a resource state.
    pub fn state(self, s: ResourceState) -> &'static str {
        match s {
            ResourceState::Diverged => self.pick("不一致", "Diverged"),
            ResourceState::Rejected => self.pick("被拒收", "Rejected"),
            ResourceState::Overdue => self.pick("逾期未更新", "Overdue"),
            ResourceState::Disconnected => self.pick("未连接", "Disconnected"),
            ResourceState::ZeroUpdated => self.pick("零更新", "Zero-updated"),
            ResourceState::OnTime => self.pick("按时更新", "On time"),
            ResourceState::Unknown => self.pick("未知", "Unknown"),
        }
    }

    /// The name of an audit entry's kind.
    pub fn audit_kind(self, k: AuditKind) -> &'static str {
        match k {
            AuditKind::HandshakeRefused => self.pick("拒绝握手", "Handshake refused"),
            AuditKind::BatchRejected => self.pick("拒收批次", "Batch rejected"),
            AuditKind::CatalogRejected => self.pick("拒收目录同步", "Catalog sync rejected"),
            AuditKind::CatalogReviewed => self.pick("目录审核", "Catalog entry reviewed"),
            AuditKind::Enrolled => self.pick("登记密钥", "Key enrolled"),
            AuditKind::Revoked => self.pick("吊销密钥", "Key revoked"),
            AuditKind::KeyRotated => self.pick("密钥轮换", "Key rotated"),
            AuditKind::ClockSkew => self.pick("时钟偏差", "Clock skew"),
            AuditKind::StoreFailed => self.pick("存储写入失败", "Store could not write"),
            AuditKind::LoginLimited => self.pick("登录失败次数超限", "Failed logins limited"),
            AuditKind::ConnectionRefused => self.pick("拒绝连接", "Connection refused"),
            AuditKind::ResyncStarted => self.pick("开始重新读取", "Re-read started"),
            AuditKind::ResyncFinished => self.pick("重新读取完成", "Re-read finished"),
            AuditKind::Diverged => self.pick("核验发现不一致", "Divergence found"),
            AuditKind::Repaired => self.pick("已修复", "Repaired"),
            AuditKind::VerifyRefused => self.pick("无法核验", "Verification refused"),
        }
    }

    /// Who started a verification run.
    pub fn run_origin(self, o: RunOrigin) -> &'static str {
        match o {
            RunOrigin::Hub => self.pick("平台发起", "started at the hub"),
            RunOrigin::Checkpoint => self.pick("检查点不一致触发", "checkpoint mismatch"),
            RunOrigin::Agent => self.pick("部门代理发起", "started by the agent"),
        }
    }

    /// The freshness rule of a resource. `cycle` and `due` are inserted as
    /// given (the caller escapes them; `due` may be markup); `due` is `None`
    /// while nothing has arrived.
    pub fn freshness_rule(self, cycle: &str, grace_secs: u64, due: Option<&str>) -> String {
        match (self, due) {
            (Lang::Zh, Some(due)) => {
                format!("更新周期 {cycle} + 宽限 {grace_secs}s 内须有变更或零更新；截止 {due}")
            }
            (Lang::Zh, None) => {
                format!(
                    "更新周期 {cycle} + 宽限 {grace_secs}s 内须有变更或零更新；尚未收到任何更新"
                )
            }
            (Lang::En, Some(due)) => format!(
                "a change or zero-update is due within cycle {cycle} + grace {grace_secs}s; due by {due}"
            ),
            (Lang::En, None) => format!(
                "a change or zero-update is due within cycle {cycle} + grace {grace_secs}s; nothing received yet"
            ),
        }
    }

    /// How far an instant is from now, `secs` seconds ago (negative: ahead).
    pub fn ago(self, secs: i64) -> String {
        let n = secs.unsigned_abs();
        let (n, zh, en) = match n {
            0..120 => (n, "秒", "s"),
            120..7_200 => (n / 60, "分钟", "min"),
            7_200..172_800 => (n / 3_600, "小时", "h"),
            _ => (n / 86_400, "天", "d"),
        };
        match (self, secs < 0) {
            (Lang::Zh, false) => format!("{n} {zh}前"),
            (Lang::Zh, true) => format!("{n} {zh}后"),
            (Lang::En, false) => format!("{n} {en} ago"),
            (Lang::En, true) => format!("in {n} {en}"),
        }
    }

    /// The state of the link to the parent hub (`connecting`, `connected`,
    /// `disconnected`, `refused`); `None` for another word.
    pub fn link(self, link: &str) -> Option<&'static str> {
        Some(match link {
            "connecting" => self.pick("连接中", "connecting"),
            "connected" => self.pick("已连接", "connected"),
            "disconnected" => self.pick("已断开", "disconnected"),
            "refused" => self.pick("被上级拒绝", "refused by the parent"),
            _ => return None,
        })
    }

    /// A feed whose data stays at a hub, and why: at this hub (`here`) or
    /// at the hub of a tree row. `reason` is inserted as given (the caller
    /// escapes it).
    pub fn held(self, here: bool, reason: &str) -> String {
        match (self, here) {
            (Lang::Zh, true) => format!("留存本级：{reason}"),
            (Lang::Zh, false) => format!("留存该级：{reason}"),
            (Lang::En, true) => format!("held here: {reason}"),
            (Lang::En, false) => format!("held there: {reason}"),
        }
    }

    /// How to federate hubs, for a hub with neither a parent nor a child.
    /// `upstream` and `enroll` (the config section and the command) are
    /// inserted as given (the caller escapes them; they may be markup).
    pub fn federation_setup(self, upstream: &str, enroll: &str) -> String {
        match self {
            Lang::Zh => format!(
                "本平台尚未级联。在下级平台的 hub.toml 中加入 {upstream} 段（上级平台的地址和密钥），并在上级平台用 {enroll} 登记下级平台的密钥。"
            ),
            Lang::En => format!(
                "This hub is not federated. On the child hub, add an {upstream} section (the parent's address and key) to hub.toml; on the parent, enroll the child's key with {enroll}."
            ),
        }
    }

    /// "showing N of TOTAL".
    pub fn showing(self, shown: usize, total: u64) -> String {
        match self {
            Lang::Zh => format!("显示 {shown} 条，共 {total} 条"),
            Lang::En => format!("showing {shown} of {total}"),
        }
    }
}

/// Every audit kind, in the order the audit filter lists them. A new
/// [`AuditKind`] must be added here too ([`Lang::audit_kind`] forces its
/// translation).
pub const AUDIT_KINDS: [AuditKind; 16] = [
    AuditKind::HandshakeRefused,
    AuditKind::ConnectionRefused,
    AuditKind::Enrolled,
    AuditKind::KeyRotated,
    AuditKind::Revoked,
    AuditKind::ClockSkew,
    AuditKind::StoreFailed,
    AuditKind::LoginLimited,
    AuditKind::BatchRejected,
    AuditKind::ResyncStarted,
    AuditKind::ResyncFinished,
    AuditKind::Diverged,
    AuditKind::Repaired,
    AuditKind::VerifyRefused,
    AuditKind::CatalogRejected,
    AuditKind::CatalogReviewed,
];

/// Declares [`Text`] with each label's Chinese and English words.
macro_rules! texts {
    ($($key:ident => ($zh:literal, $en:literal $(,)?)),+ $(,)?) => {
        /// A console label; [`Lang::t`] translates it.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Text { $($key),+ }

        impl Text {
            /// Every label.
            pub const ALL: &'static [Text] = &[$(Text::$key),+];

            fn words(self) -> (&'static str, &'static str) {
                match self { $(Text::$key => ($zh, $en)),+ }
            }
        }
    };
}

texts! {
    // Navigation and layout.
    Overview => ("总览", "Overview"),
    Audit => ("审计日志", "Audit log"),
    Catalog => ("信息资源目录", "Resource catalog"),
    LogOut => ("退出登录", "Log out"),
    Language => ("语言", "Language"),
    Software => ("软件版本", "Software"),
    HubKey => ("平台密钥", "Hub key"),
    StartedAt => ("启动时间", "Started"),
    BackToOverview => ("返回总览", "Back to the overview"),
    // Overview.
    Agents => ("部门代理", "Agents"),
    Online => ("在线", "online"),
    Offline => ("离线", "offline"),
    ResourcesByState => ("信息资源状态", "Resources by state"),
    ChangesPerSecond => ("每秒变更数", "Changes per second"),
    Backlog => ("待发送积压（批次）", "Outbox backlog (batches)"),
    MaxLag => ("最大滞后", "Max lag"),
    Latest => ("最新", "latest"),
    NoHistory => ("暂无历史数据", "no history yet"),
    StoreCannotWrite => ("存储无法写入", "The store cannot write"),
    StoreCannotWriteDetail => (
        "所有批次均以“暂不可用”拒收，未确认任何批次；各部门代理保留并重发。平台会反复重新打开存储，腾出数据目录空间后自动恢复。",
        "every batch is refused as unavailable and none is acknowledged; agents keep and resend them. The hub reopens the store until it writes again: free space in its data directory."
    ),
    FailingSince => ("起始于", "since"),
    StoreCannotRead => ("存储无法读取，部门与信息资源暂不显示", "The store cannot be read: departments and resources are not shown"),
    Departments => ("部门", "Departments"),
    NoDepartments => ("尚未登记任何部门", "No department is enrolled yet"),
    WorstState => ("最紧急状态", "Worst state"),
    ResourceCount => ("信息资源数", "Resources"),
    // Departments and agents.
    Department => ("部门", "Department"),
    Code => ("代码", "Code"),
    Name => ("名称", "Name"),
    AgentKey => ("代理密钥", "Agent key"),
    Connected => ("已连接", "Connected"),
    Since => ("连接时间", "Since"),
    Remote => ("远端地址", "Remote address"),
    OutboxBatches => ("积压批次", "Outbox batches"),
    OutboxBytes => ("积压字节", "Outbox bytes"),
    OutboxLimit => ("积压上限", "Outbox limit"),
    CapturePaused => ("采集已暂停", "Capture paused"),
    NoAgents => ("尚未登记代理", "No agent is enrolled"),
    Yes => ("是", "yes"),
    No => ("否", "no"),
    // Resources.
    Resources => ("信息资源", "Resources"),
    Resource => ("信息资源", "Resource"),
    NoResources => ("暂无信息资源", "No resource yet"),
    Table => ("数据表", "Table"),
    State => ("状态", "State"),
    UpdateCycle => ("更新周期", "Update cycle"),
    NotDeclared => ("未声明", "not declared"),
    FreshnessRule => ("时效规则", "Freshness rule"),
    LastChange => ("最近变更", "Last change"),
    LastZeroUpdate => ("最近零更新", "Last zero-update"),
    LastBatch => ("最近收到批次", "Last batch received"),
    Lag => ("滞后", "Lag"),
    Batches => ("批次", "batches"),
    Seconds => ("秒", "s"),
    Rows => ("行数", "Rows"),
    LastSeq => ("最新序号", "Last seq"),
    BatchesApplied => ("已应用批次", "Batches applied"),
    ChangesApplied => ("已应用变更", "Changes applied"),
    Rejected => ("被拒收", "Rejected"),
    LastRejection => ("最近拒收", "Last rejection"),
    Signer => ("签名密钥", "Signer"),
    Feed => ("数据流", "Feed"),
    Resync => ("重新读取", "Re-read"),
    Running => ("进行中", "running"),
    Finished => ("已完成", "finished"),
    Verification => ("一致性核验", "Verification"),
    Verdict => ("核验结论", "Verdict"),
    Unverified => ("未核验", "unverified"),
    // Resource page.
    NotCatalogued => (
        "该部门尚未在信息资源目录中编目此信息资源。",
        "The department has not catalogued this resource.",
    ),
    Summary => ("信息资源摘要", "Summary"),
    Provider => ("信息资源提供方", "Provider"),
    ResourceClass => ("信息资源分类", "Resource class"),
    Format => ("信息资源格式", "Format"),
    ShareType => ("共享类型", "Share type"),
    ShareConditions => ("共享条件", "Share conditions"),
    LegalBasis => ("共享依据", "Legal basis"),
    ShareMethods => ("共享方式", "Share methods"),
    OpenType => ("开放属性", "Open attribute"),
    OpenConditions => ("开放条件", "Open conditions"),
    DataItems => ("信息项", "Data items"),
    DataType => ("数据类型", "Data type"),
    Length => ("数据长度", "Length"),
    Description => ("描述", "Description"),
    Sensitive => ("敏感", "Sensitive"),
    EntryState => ("目录状态", "Entry state"),
    Review => ("审核", "Review"),
    Reviewer => ("审核人", "Reviewer"),
    Remarks => ("审核意见", "Remarks"),
    NotReviewed => ("未审核", "not reviewed"),
    Problems => ("问题", "Problems"),
    Checkpoint => ("检查点", "Checkpoint"),
    Matched => ("一致", "matched"),
    DifferingSince => ("不一致，起始序号", "differing since seq"),
    RunInProgress => ("进行中的核验", "Run in progress"),
    LastRun => ("最近一次核验", "Last run"),
    Run => ("核验编号", "Run"),
    Reason => ("原因", "Reason"),
    StartedSeq => ("起始序号", "Started at seq"),
    RangesCompared => ("已比对区间", "Ranges compared"),
    RangesDiffering => ("不一致区间", "Ranges differing"),
    RangesPending => ("待比对区间", "Ranges pending"),
    Unresolved => ("未解决区间", "Unresolved ranges"),
    RowsRepaired => ("已修复行", "Rows rewritten"),
    RowsRemoved => ("已删除行", "Rows removed"),
    BytesExchanged => ("收发字节", "Bytes received / sent"),
    Keys => ("涉及主键", "Keys"),
    Outcome => ("结论", "Outcome"),
    Verified => ("核验通过", "verified"),
    NotVerified => ("未通过", "not verified"),
    ComparisonRefused => ("无法比对", "comparison not possible"),
    NoVerification => ("尚未核验", "not verified yet"),
    RecentBatches => ("最近批次", "Recent batches"),
    NoBatches => ("暂无批次", "No batch yet"),
    Seq => ("序号", "Seq"),
    SealedAt => ("封装时间", "Sealed"),
    Changes => ("变更数", "Changes"),
    ZeroUpdate => ("零更新", "Zero-update"),
    OtherEntries => ("其他条目", "Other entries"),
    Bytes => ("字节", "Bytes"),
    Hash => ("哈希", "Hash"),
    SampleRows => ("数据样本", "Sample rows"),
    NoRows => ("暂无数据", "No rows"),
    // Audit log.
    Kind => ("类型", "Kind"),
    AllKinds => ("全部类型", "All kinds"),
    Search => ("搜索详情", "Search details"),
    Limit => ("条数上限", "Limit"),
    Filter => ("筛选", "Filter"),
    Id => ("编号", "ID"),
    Time => ("时间", "Time"),
    Peer => ("对端", "Peer"),
    Detail => ("详情", "Detail"),
    NoEntries => ("没有符合条件的记录", "No matching entries"),
    // Catalog.
    Any => ("全部", "Any"),
    Approve => ("审核通过", "Approve"),
    Return => ("退回修改", "Return"),
    ReviewerRequired => ("审核人（必填）", "Reviewer (required)"),
    Actions => ("操作", "Actions"),
    RemarksRequired => ("审核意见（退回时必填）", "Remarks (required to return)"),
    // Federation.
    Federation => ("级联", "Federation"),
    Upstream => ("上级平台", "Upstream"),
    ChildHubs => ("下级平台", "Child hubs"),
    FederationTree => ("级联树", "Tree"),
    ParentKey => ("上级平台密钥", "Parent key"),
    Address => ("地址", "Address"),
    Link => ("连接状态", "Link"),
    LastError => ("最近错误", "Last error"),
    ParentSoftware => ("上级平台软件版本", "Parent software"),
    RefusedByParent => ("被上级拒收批次", "Batches refused by the parent"),
    CatalogError => ("目录同步错误", "Catalog sync error"),
    HeadHere => ("本级最新序号", "Head here"),
    ParentHolds => ("上级已确认序号", "Parent holds"),
    ForwardBacklog => ("待转发批次", "Backlog (batches)"),
    PlatformCode => ("平台代码", "Platform code"),
    Hub => ("平台", "Hub"),
    HeadThere => ("该级最新序号", "Head there"),
    HeadAbove => ("上一级最新序号", "Head one level up"),
    DepartmentsBelow => ("下辖部门", "Departments below"),
    NoChildHubs => ("尚未登记下级平台", "No child hub is enrolled here"),
    NoTreeReport => (
        "下级平台尚未报告其数据流",
        "The child hubs have not reported their feeds yet",
    ),
    // Login and messages.
    Login => ("登录", "Log in"),
    Account => ("账号", "Name"),
    Password => ("密码", "Password"),
    WrongPassword => ("密码错误", "Wrong password"),
    NotFound => ("未找到", "Not found"),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_language_picks_the_best_of_chinese_and_english() {
        assert_eq!(
            Lang::from_accept_language("en-US,en;q=0.9,zh;q=0.8"),
            Lang::En
        );
        assert_eq!(Lang::from_accept_language("zh-CN,zh;q=0.9"), Lang::Zh);
        assert_eq!(Lang::from_accept_language("zh;q=0.5, en;q=0.7"), Lang::En);
        assert_eq!(Lang::from_accept_language("fr-FR,en;q=0.3"), Lang::En);
        assert_eq!(Lang::from_accept_language("en;q=0, zh;q=0.1"), Lang::Zh);
        assert_eq!(Lang::from_accept_language("fr"), Lang::Zh);
        assert_eq!(Lang::from_accept_language("*"), Lang::Zh);
        assert_eq!(Lang::from_accept_language(""), Lang::Zh);
    }

    #[test]
    fn codes() {
        assert_eq!(Lang::from_code("zh"), Some(Lang::Zh));
        assert_eq!(Lang::from_code("zh-CN"), Some(Lang::Zh));
        assert_eq!(Lang::from_code("ZH_hans"), Some(Lang::Zh));
        assert_eq!(Lang::from_code("en"), Some(Lang::En));
        assert_eq!(Lang::from_code("en-GB"), Some(Lang::En));
        assert_eq!(Lang::from_code("fr"), None);
        assert_eq!(Lang::from_code(""), None);
        for lang in [Lang::Zh, Lang::En] {
            assert_eq!(Lang::from_code(lang.code()), Some(lang));
            assert_eq!(Lang::from_code(lang.html_lang()), Some(lang));
        }
    }

    #[test]
    fn every_label_is_translated() {
        let mut seen = std::collections::BTreeSet::new();
        for &key in Text::ALL {
            let (zh, en) = (Lang::Zh.t(key), Lang::En.t(key));
            assert!(!zh.is_empty() && !en.is_empty(), "{key:?}");
            assert_ne!(zh, en, "{key:?}");
            assert!(seen.insert((zh, en)), "{key:?} repeats another label");
        }
        for s in ResourceState::ALL {
            assert_ne!(Lang::Zh.state(s), Lang::En.state(s));
        }
        let zh: std::collections::BTreeSet<_> = AUDIT_KINDS
            .iter()
            .map(|k| Lang::Zh.audit_kind(*k))
            .collect();
        assert_eq!(zh.len(), AUDIT_KINDS.len());
    }

    #[test]
    fn link_states_are_translated() {
        for link in ["connecting", "connected", "disconnected", "refused"] {
            let (zh, en) = (Lang::Zh.link(link), Lang::En.link(link));
            assert!(zh.is_some() && en.is_some() && zh != en, "{link}");
        }
        assert_eq!(Lang::En.link("sideways"), None);
        assert_eq!(Lang::Zh.held(true, "x"), "留存本级：x");
        assert_eq!(Lang::En.held(false, "x"), "held there: x");
    }

    #[test]
    fn relative_times() {
        assert_eq!(Lang::En.ago(5), "5 s ago");
        assert_eq!(Lang::Zh.ago(5), "5 秒前");
        assert_eq!(Lang::En.ago(-3), "in 3 s");
        assert_eq!(Lang::En.ago(600), "10 min ago");
        assert_eq!(Lang::Zh.ago(3 * 86_400), "3 天前");
    }
}
