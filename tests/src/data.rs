//! Made-up but realistic department records for tests, the demo and the
//! benchmark: household registrations keyed by ID-card number, business
//! licences keyed by unified social credit code, land parcels keyed by
//! district and parcel number. Identifiers carry valid check characters.

use rusqlite::{Connection, params};

/// A small deterministic random source (xorshift64*).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

const SURNAMES: &[&str] = &[
    "王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "徐", "孙", "马", "朱", "胡", "郭",
    "何", "林", "罗", "郑",
];
const GIVEN: &[&str] = &[
    "伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明",
    "超", "秀英", "华", "建国", "海燕", "志强",
];
const STREETS: &[&str] = &[
    "解放路",
    "人民路",
    "新城大道",
    "海天大道",
    "环城南路",
    "东海西路",
    "千岛路",
    "翁山路",
];
const DISTRICTS: &[&str] = &["定海区", "普陀区", "岱山县", "嵊泗县"];
const LAND_USE: &[&str] = &[
    "住宅用地",
    "商业用地",
    "工业用地",
    "耕地",
    "林地",
    "公共管理与公共服务用地",
];
const BUSINESS: &[&str] = &[
    "水产品加工",
    "船舶修造",
    "港口物流",
    "海洋旅游",
    "软件开发",
    "餐饮服务",
    "建筑工程",
];
const LICENCE_STATUS: &[&str] = &["存续", "在业", "迁出", "注销"];

pub fn chinese_name(rng: &mut Rng) -> String {
    format!("{}{}", rng.pick(SURNAMES), rng.pick(GIVEN))
}

/// An 18-digit resident ID number (公民身份号码) with a valid check digit.
pub fn id_number(rng: &mut Rng) -> String {
    let region = *rng.pick(&["330902", "330903", "330921", "330922"]);
    let year = 1940 + rng.below(80);
    let month = 1 + rng.below(12);
    let day = 1 + rng.below(28);
    let seq = rng.below(1000);
    let body = format!("{region}{year:04}{month:02}{day:02}{seq:03}");
    format!("{body}{}", id_check(&body))
}

/// The check character of the first 17 digits of an ID number (GB 11643).
pub fn id_check(body: &str) -> char {
    const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let sum: u32 = body
        .bytes()
        .zip(W)
        .map(|(b, w)| u32::from(b - b'0') * w)
        .sum();
    char::from(CHECK[(sum % 11) as usize])
}

/// An 18-character unified social credit code (统一社会信用代码) with a valid
/// check character.
pub fn credit_code(rng: &mut Rng) -> String {
    let mut body = String::from("91330902");
    for _ in 0..9 {
        body.push(char::from(CREDIT_CHARS[rng.below(31) as usize]));
    }
    let check = credit_check(&body);
    body.push(check);
    body
}

const CREDIT_CHARS: &[u8; 31] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";

/// The check character of the first 17 characters of a unified social
/// credit code (GB 32100).
pub fn credit_check(body: &str) -> char {
    const W: [u64; 17] = [
        1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28,
    ];
    let sum: u64 = body
        .bytes()
        .zip(W)
        .map(|(b, w)| CREDIT_CHARS.iter().position(|c| *c == b).unwrap_or(0) as u64 * w)
        .sum();
    char::from(CREDIT_CHARS[((31 - sum % 31) % 31) as usize])
}

fn date(rng: &mut Rng, from: u64, years: u64) -> String {
    format!(
        "{:04}-{:02}-{:02}",
        from + rng.below(years),
        1 + rng.below(12),
        1 + rng.below(28)
    )
}

/// The public-security department's household registrations (户籍).
pub const HOUSEHOLD_DDL: &str = "CREATE TABLE household (
    id_number TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    gender TEXT,
    birth_date TEXT,
    address TEXT,
    household_no TEXT,
    photo BLOB,
    updated_at TEXT
)";

/// The market regulator's business licences (营业执照).
pub const LICENCE_DDL: &str = "CREATE TABLE business_licence (
    credit_code TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    legal_rep TEXT,
    reg_capital TEXT,
    established TEXT,
    status TEXT,
    scope TEXT,
    employees INTEGER
)";

/// The natural-resources bureau's land parcels (宗地), keyed by district and
/// parcel number.
pub const PARCEL_DDL: &str = "CREATE TABLE land_parcel (
    district TEXT NOT NULL,
    parcel_no INTEGER NOT NULL,
    area_m2 REAL,
    land_use TEXT,
    holder TEXT,
    boundary BLOB,
    PRIMARY KEY (district, parcel_no)
)";

/// Planning permits (建设工程规划许可): the demo's quiet resource.
pub const PERMIT_DDL: &str = "CREATE TABLE planning_permit (
    permit_no TEXT PRIMARY KEY,
    project TEXT,
    issued TEXT
)";

pub fn insert_household(conn: &Connection, rng: &mut Rng) -> rusqlite::Result<String> {
    let id = id_number(rng);
    let birth = format!("{}-{}-{}", &id[6..10], &id[10..12], &id[12..14]);
    let gender = if (id.as_bytes()[16] - b'0') % 2 == 1 {
        "男"
    } else {
        "女"
    };
    let photo: Option<Vec<u8>> =
        (rng.below(3) == 0).then(|| (0..16).map(|_| rng.below(256) as u8).collect());
    conn.execute(
        "INSERT OR IGNORE INTO household VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, datetime('now'))",
        params![
            id,
            chinese_name(rng),
            gender,
            birth,
            format!(
                "舟山市{}{}{}号",
                rng.pick(DISTRICTS),
                rng.pick(STREETS),
                1 + rng.below(300)
            ),
            format!("{:09}", rng.below(1_000_000_000)),
            photo,
        ],
    )?;
    Ok(id)
}

pub fn insert_licence(conn: &Connection, rng: &mut Rng) -> rusqlite::Result<String> {
    let code = credit_code(rng);
    let name = format!(
        "舟山{}{}有限公司",
        rng.pick(&["海星", "东港", "蓝湾", "千岛", "金塘", "六横"]),
        rng.pick(BUSINESS)
    );
    conn.execute(
        "INSERT OR IGNORE INTO business_licence VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            code,
            name,
            chinese_name(rng),
            format!("{}.{:02}", 10_000 * (1 + rng.below(500)), rng.below(100)),
            date(rng, 1995, 30),
            rng.pick(LICENCE_STATUS),
            rng.pick(BUSINESS),
            i64::try_from(rng.below(2000)).unwrap_or(0),
        ],
    )?;
    Ok(code)
}

pub fn insert_parcel(conn: &Connection, rng: &mut Rng) -> rusqlite::Result<()> {
    let boundary: Vec<u8> = (0..8 * (3 + rng.below(5)))
        .map(|_| rng.below(256) as u8)
        .collect();
    conn.execute(
        "INSERT OR IGNORE INTO land_parcel VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            rng.pick(DISTRICTS),
            i64::try_from(rng.below(1_000_000)).unwrap_or(0),
            (rng.below(10_000_000) as f64) / 100.0,
            rng.pick(LAND_USE),
            chinese_name(rng),
            boundary,
        ],
    )?;
    Ok(())
}

/// One random change to a department table: mostly inserts and updates,
/// some deletes. Returns the kind of change made.
pub fn churn_one(conn: &Connection, table: &str, rng: &mut Rng) -> rusqlite::Result<&'static str> {
    let roll = rng.below(10);
    let count: i64 = conn.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))?;
    if roll < 5 || count < 10 {
        match table {
            "household" => insert_household(conn, rng).map(|_| ()),
            "business_licence" => insert_licence(conn, rng).map(|_| ()),
            "land_parcel" => insert_parcel(conn, rng),
            other => panic!("no generator for {other}"),
        }?;
        return Ok("insert");
    }
    let offset = i64::try_from(rng.below(u64::try_from(count).unwrap_or(1))).unwrap_or(0);
    let rowid: i64 = conn.query_row(
        &format!("SELECT rowid FROM {table} LIMIT 1 OFFSET ?1"),
        [offset],
        |r| r.get(0),
    )?;
    if roll < 8 {
        let sql = match table {
            "household" => {
                "UPDATE household SET address = ?2, updated_at = datetime('now') WHERE rowid = ?1"
            }
            "business_licence" => "UPDATE business_licence SET status = ?2 WHERE rowid = ?1",
            "land_parcel" => "UPDATE land_parcel SET holder = ?2 WHERE rowid = ?1",
            other => panic!("no generator for {other}"),
        };
        let value = match table {
            "household" => format!(
                "舟山市{}{}{}号",
                rng.pick(DISTRICTS),
                rng.pick(STREETS),
                1 + rng.below(300)
            ),
            "business_licence" => rng.pick(LICENCE_STATUS).to_string(),
            _ => chinese_name(rng),
        };
        conn.execute(sql, params![rowid, value])?;
        Ok("update")
    } else {
        conn.execute(&format!("DELETE FROM {table} WHERE rowid = ?1"), [rowid])?;
        Ok("delete")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers_have_valid_check_characters() {
        // The example of GB 11643, and two published credit codes.
        assert_eq!(id_check("11010519491231002"), 'X');
        assert_eq!(credit_check("9144030071526726X"), 'G');
        assert_eq!(credit_check("91440300708461136"), 'T');
        let mut rng = Rng::new(1);
        let id = id_number(&mut rng);
        assert_eq!(id.len(), 18);
        assert_eq!(id.chars().last(), Some(id_check(&id[..17])));
        let code = credit_code(&mut rng);
        assert_eq!(code.len(), 18);
        assert_eq!(code.chars().last(), Some(credit_check(&code[..17])));
    }
}
