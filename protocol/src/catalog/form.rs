//! The catalog fill-in form: CSV with the Chinese column headers of the
//! national form (one row per resource), and TOML (one `[[entry]]` table
//! per resource) for people who prefer a text file.
//!
//! Data items travel in one CSV cell as `name:type(length):description`,
//! separated by `;`, with a trailing `:敏感` on sensitive items, e.g.
//! `id_number:TEXT(18):公民身份号码:敏感; name:TEXT:姓名`.
//!
//! Invariant: reading a form either yields every entry or reports every bad
//! cell by row and column, and yields nothing.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{CatalogEntry, DataItem, Problem, label};

/// The CSV columns in form order: header and the field they hold.
pub const COLUMNS: &[(&str, &str)] = &[
    ("信息资源代码", "code"),
    ("信息资源名称", "name"),
    ("信息资源分类", "resource_class"),
    ("信息资源提供方", "provider"),
    ("信息资源提供方代码", "provider_code"),
    ("信息资源摘要", "summary"),
    ("信息资源格式", "format"),
    ("信息项信息", "data_items"),
    ("共享类型", "share_type"),
    ("共享条件", "share_conditions"),
    ("共享依据", "legal_basis"),
    ("共享方式", "share_methods"),
    ("开放属性", "open_type"),
    ("开放条件", "open_conditions"),
    ("更新周期", "update_cycle"),
    ("关联资源代码", "related"),
    ("状态", "status"),
    ("撤销原因", "withdraw_reason"),
];

/// Columns a form may carry that are not the department's to set: they are
/// checked and otherwise ignored on import (the platform's export adds them).
pub const READ_ONLY_COLUMNS: &[(&str, &str)] = &[("发布日期", "publish_date")];

/// One bad cell (or a bad file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormError {
    /// The data row, counting from 1 (the header is row 0); 0 for the file.
    pub row: usize,
    /// The column header, or empty for the whole row or file.
    pub column: String,
    pub message: String,
}

impl fmt::Display for FormError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.row, self.column.is_empty()) {
            (0, _) => write!(f, "{}", self.message),
            (r, true) => write!(f, "row {r}: {}", self.message),
            (r, false) => write!(f, "row {r}, column {}: {}", self.column, self.message),
        }
    }
}

/// All the problems of a form, one per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the form was not imported:\n{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct FormErrors(pub Vec<FormError>);

/// Sets one field of an entry from its text form, as typed in a form cell
/// or on the command line. Enumerations accept English or Chinese names;
/// lists are separated by `;` (or `,`); an empty value clears the field.
pub fn set_field(entry: &mut CatalogEntry, field: &str, value: &str) -> Result<(), String> {
    let v = value.trim();
    let list = |v: &str| -> Vec<String> {
        v.split([';', ',', '；', '，'])
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect()
    };
    fn parse<T: std::str::FromStr>(v: &str) -> Result<Option<T>, String>
    where
        T::Err: fmt::Display,
    {
        if v.is_empty() {
            Ok(None)
        } else {
            v.parse().map(Some).map_err(|e: T::Err| e.to_string())
        }
    }
    match field {
        "code" => entry.code = v.to_string(),
        "name" => entry.name = v.to_string(),
        "summary" => entry.summary = v.to_string(),
        "provider" => entry.provider = v.to_string(),
        "provider_code" => entry.provider_code = v.to_string(),
        "share_conditions" => entry.share_conditions = v.to_string(),
        "legal_basis" => entry.legal_basis = v.to_string(),
        "open_conditions" => entry.open_conditions = v.to_string(),
        "withdraw_reason" => entry.withdraw_reason = v.to_string(),
        "resource_class" => entry.resource_class = parse(v)?,
        "format" => entry.format = parse(v)?,
        "share_type" => entry.share_type = parse(v)?,
        "open_type" => entry.open_type = parse(v)?,
        "update_cycle" => entry.update_cycle = parse(v)?,
        "status" => entry.status = parse(v)?,
        "share_methods" => {
            entry.share_methods = list(v)
                .iter()
                .map(|m| m.parse().map_err(|e: super::ChoiceError| e.to_string()))
                .collect::<Result<_, _>>()?;
        }
        "related" => entry.related = list(v),
        "data_items" => entry.data_items = parse_items(v)?,
        // The platform sets the publish date when it approves an entry; a
        // form may carry the date of an earlier publication, which is kept
        // out of the department's fields.
        "publish_date" => {
            if !v.is_empty() && crate::value::Value::Date(v.to_string()).check().is_err() {
                return Err(format!("{v:?} is not a date YYYY-MM-DD"));
            }
        }
        other => {
            return Err(format!(
                "unknown field {other:?}; fields are {}",
                super::FIELDS
                    .iter()
                    .map(|(f, _)| *f)
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    Ok(())
}

/// Parses the data-item cell.
pub fn parse_items(cell: &str) -> Result<Vec<DataItem>, String> {
    let mut items = Vec::new();
    for (i, part) in cell
        .split([';', '；'])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .enumerate()
    {
        let mut fields = part.split([':', '：']).map(str::trim);
        let name = fields.next().unwrap_or_default().to_string();
        let ty = fields.next().unwrap_or_default();
        let (data_type, length) = match ty.split_once('(') {
            Some((t, rest)) => {
                let n = rest.trim_end_matches(')').trim();
                let len = n
                    .split(',')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .parse::<u32>()
                    .map_err(|_| format!("item {}: length {n:?} is not a number", i + 1))?;
                (t.trim().to_string(), Some(len))
            }
            None => (ty.to_string(), None),
        };
        let mut rest: Vec<&str> = fields.collect();
        let sensitive = matches!(rest.last(), Some(&("敏感" | "sensitive")));
        if sensitive {
            rest.pop();
        }
        if name.is_empty() || data_type.is_empty() {
            return Err(format!("item {} ({part:?}) needs NAME:TYPE", i + 1));
        }
        items.push(DataItem {
            name,
            data_type,
            length,
            description: rest.join(":"),
            sensitive,
        });
    }
    Ok(items)
}

/// The data-item cell of an entry.
pub fn format_items(items: &[DataItem]) -> String {
    items
        .iter()
        .map(|i| {
            let mut s = format!("{}:{}", i.name, i.data_type);
            if let Some(l) = i.length {
                s.push_str(&format!("({l})"));
            }
            if !i.description.is_empty() || i.sensitive {
                s.push(':');
                s.push_str(&i.description);
            }
            if i.sensitive {
                s.push_str(":敏感");
            }
            s
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// One field of an entry as form text (Chinese names for enumerations).
pub fn field_text(e: &CatalogEntry, field: &str) -> String {
    match field {
        "code" => e.code.clone(),
        "name" => e.name.clone(),
        "summary" => e.summary.clone(),
        "provider" => e.provider.clone(),
        "provider_code" => e.provider_code.clone(),
        "share_conditions" => e.share_conditions.clone(),
        "legal_basis" => e.legal_basis.clone(),
        "open_conditions" => e.open_conditions.clone(),
        "withdraw_reason" => e.withdraw_reason.clone(),
        "resource_class" => e
            .resource_class
            .map(|c| c.chinese().to_string())
            .unwrap_or_default(),
        "format" => e
            .format
            .map(|c| c.chinese().to_string())
            .unwrap_or_default(),
        "share_type" => e
            .share_type
            .map(|c| c.chinese().to_string())
            .unwrap_or_default(),
        "open_type" => e
            .open_type
            .map(|c| c.chinese().to_string())
            .unwrap_or_default(),
        "update_cycle" => e
            .update_cycle
            .map(|c| match c {
                crate::UpdateCycle::Every(_) => c.to_string(),
                named => named.chinese().to_string(),
            })
            .unwrap_or_default(),
        "status" => e
            .status
            .map(|c| c.chinese().to_string())
            .unwrap_or_default(),
        "share_methods" => e
            .share_methods
            .iter()
            .map(|m| m.chinese())
            .collect::<Vec<_>>()
            .join(";"),
        "related" => e.related.join(";"),
        "data_items" => format_items(&e.data_items),
        _ => String::new(),
    }
}

/// Writes entries as a CSV form with the Chinese headers, plus any extra
/// columns (header, value per entry) after them.
pub fn write_csv(
    entries: &[CatalogEntry],
    extra: &[(&str, Vec<String>)],
    out: &mut dyn std::io::Write,
) -> Result<(), csv::Error> {
    let mut w = csv::Writer::from_writer(out);
    let mut header: Vec<&str> = COLUMNS.iter().map(|(h, _)| *h).collect();
    header.extend(extra.iter().map(|(h, _)| *h));
    w.write_record(&header)?;
    for (i, e) in entries.iter().enumerate() {
        let mut row: Vec<String> = COLUMNS.iter().map(|(_, f)| field_text(e, f)).collect();
        row.extend(
            extra
                .iter()
                .map(|(_, v)| v.get(i).cloned().unwrap_or_default()),
        );
        w.write_record(&row)?;
    }
    w.flush()?;
    Ok(())
}

/// Reads a CSV form. Columns are found by their header (in any order;
/// unknown columns are refused); every bad cell is reported by row and
/// column, and nothing is returned unless every row is good. Rows are
/// checked for well-formed values only: completeness is checked when an
/// entry is submitted.
pub fn read_csv(input: &[u8]) -> Result<Vec<CatalogEntry>, FormErrors> {
    let input = input.strip_prefix("\u{feff}".as_bytes()).unwrap_or(input);
    let mut r = csv::ReaderBuilder::new().flexible(false).from_reader(input);
    let file_err = |m: String| {
        FormErrors(vec![FormError {
            row: 0,
            column: String::new(),
            message: m,
        }])
    };
    let headers = r
        .headers()
        .map_err(|e| file_err(format!("cannot read the header row: {e}")))?
        .clone();
    let mut fields = Vec::new();
    for h in headers.iter() {
        let h = h.trim();
        match COLUMNS
            .iter()
            .chain(READ_ONLY_COLUMNS)
            .find(|(label, key)| *label == h || *key == h)
        {
            Some((_, key)) => fields.push(*key),
            None => {
                return Err(file_err(format!(
                    "unknown column {h:?}; the form's columns are {}",
                    COLUMNS
                        .iter()
                        .map(|(l, _)| *l)
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        }
    }
    if !fields.contains(&"code") {
        return Err(file_err(
            "the form has no 信息资源代码 (code) column".into(),
        ));
    }
    let mut entries = Vec::new();
    let mut errors = Vec::new();
    for (i, record) in r.records().enumerate() {
        let row = i + 1;
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                errors.push(FormError {
                    row,
                    column: String::new(),
                    message: e.to_string(),
                });
                continue;
            }
        };
        let mut e = CatalogEntry::default();
        for (field, cell) in fields.iter().zip(record.iter()) {
            if let Err(m) = set_field(&mut e, field, cell) {
                let column = READ_ONLY_COLUMNS
                    .iter()
                    .find(|(_, k)| k == field)
                    .map_or_else(|| label(field), |(l, _)| *l);
                errors.push(FormError {
                    row,
                    column: column.to_string(),
                    message: m,
                });
            }
        }
        if let Err(m) = super::check_code(&e.code) {
            errors.push(FormError {
                row,
                column: label("code").to_string(),
                message: m,
            });
        }
        if entries.iter().any(|x: &CatalogEntry| x.code == e.code) {
            errors.push(FormError {
                row,
                column: label("code").to_string(),
                message: format!("{} appears twice in the form", e.code),
            });
        }
        entries.push(e);
    }
    if errors.is_empty() {
        Ok(entries)
    } else {
        Err(FormErrors(errors))
    }
}

#[derive(Serialize, Deserialize)]
struct TomlForm {
    #[serde(default, rename = "entry")]
    entries: Vec<CatalogEntry>,
}

/// Writes entries as TOML (`[[entry]]` tables with English keys).
pub fn write_toml(entries: &[CatalogEntry]) -> Result<String, String> {
    toml::to_string_pretty(&TomlForm {
        entries: entries.to_vec(),
    })
    .map_err(|e| e.to_string())
}

/// Reads a TOML form, refusing it whole if any entry is malformed.
pub fn read_toml(text: &str) -> Result<Vec<CatalogEntry>, FormErrors> {
    let form: TomlForm = toml::from_str(text).map_err(|e| {
        FormErrors(vec![FormError {
            row: 0,
            column: String::new(),
            message: e.to_string(),
        }])
    })?;
    let mut errors = Vec::new();
    for (i, e) in form.entries.iter().enumerate() {
        if let Err(m) = super::check_code(&e.code) {
            errors.push(FormError {
                row: i + 1,
                column: label("code").to_string(),
                message: m,
            });
        }
    }
    if errors.is_empty() {
        Ok(form.entries)
    } else {
        Err(FormErrors(errors))
    }
}

/// Problems of an entry as form errors of one row.
pub fn problems_at(row: usize, problems: &[Problem]) -> Vec<FormError> {
    problems
        .iter()
        .map(|p| FormError {
            row,
            column: p.label.clone(),
            message: p.message.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::{ShareMethod, ShareType};

    const FORM: &str = "信息资源代码,信息资源名称,信息资源分类,信息资源提供方,信息资源提供方代码,信息资源摘要,信息资源格式,信息项信息,共享类型,共享条件,共享依据,共享方式,开放属性,开放条件,更新周期,关联资源代码\n\
101001/00001,常住人口登记,基础信息资源,定海区公安分局,GA-330902,户籍登记,数据库表,id_number:TEXT(18):公民身份号码:敏感; name:TEXT:姓名,有条件共享,用于政务服务身份核验,《中华人民共和国居民身份证法》,比对验证;查询引用,不予开放,,每日,101001/00002\n";

    #[test]
    fn csv_round_trip_with_chinese_headers() {
        let entries = read_csv(FORM.as_bytes()).unwrap();
        assert_eq!(entries.len(), 1);
        let e = &entries[0];
        assert_eq!(e.share_type, Some(ShareType::Conditional));
        assert_eq!(
            e.share_methods,
            vec![ShareMethod::Verification, ShareMethod::Query]
        );
        assert_eq!(e.data_items[0].length, Some(18));
        assert!(e.data_items[0].sensitive);
        assert_eq!(e.data_items[1].description, "姓名");
        let mut out = Vec::new();
        write_csv(&entries, &[], &mut out).unwrap();
        let back = read_csv(&out).unwrap();
        assert_eq!(back, entries);
        let toml = write_toml(&entries).unwrap();
        assert_eq!(read_toml(&toml).unwrap(), entries);
    }

    #[test]
    fn the_platforms_publish_date_column_is_accepted_and_ignored() {
        let form = "信息资源代码,发布日期\n101001/00001,2026-03-01\n";
        let e = read_csv(form.as_bytes()).unwrap();
        assert_eq!(e[0].code, "101001/00001");
        let bad = "信息资源代码,发布日期\n101001/00001,next spring\n";
        let err = read_csv(bad.as_bytes()).unwrap_err().to_string();
        assert!(err.contains("row 1, column 发布日期"), "{err}");
    }

    #[test]
    fn a_bad_row_is_reported_by_row_and_column_and_nothing_is_read() {
        let bad = format!(
            "{FORM}101001/00002,户籍迁移,基础信息资源,定海区公安分局,GA-330902,迁移,数据库表,move_id:TEXT,随便共享,,,快递,不予开放,,每两天,\n"
        );
        let err = read_csv(bad.as_bytes()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("row 2, column 共享类型: \"随便共享\" is not a valid share type"),
            "{text}"
        );
        assert!(text.contains("row 2, column 共享方式"), "{text}");
        assert!(text.contains("row 2, column 更新周期"), "{text}");
        assert!(!text.contains("row 1"), "{text}");
        let unknown = "信息资源代码,颜色\n101001/00001,红\n";
        assert!(
            read_csv(unknown.as_bytes())
                .unwrap_err()
                .to_string()
                .contains("unknown column \"颜色\"")
        );
    }
}
