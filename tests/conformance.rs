//! docs/CONFORMANCE.md is kept true: every operation of the AWS API model has one row, a
//! served operation is routed to a handler, and a refused one is refused with the exception
//! and the message the table gives.

use hsm_kms::model::op::Op;

/// (operation, status, exception, message) of each row of the operation tables (the
/// sections "Served" and "Refused ...").
fn rows() -> Vec<(String, String, String, String)> {
    let text = include_str!("../docs/CONFORMANCE.md");
    let mut section = "";
    text.lines()
        .filter(|l| {
            if let Some(title) = l.strip_prefix("## ") {
                section = if title.starts_with("Served") || title.starts_with("Refused") {
                    "operations"
                } else {
                    ""
                };
            }
            section == "operations"
        })
        .filter(|l| l.starts_with("| ") && !l.starts_with("| operation") && !l.starts_with("| ---"))
        .map(|l| {
            let cells: Vec<String> = l
                .trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().to_string())
                .collect();
            let cell = |i: usize| cells.get(i).cloned().unwrap_or_default();
            (cell(0), cell(1), cell(2), cell(3))
        })
        .collect()
}

#[test]
fn every_operation_of_the_model_has_one_row() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/reference/aws-kms-api-model.json"
    );
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "{path}: {e}, and CI needs it"
            );
            eprintln!("skipped: {path}: {e}");
            return;
        }
    };
    let model: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut in_model: Vec<String> = model["operations"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    in_model.sort();
    let mut in_table: Vec<String> = rows().into_iter().map(|r| r.0).collect();
    in_table.sort();
    assert_eq!(in_table, in_model);
}

#[test]
fn each_row_says_what_the_service_does() {
    let rows = rows();
    assert!(rows.len() > 50, "{} rows read", rows.len());
    for (name, status, exception, message) in rows {
        let op = Op::parse(&name);
        match status.as_str() {
            "served" => {
                let op = op.unwrap_or_else(|| panic!("{name} is marked served and is no Op"));
                assert_eq!(op.unserved(), None, "{name} is marked served");
            }
            "refused" => {
                let op = op.unwrap_or_else(|| panic!("{name} is marked refused and is no Op"));
                let how = op
                    .unserved()
                    .unwrap_or_else(|| panic!("{name} is marked refused and is served"));
                let e = how.error(op, "<key ARN>");
                assert_eq!(exception, e.kind.aws_name(), "{name}");
                let template = message.trim_matches('`').replace("<Operation>", op.name());
                assert_eq!(template, e.message, "{name}");
            }
            other => panic!("{name}: unknown status {other}"),
        }
    }
}
